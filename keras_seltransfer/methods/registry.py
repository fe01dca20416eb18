"""The registry of methods and model transforms, and how transforms compose.

Every module of `keras_seltransfer.methods` registers what it declares
(`register`, `register_transform`) when imported; the training loop, the
apps and the tools look methods up here (`names`, `get`).
"""

from keras_seltransfer.methods.base import Method
from keras_seltransfer.methods.base import Transform

_METHODS = {}
_TRANSFORMS = {}

# The `method` value that chooses among methods by cross-validation
# (`keras_seltransfer.training.auto`) instead of naming one; no method may
# be registered under it.
AUTO = "auto"


def register(method):
    """Adds a `Method` instance to the registry and returns it.

    An instance of the same class registered again (a module imported
    twice) replaces the first.

    Raises:
        TypeError: if `method` is not a `Method` instance.
        ValueError: if the name is missing or taken by a method of another
            class, or `default_batchnorm` is not `"frozen"` or `"train"`.

    Example:

    ```python
    register(HeadLR())  # HeadLR: see `Method`
    methods.get("head_lr")  # <method head_lr>; --method=head_lr runs it
    ```
    """
    if not isinstance(method, Method):
        raise TypeError(f"register() takes a Method instance. Received: {method!r}")
    if not method.name or not isinstance(method.name, str):
        raise ValueError(f"A method needs a name. Received: name={method.name!r}")
    if method.name == AUTO:
        raise ValueError(
            f"{AUTO!r} is reserved for `method=\"{AUTO}\"` (choosing a method by "
            "cross-validation); give the method another name."
        )
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
    """Adds a `Transform` to the registry and returns it.

    A transform registered again under the same name replaces the first.

    Raises:
        TypeError: if `transform` is not a `Transform`.

    Example:

    ```python
    FREEZE = register_transform(Transform("freeze_first_block", freeze_first_block))
    methods.get_transform("freeze_first_block") is FREEZE  # True; see `Transform`
    ```
    """
    if not isinstance(transform, Transform):
        raise TypeError(f"register_transform() takes a Transform. Received: {transform!r}")
    _TRANSFORMS[transform.name] = transform
    return transform


def names():
    """Names of the registered methods, in listing order.

    Methods are listed by their `order`, then by name.

    Example:

    >>> from keras_seltransfer import methods
    >>> methods.names()[:3]
    ('baseline', 'l2sp', 'sjft')
    """
    return tuple(
        name for name, _ in sorted(_METHODS.items(), key=lambda item: (item[1].order, item[0]))
    )


def get(name):
    """The registered `Method` called `name`.

    Raises:
        ValueError: for an unknown name (listing the known ones).

    Example:

    >>> from keras_seltransfer import methods
    >>> methods.get("sjft")
    <method sjft>
    >>> methods.get("sjft").joint, methods.get("sjft").default_batchnorm
    (True, 'train')
    """
    if name not in _METHODS:
        raise ValueError(f"`method` must be one of {names()}. Received: method={name!r}")
    return _METHODS[name]


def transform_names():
    """Names of the registered transforms (the `compose` values), sorted.

    Example:

    >>> from keras_seltransfer import methods
    >>> methods.transform_names()
    ('adafilter', 'antialias')
    """
    return tuple(sorted(_TRANSFORMS))


def get_transform(name):
    """The registered `Transform` called `name`.

    Raises:
        ValueError: for an unknown name (listing the known ones).

    Example:

    >>> from keras_seltransfer import methods
    >>> methods.get_transform("antialias").before
    ('adafilter',)
    """
    if name not in _TRANSFORMS:
        raise ValueError(
            f"`compose` takes transforms from {transform_names()}. Received: compose={name!r}"
        )
    return _TRANSFORMS[name]


def compose_names(spec):
    """The transform names of a `compose` spec (None or comma-separated), in order.

    Spaces and empty entries are dropped; the names are not checked (see
    `check_compose`).

    Example:

    >>> from keras_seltransfer import methods
    >>> methods.compose_names("antialias, adafilter")
    ['antialias', 'adafilter']
    >>> methods.compose_names(None)
    []
    """
    if spec is None:
        return []
    return [name.strip() for name in str(spec).split(",") if name.strip()]


def check_compose(method, spec):
    """Checks a `compose` spec for the method called `method`.

    The composed transforms run in the order given, then the transforms the
    method applies itself (`Method.applies`); a transform must come after
    those it declares it must follow (`Transform.before`).

    Raises:
        ValueError: for an unknown method, or for an unknown, repeated,
            redundant (already applied by the method) or misordered
            transform in `spec`; the message says how to fix the order.

    Example:

    >>> from keras_seltransfer import methods
    >>> methods.check_compose("sjft", "antialias,adafilter")  # valid: returns None
    >>> methods.check_compose("antialias_ft", "adafilter")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: Anti-aliasing must come before AdaFilter (...): use --method=adafilter ...
    """
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
                # Composing both in order works unless the method applies one itself.
                remedy = []
                if later not in applied_by_method and name not in applied_by_method:
                    remedy.append(f"compose='{later},{name}'")
                if name in _METHODS:
                    remedy.insert(0, f"--method={name} --compose={later}")
                raise ValueError(
                    f"{first.title or first.name} must come before {second.title or name} "
                    f"({first.before_reason or 'it cannot convert what the other makes'}): "
                    f"use {' or '.join(remedy)}. Received: method={method!r}, compose={spec!r}"
                )


def apply_transforms(config, model, context):
    """Applies the `config.compose` transforms to `model`, in order.

    Call it in the strategy scope, after the BatchNorm mode is set, with a
    checked spec (`FinetuneConfig` runs `check_compose`). Returns the
    transformed model (`model` itself when `config.compose` is unset).

    Example:

    ```python
    with context.strategy.scope():  # config.compose == "adafilter"
        gated = methods.apply_transforms(config, model, context)
    ```
    """
    for name in compose_names(config.compose):
        model = _TRANSFORMS[name].apply(config, model, context)
    return model


def transform_lr_multipliers(config, model):
    """The learning-rate multipliers every registered transform asks for on `model`.

    Every registered transform is asked, composed or not: each finds its own
    layers in `model` (AdaFilter's gate controllers, also when
    `--method=adafilter` added them). Returns the merged
    `{regular expression on variable paths: factor}`, or None.

    Example:

    ```python
    config = FinetuneConfig(backbone="small_cnn", method="adafilter", gate_lr_multiplier=10.0)
    methods.transform_lr_multipliers(config, gated_model)  # {"^<controller>/": 10.0, ...}
    ```
    """
    merged = {}
    for transform in _TRANSFORMS.values():
        if transform.lr_multipliers is not None:
            merged.update(transform.lr_multipliers(config, model) or {})
    return merged or None


def options_classes():
    """Every options dataclass of the registered methods and transforms, each once.

    The methods' come first, in listing order (`names()`), then those of
    the transforms, sorted by transform name. `FinetuneConfig` has one field
    per field of these classes.

    Example:

    >>> from keras_seltransfer import methods
    >>> [cls.__name__ for cls in methods.options_classes()][:3]
    ['L2SPOptions', 'SJFTOptions', 'AdaFilterOptions']
    """
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


__all__ = [
    "apply_transforms",
    "check_compose",
    "compose_names",
    "get",
    "get_transform",
    "names",
    "options_classes",
    "register",
    "register_transform",
    "transform_lr_multipliers",
    "transform_names",
]
