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
from keras_seltransfer.utils.options import check_option  # noqa: F401 (re-exported)
from keras_seltransfer.utils.options import option  # noqa: F401 (re-exported)
from keras_seltransfer.utils.options import option_info  # noqa: F401 (re-exported)

@dataclasses.dataclass
class MethodContext:
    """What a method may use besides the config and the model.

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

    def __post_init__(self):
        if self.classifier is None:
            self.classifier = self.model
        if self.export_model is None:
            self.export_model = self.classifier
        if self.train_data is not None and self.steps_per_epoch is None:
            raise ValueError("A MethodSetup with `train_data` needs `steps_per_epoch`.")


class Method:
    """A fine-tuning method (subclass it and `register` an instance).

    Class attributes:
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
    class LabelSmoothing(Method):
        name = "label_smoothing"
        summary = "fine-tuning with label smoothing"

        def setup(self, config, model, context):
            loss = keras.losses.CategoricalCrossentropy(label_smoothing=0.1)
            return MethodSetup(model=model, compile_kwargs={"loss": loss})

    register(LabelSmoothing())
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
            multipliers the transformed model needs.
    """

    name: str
    apply: Callable
    title: str = None
    options: tuple = ()
    before: tuple = ()
    before_reason: str = ""
    lr_multipliers: Callable = None


_METHODS = {}
_TRANSFORMS = {}


def register(method):
    """Adds a `Method` instance to the registry and returns it.

    Raises:
        ValueError: if the name is taken or the method is malformed.
    """
    if not isinstance(method, Method):
        raise TypeError(f"register() takes a Method instance. Received: {method!r}")
    if not method.name or not isinstance(method.name, str):
        raise ValueError(f"A method needs a name. Received: name={method.name!r}")
    if method.name in _METHODS and type(_METHODS[method.name]) is not type(method):
        raise ValueError(f"A method named {method.name!r} is already registered.")
    if method.default_batchnorm not in ("frozen", "train"):
        raise ValueError(
            f"`default_batchnorm` must be 'frozen' or 'train'. Received: "
            f"{method.name}.default_batchnorm={method.default_batchnorm!r}"
        )
    _METHODS[method.name] = method
    return method


def register_transform(transform):
    """Adds a `Transform` to the registry and returns it."""
    if not isinstance(transform, Transform):
        raise TypeError(f"register_transform() takes a Transform. Received: {transform!r}")
    _TRANSFORMS[transform.name] = transform
    return transform


def names():
    """Names of the registered methods, in listing order."""
    return tuple(
        name for name, _ in sorted(_METHODS.items(), key=lambda item: (item[1].order, item[0]))
    )


def get(name):
    """The registered `Method` called `name`.

    Raises:
        ValueError: for an unknown name (listing the known ones).
    """
    if name not in _METHODS:
        raise ValueError(f"`method` must be one of {names()}. Received: method={name!r}")
    return _METHODS[name]


def transform_names():
    """Names of the registered transforms."""
    return tuple(sorted(_TRANSFORMS))


def get_transform(name):
    """The registered `Transform` called `name`."""
    if name not in _TRANSFORMS:
        raise ValueError(
            f"`compose` takes transforms from {transform_names()}. Received: {name!r}"
        )
    return _TRANSFORMS[name]


def compose_names(spec):
    """The transform names of a `compose` spec (None or comma-separated)."""
    if spec is None:
        return []
    return [name.strip() for name in str(spec).split(",") if name.strip()]


def check_compose(method, spec):
    """Raises ValueError for an unknown, repeated, redundant or misordered
    transform in `spec` for the method called `method`."""
    applied_by_method = get(method).applies
    composed = compose_names(spec)
    for name in composed:
        if name not in _TRANSFORMS:
            raise ValueError(
                f"`compose` takes transforms from {transform_names()}. Received: compose={spec!r}"
            )
        if name in applied_by_method:
            raise ValueError(
                f"Method {method!r} already applies {name!r}; remove it from `compose`. "
                f"Received: compose={spec!r}"
            )
    if len(set(composed)) != len(composed):
        raise ValueError(f"`compose` names a transform twice. Received: compose={spec!r}")
    # The method's own transforms run after the composed ones.
    order = composed + list(applied_by_method)
    for position, name in enumerate(order):
        for later in order[position + 1:]:
            first = _TRANSFORMS[later]
            if name in first.before:
                second = _TRANSFORMS[name]
                remedy = [f"compose='{later},{name}'"]
                if name in _METHODS:
                    remedy.insert(0, f"--method={name} --compose={later}")
                raise ValueError(
                    f"{first.title or first.name} must come before {second.title or name} "
                    f"({first.before_reason or 'it cannot convert what the other makes'}): "
                    f"use {' or '.join(remedy)}. Received: method={method!r}, compose={spec!r}"
                )


def apply_transforms(config, model, context):
    """Applies the `config.compose` transforms to `model`, in order (call in
    the strategy scope, after the BatchNorm mode is set)."""
    for name in compose_names(config.compose):
        model = _TRANSFORMS[name].apply(config, model, context)
    return model


def transform_lr_multipliers(config, model):
    """The learning-rate multipliers every registered transform asks for on
    `model` (a gate network's, when the model has one), merged."""
    merged = {}
    for transform in _TRANSFORMS.values():
        if transform.lr_multipliers is not None:
            merged.update(transform.lr_multipliers(config, model) or {})
    return merged or None


def options_classes():
    """Every options dataclass of the registered methods and transforms, in
    listing order, each once."""
    seen = []
    for method in (get(name) for name in names()):
        for cls in method.options:
            if cls not in seen:
                seen.append(cls)
    for name in transform_names():
        for cls in _TRANSFORMS[name].options:
            if cls not in seen:
                seen.append(cls)
    return seen


def methods_reading(options_cls):
    """Names of the methods that read `options_cls`."""
    return tuple(name for name in names() if options_cls in get(name).options)


__all__ = [
    "Method",
    "MethodContext",
    "MethodSetup",
    "Transform",
    "apply_transforms",
    "check_compose",
    "check_option",
    "compose_names",
    "get",
    "get_transform",
    "names",
    "option",
    "options_classes",
    "register",
    "register_transform",
    "transform_names",
]
