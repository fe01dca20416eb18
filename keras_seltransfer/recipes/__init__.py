"""Recipes: how a `FinetuneConfig` method maps onto the library's building blocks.

`keras_seltransfer.training.finetune` runs every single-task method the same
way: load the backbone, attach the target head, then hand the classifier to
the method's recipe, which transforms it (gated convolutions, filter masks,
anti-aliasing, a teacher for knowledge transfer) and says what to train,
with which callbacks, and what to save, evaluate and export. The recipes are
the only code besides `training` that reads a `FinetuneConfig`; the
transformations they call take plain arguments.

A recipe module has one function, `setup(config, classifier, context) ->
MethodSetup`. It is called outside the strategy scope and builds every model
inside `context.strategy.scope()`.
"""

import dataclasses
import importlib
import re
from typing import Any
from typing import Callable

import numpy as np

from keras_seltransfer import data as data_lib
from keras_seltransfer.models.batchnorm import recalibrate_batchnorm

# Method name -> recipe module (under keras_seltransfer.recipes).
RECIPES = {
    "adafilter": "adafilter",
    "filter_transfer": "filter_transfer",
    "antialias_ft": "antialias",
    "ktft": "antialias",
}


@dataclasses.dataclass
class RecipeContext:
    """What a recipe may use besides the config and the classifier.

    Attributes:
        strategy: the run's `tf.distribute.Strategy`; build models in its scope.
        train: the target training `ImageSource` (after the low-data subset).
        val: the validation `ImageSource`.
        run_dir: the run directory (the recipe may write extra outputs there,
            atomically, when `is_chief`).
        is_chief: whether this worker writes outputs.
        steps_per_epoch: training steps per epoch.
        channels: input channels of the model.
        recalibration: the images an anti-aliased network's BatchNorm
            statistics are re-estimated on (`recalibration_dataset`), or None.
    """

    strategy: Any
    train: Any
    val: Any
    run_dir: str
    is_chief: bool
    steps_per_epoch: int
    channels: int
    recalibration: Any = None


@dataclasses.dataclass
class MethodSetup:
    """What `finetune` trains, evaluates, saves and exports for one method.

    Attributes:
        model: the model `fit` trains (compiled by `finetune` inside the
            strategy scope with the sparse cross-entropy, accuracy and
            `crossentropy` metrics, plus `compile_kwargs`).
        classifier: the single-output classifier from raw images that is
            evaluated and saved as `model.keras`; often `model` itself, or a
            model sharing its layers (a student without its teacher).
        export_model: what the SavedModel serves; default `classifier`.
        callbacks: extra `fit` callbacks (run before the checkpoint).
        state_variables: training state outside the model's weights
            (`name -> tf.Variable`), checkpointed for resume.
        compile_kwargs: overrides of `compile` arguments (loss, metrics...).
        lr_multipliers: learning-rate multipliers of the optimizer
            (`{regular expression on variable paths: factor}`, see
            `keras_seltransfer.optimizers.make_optimizer`), or None.
        report: called after training; returns extra report entries
            (JSON-serialisable).
    """

    model: Any
    classifier: Any = None
    export_model: Any = None
    callbacks: list = dataclasses.field(default_factory=list)
    state_variables: dict = dataclasses.field(default_factory=dict)
    compile_kwargs: dict = dataclasses.field(default_factory=dict)
    lr_multipliers: dict = None
    report: Callable[[], dict] = None

    def __post_init__(self):
        if self.classifier is None:
            self.classifier = self.model
        if self.export_model is None:
            self.export_model = self.classifier


# Model transforms `FinetuneConfig.compose` may apply before a method's own
# recipe, and the methods that already apply each.
COMPOSABLE = {"antialias": ("antialias_ft", "ktft"), "adafilter": ("adafilter",)}


def compose_names(spec):
    """The transform names of a `compose` spec (None or comma-separated)."""
    if spec is None:
        return []
    return [name.strip() for name in str(spec).split(",") if name.strip()]


def check_compose(method, spec):
    """Raises ValueError for an unknown, repeated or redundant transform."""
    names = compose_names(spec)
    for name in names:
        if name not in COMPOSABLE:
            raise ValueError(
                f"`compose` takes transforms from {tuple(COMPOSABLE)}. Received: compose={spec!r}"
            )
        if method in COMPOSABLE[name]:
            raise ValueError(
                f"Method {method!r} already applies {name!r}; remove it from `compose`. "
                f"Received: compose={spec!r}"
            )
    if len(set(names)) != len(names):
        raise ValueError(f"`compose` names a transform twice. Received: compose={spec!r}")
    # Anti-aliasing rebuilds Conv2D layers; the gated convolutions AdaFilter
    # makes are not among the layers it converts, so it has to come first.
    if "adafilter" in names and (
        method in COMPOSABLE["antialias"]
        or ("antialias" in names and names.index("antialias") > names.index("adafilter"))
    ):
        raise ValueError(
            "Anti-aliasing must come before AdaFilter (it cannot convert gated convolutions): "
            "use --method=adafilter --compose=antialias, or compose='antialias,adafilter'. "
            f"Received: method={method!r}, compose={spec!r}"
        )


# Where anti-aliasing re-estimates BatchNorm statistics (`recalibrate_batchnorm`).
RECALIBRATION_DATA = ("source", "target", "none")


def uses_antialias(config):
    """Whether the run anti-aliases its network (its method or `compose`)."""
    return config.method in COMPOSABLE["antialias"] or "antialias" in compose_names(config.compose)


def recalibration_dataset(config, train, channels):
    """The images an anti-aliased network's BatchNorm statistics are
    re-estimated on, as a dataset (None when `config.recalibrate_batchnorm`
    is `"none"` or the run does not anti-alias).

    `"source"`: up to `config.recalibration_images` images of the training
    split of `config.source` (the data the backbone was pretrained on, whose
    statistics the copied BatchNorm layers held), drawn with `config.seed`;
    `"target"`: as many of the target training images `train`.
    """
    if config.recalibrate_batchnorm == "none" or not uses_antialias(config):
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
    `recalibration_dataset`) when given: the blur changes the variance of
    every activation after the first subsampling, so the copied statistics
    no longer normalise what the layers see."""
    from keras_seltransfer.models.antialias import antialias

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


def adafilter_model(config, model):
    """`models.adafilter` of `model` with the config's gate settings (the
    fine-tuned path's batch norms per `config.gated_batchnorm`, whatever the
    run's BatchNorm mode)."""
    from keras_seltransfer.models.adafilter import adafilter

    return adafilter(
        model,
        layers=config.gated_layers,
        estimator=config.gate_estimator,
        temperature=config.gate_temperature,
        units=config.gate_units,
        usage_target=config.gate_usage_target,
        usage_weight=config.gate_usage_weight,
        train_batchnorm=config.gated_batchnorm == "train",
        first_gate_input=config.first_gate_input,
        normalize_gate_inputs=config.gate_input_norm,
        seed=config.seed,
    )


def lr_multipliers(config, model):
    """The optimizer's learning-rate multipliers for `model`: the gate
    network's `config.gate_lr_multiplier` when `model` has one (AdaFilter,
    as the method or composed), else None."""
    from keras_seltransfer.layers.gate_controller import GateController

    controllers = [layer for layer in model.layers if isinstance(layer, GateController)]
    if not controllers or config.gate_lr_multiplier == 1:
        return None
    return {f"^{re.escape(c.name)}/": float(config.gate_lr_multiplier) for c in controllers}


def compose(config, model, recalibration=None):
    """Applies the `config.compose` transforms to `model`, in order (call in
    the strategy scope, after the BatchNorm mode is set); `recalibration` as
    in `antialias_model`."""
    for name in compose_names(config.compose):
        if name == "antialias":
            model = antialias_model(config, model, recalibration=recalibration)
        else:
            model = adafilter_model(config, model)
    return model


def setup(config, classifier, context):
    """The `MethodSetup` of `config.method` (plain fine-tuning when the method
    has no recipe)."""
    module_name = RECIPES.get(config.method)
    if module_name is None:
        return MethodSetup(model=classifier)
    module = importlib.import_module(f"keras_seltransfer.recipes.{module_name}")
    return module.setup(config, classifier, context)


__all__ = [
    "COMPOSABLE",
    "MethodSetup",
    "RECALIBRATION_DATA",
    "RECIPES",
    "RecipeContext",
    "adafilter_model",
    "antialias_model",
    "check_compose",
    "compose",
    "compose_names",
    "recalibration_dataset",
    "lr_multipliers",
    "setup",
    "uses_antialias",
]
