"""Anti-aliasing: the `antialias` transform and `--method=antialias_ft`.

`models.antialias` rebuilds a network with a BlurPool before every
subsampling (Zhang, ICML 2019), copying the pretrained weights; the blur
changes the variance of every activation after the first subsampling, so
the BatchNorm moving statistics are then re-estimated
(`models.recalibrate_batchnorm`) on the images `recalibrate_batchnorm`
names. `antialias_ft` fine-tunes the anti-aliased network (the comparison
row of the knowledge-transferred fine-tuning paper, IEEE Access 2022); the
`antialias` transform applies the same conversion under any method
(`--compose=antialias`). `model.keras` and the SavedModel hold the
anti-aliased classifier.
"""

import dataclasses

import numpy as np

from keras_seltransfer import data as data_lib
from keras_seltransfer.methods.base import Method
from keras_seltransfer.methods.base import MethodSetup
from keras_seltransfer.methods.base import Transform
from keras_seltransfer.utils.options import option
from keras_seltransfer.methods.registry import register
from keras_seltransfer.methods.registry import register_transform
from keras_seltransfer.models.antialiasing import antialias
from keras_seltransfer.models.antialiasing import blur_layers
from keras_seltransfer.models.batchnorm import recalibrate_batchnorm
from keras_seltransfer.models.classifier import set_batchnorm_mode

BLUR_PAD_TYPES = ("reflect", "replicate", "zero")
# Where anti-aliasing re-estimates BatchNorm statistics.
RECALIBRATION_DATA = ("target", "source", "none")


@dataclasses.dataclass
class AntialiasOptions:
    """Options of anti-aliasing (`antialias_ft`, `ktft`, `--compose=antialias`)."""

    blur_filt_size: int = option(
        4, "antialias_ft/ktft/--compose=antialias: BlurPool filter size.", lower=1, upper=7
    )
    blur_pad_type: str = option(
        "reflect", "antialias_ft/ktft/--compose=antialias: BlurPool padding.",
        choices=BLUR_PAD_TYPES,
    )
    blur_keep_stem: bool = option(
        False,
        "antialias_ft/ktft/--compose=antialias: keep the input's strided convolution strided "
        "(as Zhang's released models) instead of running it at full resolution before a blur.",
    )
    recalibrate_batchnorm: str = option(
        "target",
        "antialias_ft/ktft/--compose=antialias: images on which the anti-aliased network's "
        "BatchNorm moving statistics are re-estimated right after the BlurPool layers go in "
        "(the blur changes every activation's variance after the first subsampling, so the "
        "copied statistics are wrong): target (the target training images; the default, "
        "lowest validation cross-entropy on ELPV at 15%, needs no source data), source (the "
        "training split of --source, when that is the data the backbone was pretrained on) "
        "or none (keep the copied statistics).",
        choices=RECALIBRATION_DATA,
    )
    recalibration_images: int = option(
        2000, "Images used to re-estimate BatchNorm statistics (at most).", lower=1
    )


def recalibration_dataset(config, train, channels):
    """The images an anti-aliased network's BatchNorm statistics are
    re-estimated on, as a dataset (None when `config.recalibrate_batchnorm`
    is `"none"`).

    `"source"`: up to `config.recalibration_images` images of the training
    split of `config.source` (the data the backbone was pretrained on, whose
    statistics the copied BatchNorm layers held), drawn with `config.seed`;
    `"target"`: as many of the target training images `train`.
    """
    if config.recalibrate_batchnorm == "none":
        return None
    if config.recalibrate_batchnorm == "source":
        images, _ = data_lib.load_train_test(config.source, config.test_fraction, config.split_seed)
    else:
        images = train
    count = min(len(images), int(config.recalibration_images))
    if count < len(images):
        rng = np.random.default_rng(config.seed)
        images = images.subset(np.sort(rng.choice(len(images), count, replace=False)))
    return data_lib.make_dataset(images, config.image_size, config.batch_size, channels=channels)


def antialias_model(config, model, name=None, recalibration=None):
    """`models.antialias` of `model` with the config's BlurPool settings,
    its BatchNorm statistics re-estimated on `recalibration` (a dataset from
    `recalibration_dataset`) when given."""
    model = antialias(
        model,
        filt_size=config.blur_filt_size,
        pad_type=config.blur_pad_type,
        keep_stem=config.blur_keep_stem,
        name=name,
    )
    if recalibration is not None:
        recalibrate_batchnorm(model, recalibration)
    return model


def _recalibration(config, model, context):
    return recalibration_dataset(config, context.train, int(model.inputs[0].shape[-1]))


def _apply(config, model, context):
    return antialias_model(config, model, recalibration=_recalibration(config, model, context))


ANTIALIAS = register_transform(
    Transform(
        name="antialias",
        title="Anti-aliasing",
        apply=_apply,
        options=(AntialiasOptions,),
        before=("adafilter",),
        before_reason="it cannot convert gated convolutions",
    )
)


def antialiased_student(config, classifier, context):
    """The anti-aliased copy of `classifier` (statistics recalibrated, the
    run's BatchNorm mode applied) and the `"antialias"` report entry."""
    recalibration = _recalibration(config, classifier, context)
    with context.strategy.scope():
        student = antialias_model(
            config, classifier, name=f"{classifier.name}_antialiased", recalibration=recalibration
        )
        set_batchnorm_mode(student, config.batchnorm_mode)
    report = {
        "filt_size": config.blur_filt_size,
        "pad_type": config.blur_pad_type,
        "blur_layers": blur_layers(student),
        "recalibrate_batchnorm": config.recalibrate_batchnorm,
    }
    return student, report


class AntialiasFinetuning(Method):
    """Fine-tuning of the anti-aliased network."""

    name = "antialias_ft"
    summary = (
        "fine-tuning of the anti-aliased network: BlurPool before every subsampling, "
        "BatchNorm statistics re-estimated (the comparison row of KTFT, IEEE Access 2022)"
    )
    options = (AntialiasOptions,)
    applies = ("antialias",)
    order = 40

    def setup(self, config, model, context):
        """The report gains `"antialias"` (filter size, padding, the BlurPool
        layers and the recalibration data)."""
        student, report = antialiased_student(config, model, context)
        return MethodSetup(model=student, report=lambda fit_info: {"antialias": report})


register(AntialiasFinetuning())
