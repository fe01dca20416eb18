"""Recipes of `finetune --method=antialias_ft` and `--method=ktft`.

Both rebuild the classifier (backbone and target head, BatchNorm mode
already applied) as an anti-aliased network with
`keras_seltransfer.models.antialias.antialias` (BlurPool before every
subsampling, pretrained weights copied) and fine-tune it:

- `antialias_ft`: plain fine-tuning of the anti-aliased network (the
  comparison row of the KTFT paper);
- `ktft`: knowledge-transferred fine-tuning: the original classifier, frozen
  and in inference mode, is the teacher of a `KnowledgeTransferModel`, whose
  pixel-level, global-level and (optionally) logit losses pull the student's
  stage outputs toward the teacher's.

In both cases `model.keras` and the SavedModel hold the anti-aliased
classifier alone.
"""

from keras_seltransfer.models.antialias import blur_layers
from keras_seltransfer.models.classifier import set_batchnorm_mode
from keras_seltransfer.models.knowledge_transfer import KnowledgeTransferModel
from keras_seltransfer.recipes import MethodSetup
from keras_seltransfer.recipes import antialias_model


def _layer_names(spec):
    if spec is None:
        return None
    names = [name.strip() for name in spec.split(",") if name.strip()]
    if not names:
        raise ValueError(
            "`ktft_layers` must be a comma-separated list of layer names or None. "
            f"Received: ktft_layers={spec!r}"
        )
    return names


def setup(config, classifier, context):
    """The `MethodSetup` of an `antialias_ft` or `ktft` run.

    Uses the config fields `blur_filt_size`, `blur_pad_type` and
    `batchnorm_mode` (applied to the student; the teacher's BatchNorm always
    runs on its moving statistics), and for `ktft` also `ktft_pixel_weight`,
    `ktft_global_weight`, `ktft_logit_weight` and `ktft_layers` (default:
    every stage output, see `stage_outputs`).

    The report gains `"antialias"` (filter size, padding and the BlurPool
    layers) and, for `ktft`, `"ktft"` (the compared layer pairs and the
    weights).
    """
    layer_names = _layer_names(config.ktft_layers) if config.method == "ktft" else None
    with context.strategy.scope():
        student = antialias_model(
            config,
            classifier,
            name=f"{classifier.name}_antialiased",
            recalibration=context.recalibration,
        )
        set_batchnorm_mode(student, config.batchnorm_mode)
        if config.method == "ktft":
            model = KnowledgeTransferModel(
                student,
                classifier,
                layer_names=layer_names,
                pixel_weight=config.ktft_pixel_weight,
                global_weight=config.ktft_global_weight,
                logit_weight=config.ktft_logit_weight,
                name="ktft",
            )
        else:
            model = student
    extra = {
        "antialias": {
            "filt_size": config.blur_filt_size,
            "pad_type": config.blur_pad_type,
            "blur_layers": blur_layers(student),
            "recalibrate_batchnorm": (
                config.recalibrate_batchnorm if context.recalibration is not None else "none"
            ),
        }
    }
    if config.method == "ktft":
        extra["ktft"] = {
            "layers": [list(pair) for pair in model.layer_names],
            "pixel_weight": model.pixel_weight,
            "global_weight": model.global_weight,
            "logit_weight": model.logit_weight,
        }
    return MethodSetup(model=model, classifier=student, report=lambda: extra)


__all__ = ["setup"]
