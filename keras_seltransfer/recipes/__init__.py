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
from typing import Any
from typing import Callable

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
    """

    strategy: Any
    train: Any
    val: Any
    run_dir: str
    is_chief: bool
    steps_per_epoch: int
    channels: int


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
        report: called after training; returns extra report entries
            (JSON-serialisable).
    """

    model: Any
    classifier: Any = None
    export_model: Any = None
    callbacks: list = dataclasses.field(default_factory=list)
    state_variables: dict = dataclasses.field(default_factory=dict)
    compile_kwargs: dict = dataclasses.field(default_factory=dict)
    report: Callable[[], dict] = None

    def __post_init__(self):
        if self.classifier is None:
            self.classifier = self.model
        if self.export_model is None:
            self.export_model = self.classifier


def setup(config, classifier, context):
    """The `MethodSetup` of `config.method` (plain fine-tuning when the method
    has no recipe)."""
    module_name = RECIPES.get(config.method)
    if module_name is None:
        return MethodSetup(model=classifier)
    module = importlib.import_module(f"keras_seltransfer.recipes.{module_name}")
    return module.setup(config, classifier, context)


__all__ = ["MethodSetup", "RECIPES", "RecipeContext", "setup"]
