"""Declared options: a dataclass field with its help text, allowed values
and bounds in one place.

The configs of the library (`FinetuneConfig`, the methods' options,
`IndexConfig`) declare their fields with `option`; their validation
(`check_option`), their docstrings and the apps' flags are generated from
the declarations.
"""

import dataclasses

import numpy as np

# Metadata keys of an option field (see `option`).
_HELP = "help"
_CHOICES = "choices"
_LOWER = "lower"
_UPPER = "upper"
_TYPE = "type"
_ABOVE = "above"
_BELOW = "below"
_FLAG = "flag"


def option(
    default,
    help,
    *,
    type=None,
    choices=None,
    lower=None,
    upper=None,
    above=None,
    below=None,
    flag=True,
):
    """A field of a method's options dataclass.

    Args:
        default: the default value (None: unset, the method chooses).
        help: the documentation of the option, as `--help` and the config
            docstring show it.
        type: `bool`, `int`, `float` or `str`; default: the type of
            `default` (`str` when `default` is None).
        choices: the allowed values, or None.
        lower: smallest allowed value (numbers), or None.
        upper: largest allowed value (numbers), or None.
        above: the value must be greater than this (numbers), or None.
        below: the value must be smaller than this (numbers), or None.
        flag: whether `apps.finetune` has a flag of that name.

    Returns:
        A `dataclasses.field` carrying the metadata.

    Example:

    ```python
    @dataclasses.dataclass
    class MyOptions:
        my_strength: float = option(0.1, "my_method: strength of the pull.", lower=0.0)
    ```
    """
    if type is None:
        type = str if default is None else builtin_type(default)
    return dataclasses.field(
        default=default,
        metadata={
            _HELP: help,
            _TYPE: type,
            _CHOICES: None if choices is None else tuple(choices),
            _LOWER: lower,
            _UPPER: upper,
            _ABOVE: above,
            _BELOW: below,
            _FLAG: flag,
        },
    )


def builtin_type(value):
    """`bool`, `int`, `float` or `str`: the Python type an option value has.

    `bool` is checked first (a bool is also an int).

    Raises:
        TypeError: for any other value.

    Example:

    >>> builtin_type(True), builtin_type(3), builtin_type(0.5), builtin_type("adam")
    (<class 'bool'>, <class 'int'>, <class 'float'>, <class 'str'>)
    """
    for kind in (bool, int, float, str):
        if isinstance(value, kind):
            return kind
    raise TypeError(f"Options must be bool, int, float or str. Received: {value!r}")


def option_info(field):
    """The metadata of an `option` field.

    Args:
        field: a `dataclasses.Field` made with `option`.

    Returns:
        A dict with `help`, `type`, `choices`, `lower`, `upper`, `above`,
        `below` and `flag`.

    Raises:
        ValueError: if `field` was not made with `option`.

    Example:

    >>> import dataclasses
    >>> @dataclasses.dataclass
    ... class Options:
    ...     strength: float = option(0.1, "Strength of the pull.", lower=0.0)
    >>> info = option_info(dataclasses.fields(Options)[0])
    >>> info["type"], info["lower"], info["flag"]
    (<class 'float'>, 0.0, True)
    """
    meta = field.metadata
    if _HELP not in meta:
        raise ValueError(f"Field {field.name!r} was not made with `option(...)`.")
    return {key: meta.get(key) for key in (_HELP, _TYPE, _CHOICES, _LOWER, _UPPER, _ABOVE, _BELOW, _FLAG)}


def _range_text(kind, info):
    low, high, above, below = (
        None if info[key] is None else f"{info[key]:g}" for key in (_LOWER, _UPPER, _ABOVE, _BELOW)
    )
    if kind is int and low == "1" and high is None and above is None and below is None:
        return "a positive int"
    text = "an int" if kind is int else "a number"
    start = f"[{low}" if low is not None else (f"({above}" if above is not None else None)
    end = f"{high}]" if high is not None else (f"{below})" if below is not None else None)
    if start and end:
        return f"{text} in {start}, {end}"
    if low is not None:
        return f"{text} >= {low}"
    if above is not None:
        return f"{text} > {above}"
    if high is not None:
        return f"{text} <= {high}"
    if below is not None:
        return f"{text} < {below}"
    return text


def check_option(field, value):
    """Checks `value` against the declaration of an `option` field.

    The value must have the field's type (an int is a valid float; a bool is
    neither; NaN is out of every range), be one of its choices and lie
    within its bounds. None is allowed when the default is None.

    Args:
        field: a `dataclasses.Field` made with `option`.
        value: the value to check.

    Raises:
        ValueError: naming the field, what it expects and the value received.

    Example:

    >>> import dataclasses
    >>> @dataclasses.dataclass
    ... class Options:
    ...     strength: float = option(0.1, "Strength of the pull.", lower=0.0)
    >>> field = dataclasses.fields(Options)[0]
    >>> check_option(field, 2)  # an int is a valid float
    >>> check_option(field, -1.0)
    Traceback (most recent call last):
    ...
    ValueError: `strength` must be a number >= 0. Received: strength=-1.0
    """
    info = option_info(field)
    kind, choices, name = info[_TYPE], info[_CHOICES], field.name
    if value is None:
        if field.default is None:
            return
        raise ValueError(f"`{name}` must be set. Received: {name}=None")
    if choices is not None:
        if value not in choices or isinstance(value, bool) != any(
            isinstance(c, bool) for c in choices
        ):
            raise ValueError(f"`{name}` must be one of {choices}. Received: {name}={value!r}")
        return
    is_bool = isinstance(value, (bool, np.bool_))
    if kind is bool:
        if not is_bool:
            raise ValueError(f"`{name}` must be True or False. Received: {name}={value!r}")
        return
    if kind is str:
        if not isinstance(value, str):
            raise ValueError(f"`{name}` must be a string. Received: {name}={value!r}")
        return
    numbers = (int, np.integer) if kind is int else (int, float, np.integer, np.floating)
    ok = isinstance(value, numbers) and not is_bool and not (
        isinstance(value, (float, np.floating)) and np.isnan(value)
    )
    if ok:
        ok = (
            (info[_LOWER] is None or value >= info[_LOWER])
            and (info[_UPPER] is None or value <= info[_UPPER])
            and (info[_ABOVE] is None or value > info[_ABOVE])
            and (info[_BELOW] is None or value < info[_BELOW])
        )
    if not ok:
        raise ValueError(f"`{name}` must be {_range_text(kind, info)}. Received: {name}={value!r}")


__all__ = ["builtin_type", "check_option", "option", "option_info"]
