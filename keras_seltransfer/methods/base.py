"""The contract every fine-tuning method fulfils, and the registry of methods.

A method is a `Method` subclass in its own module under
`keras_seltransfer.methods`, registered with `register`. It declares:

- its options: dataclasses whose fields are made with `option` (default,
  help text, allowed values and bounds in one place). `FinetuneConfig`,
  the flags of `apps.finetune`, its `--help` and the config docstring are
  all generated from them;
- `setup(config, model, context) -> MethodSetup`: what the general training
  loop (`keras_seltransfer.training.finetune`) trains, with which data,
  callbacks and losses, what it evaluates, saves and exports;
- optionally `prepare` (data it needs before the model is built, such as
  the source neighbours of SJFT) and `build_model` (a model other than the
  single-head classifier, such as SJFT's two-head model);
- the model transforms it applies itself (`applies`), so `compose` can
  reject applying them twice.

Model transforms (`Transform`: anti-aliasing, AdaFilter's gated filters)
are declared by the methods' modules too, and `compose` applies them, in
the order the user gives, before the method's own `setup`.
"""

import dataclasses
from typing import Any
from typing import Callable

from keras_seltransfer.models.classifier import build_classifier

@dataclasses.dataclass
class MethodContext:
    """What a method may use besides the config and the model.

    `finetune` builds it; build one yourself to call a method's hooks
    outside `finetune` (in a test, say).

    Attributes:
        strategy: the run's `tf.distribute.Strategy`; build models in its scope.
        train: the target training `ImageSource` (after the low-data subset).
        val: the validation `ImageSource`.
        num_classes: classes of the target data set.
        data_channels: channels of the target images as stored.
        run_dir: the run directory (a method may write extra outputs there,
            atomically, when `is_chief`).
        is_chief: whether this worker writes outputs.
        class_weight: `{class: weight}` of the target loss, or None.
        load_backbone: a function of no arguments returning a fresh copy of
            the run's backbone (call it in the strategy scope).
        state: what `Method.prepare` left for `build_model` and `setup`.

    Example:

    ```python
    config = FinetuneConfig(target="numpy:/data/cells.npz", backbone="small_cnn")
    train, _ = load_train_test(config.target)
    shape = (config.image_size, config.image_size, train.channels)
    context = MethodContext(
        strategy=tf.distribute.get_strategy(), train=train, val=train,
        num_classes=train.num_classes, data_channels=train.channels,
        run_dir=config.output_dir, is_chief=True,
        load_backbone=lambda: load_backbone(config.backbone, shape),
    )
    model = methods.get("baseline").build_model(config, context)
    ```
    """

    strategy: Any
    train: Any
    val: Any
    num_classes: int
    data_channels: int
    run_dir: str
    is_chief: bool
    class_weight: dict = None
    load_backbone: Callable[[], Any] = None
    state: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class MethodSetup:
    """What the training loop trains, evaluates, saves and exports for one method.

    Attributes:
        model: the model `fit` trains (compiled by the loop inside the
            strategy scope; single-output models get the sparse
            cross-entropy, accuracy and `crossentropy` metrics, overridden
            by `compile_kwargs`).
        classifier: the single-output classifier from raw images that is
            evaluated and saved as `model.keras`; default `model`.
        export_model: what the SavedModel serves; default `classifier`.
        callbacks: extra `fit` callbacks (run before the checkpoint).
        state_variables: training state outside the model's weights
            (`name -> tf.Variable`), checkpointed for resume.
        compile_kwargs: overrides of `compile` arguments (loss, metrics...).
        lr_multipliers: learning-rate multipliers of the optimizer
            (`{regular expression on variable paths: factor}`, see
            `keras_seltransfer.optimizers.make_optimizer`), or None; the
            loop adds those of the composed transforms.
        train_data: a function from the number of epochs already done
            (nonzero when resuming) to the training dataset; None: the loop's
            single-task pipeline of the target training images (with the
            class weights applied as `fit`'s `class_weight`).
        val_data: the validation dataset; None: the loop's.
        steps_per_epoch: training steps per epoch (needed with `train_data`;
            sets the learning-rate schedule).
        epoch_dataset: whether `train_data` ends after each epoch (then
            `fit` runs each epoch to its end instead of counting steps).
        monitor: the validation metric early stopping minimises.
        accuracy: the training-log name of the accuracy metric
            (`ValidationCollapseMonitor` compares it with `val_<accuracy>`).
        learning_rate_schedule: a function `(config, steps_per_epoch) ->`
            schedule, or None for cosine decay over the run.
        saved_models: extra models the chief saves, `{file name: model}`.
        report: called after training with the fit summary (`history`,
            `epochs_run`...); returns extra report entries (JSON-serialisable).
        fit: whether the loop trains `model` at all; False for a model the
            method has already trained (the linear probe): the loop neither
            compiles nor fits it and reports `epochs_run` 0.

    Raises:
        ValueError: if `train_data` is given without `steps_per_epoch`.

    Example:

    ```python
    # In a `Method.setup`: train `model` with a 10x learning rate on the head.
    setup = MethodSetup(model=model, lr_multipliers={"^target_head/": 10.0})
    setup.classifier is model and setup.export_model is model  # True
    ```
    """

    model: Any
    classifier: Any = None
    export_model: Any = None
    callbacks: list = dataclasses.field(default_factory=list)
    state_variables: dict = dataclasses.field(default_factory=dict)
    compile_kwargs: dict = dataclasses.field(default_factory=dict)
    lr_multipliers: dict = None
    train_data: Callable[[int], Any] = None
    val_data: Any = None
    steps_per_epoch: int = None
    epoch_dataset: bool = False
    monitor: str = "val_crossentropy"
    accuracy: str = "accuracy"
    learning_rate_schedule: Callable = None
    saved_models: dict = dataclasses.field(default_factory=dict)
    report: Callable[[], dict] = None
    fit: bool = True

    def __post_init__(self):
        if self.classifier is None:
            self.classifier = self.model
        if self.export_model is None:
            self.export_model = self.classifier
        if self.train_data is not None and self.steps_per_epoch is None:
            raise ValueError("A MethodSetup with `train_data` needs `steps_per_epoch`.")


class Method:
    """A fine-tuning method (subclass it and `register` an instance).

    A subclass sets the attributes below (as class attributes) and overrides
    `setup`, and `prepare` or `build_model` when it needs to.

    Attributes:
        name: the `--method` value.
        summary: one paragraph for `apps.finetune --help`.
        options: the options dataclasses the method reads (shared ones, such
            as the anti-aliasing options of `antialias_ft` and `ktft`, are
            listed by every method that reads them).
        applies: names of the `Transform`s the method applies itself.
        default_batchnorm: the BatchNorm mode when `FinetuneConfig.batchnorm`
            is unset (`"frozen"` or `"train"`).
        joint: whether the method trains on source images too (and needs
            `FinetuneConfig.source`'s neighbour index).
        order: position in listings (smaller first).

    Example:

    ```python
    class HeadLR(Method):
        name = "head_lr"
        summary = "fine-tuning with a ten times larger learning rate on the new head"

        def setup(self, config, model, context):
            return MethodSetup(model=model, lr_multipliers={"^target_head/": 10.0})

    register(HeadLR())
    finetune(FinetuneConfig(target="elpv", method="head_lr", fraction=0.15))
    ```
    """

    name = None
    summary = ""
    options = ()
    applies = ()
    default_batchnorm = "frozen"
    joint = False
    order = 100

    def prepare(self, config, context):
        """Loads what the method needs before the model is built (into
        `context.state`); called outside the strategy scope."""

    def build_model(self, config, context):
        """The model the transforms and `setup` start from: by default the
        backbone with a new target head (`build_classifier`). Called in the
        strategy scope."""
        return build_classifier(context.load_backbone(), context.num_classes, dropout=config.dropout)

    def setup(self, config, model, context):
        """The `MethodSetup` of a run; called outside the strategy scope
        (build any model inside `context.strategy.scope()`)."""
        return MethodSetup(model=model)

    def __repr__(self):
        return f"<method {self.name}>"


@dataclasses.dataclass(frozen=True)
class Transform:
    """A model transformation `compose` may apply before a method's setup.

    Attributes:
        name: the `compose` value.
        title: how messages name it (default `name`).
        apply: `(config, model, context) -> model`, called in the strategy
            scope after the BatchNorm mode is set.
        options: the options dataclasses it reads.
        before: transforms it must come before (it cannot convert what they
            make).
        before_reason: why, for the error message.
        lr_multipliers: `(config, model) -> dict or None`: learning-rate
            multipliers the transformed model needs (see
            `transform_lr_multipliers`).

    Example:

    ```python
    def freeze_first_block(config, model, context):
        model.get_layer("block1_conv").trainable = False
        return model

    register_transform(Transform("freeze_first_block", freeze_first_block))
    finetune(FinetuneConfig(backbone="small_cnn", method="l2sp", compose="freeze_first_block"))
    ```
    """

    name: str
    apply: Callable
    title: str = None
    options: tuple = ()
    before: tuple = ()
    before_reason: str = ""
    lr_multipliers: Callable = None


__all__ = ["Method", "MethodContext", "MethodSetup", "Transform"]
