"""Argument checks shared across the package, with uniform error messages."""

import numbers

import numpy as np


def check_int(value, name, low, high=None, expected=None):
    """Returns `value` as an int if it is an int in `[low, high]`.

    Booleans are rejected even though Python treats them as ints.

    Args:
        value: the argument to check.
        name: the argument's name, used in the error.
        low: smallest allowed value.
        high: largest allowed value, or None for no upper bound.
        expected: the phrase describing what was expected, when the default
            (`"a positive int"`, `"an int >= low"` or `"an int in [low, high]"`)
            is not precise enough.

    Raises:
        ValueError: naming the argument, what was expected, and the value.

    Example:

    ```python
    check_int(3, "period", 1)  # 3
    check_int(0, "period", 1)
    # ValueError: Expected `period` to be a positive int. Received: period=0
    ```
    """
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, np.integer))
        or value < low
        or (high is not None and value > high)
    ):
        if expected is None:
            if high is not None:
                expected = f"an int in [{low}, {high}]"
            elif low == 1:
                expected = "a positive int"
            else:
                expected = f"an int >= {low}"
        raise ValueError(f"Expected `{name}` to be {expected}. Received: {name}={value!r}")
    return int(value)


def image_size_pair(image_size):
    """`(height, width)` from an int or a pair of positive ints.

    Example:

    ```python
    image_size_pair(64)  # (64, 64)
    image_size_pair([48, 64])  # (48, 64)
    ```
    """
    if isinstance(image_size, (int, np.integer)) and not isinstance(image_size, bool):
        pair = (image_size, image_size)
    elif isinstance(image_size, (tuple, list)) and len(image_size) == 2:
        pair = tuple(image_size)
    else:
        pair = None
    if pair is None or not all(
        isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v > 0 for v in pair
    ):
        raise ValueError(
            "Expected `image_size` to be a positive int or a pair (height, width) "
            f"of positive ints. Received: image_size={image_size!r}"
        )
    return int(pair[0]), int(pair[1])


def _plain(value):
    """`value` with NumPy scalars turned into Python ones, so that messages
    read `x=3`, not `x=np.int64(3)`."""
    return value.item() if isinstance(value, np.generic) else value


def is_int(value):
    """Whether `value` is an integer (Python or NumPy) and not a bool.

    Example:

    >>> is_int(3), is_int(np.int64(3)), is_int(True), is_int(3.0)
    (True, True, False, False)
    """
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_int_array(values, name, ndim):
    """Returns `values` as an int64 NumPy array of `ndim` dimensions.

    Args:
        values: array-like to check (an empty array of any dtype passes).
        name: the argument's name, used in the error.
        ndim: the number of dimensions expected.

    Returns:
        An int64 NumPy array (not copied when `values` already is one).

    Raises:
        ValueError: naming the argument, the expected rank, and the shape
            and dtype received.

    Example:

    >>> check_int_array([[1, 2], [3, 4]], "neighbours", 2).shape
    (2, 2)
    """
    array = np.asarray(values)
    if array.ndim != ndim or (array.size and not np.issubdtype(array.dtype, np.integer)):
        raise ValueError(
            f"Expected `{name}` to be a {ndim}-D integer array. "
            f"Received: {name} with shape {array.shape} and dtype {array.dtype}"
        )
    return array.astype(np.int64, copy=False)


def check_loss_weight(value, name):
    """Returns `value` as a float if it is a number >= 0 (a loss term's weight).

    Args:
        value: the argument to check (a bool is refused).
        name: the argument's name, used in the error.

    Returns:
        `float(value)`.

    Raises:
        ValueError: naming the argument and the value.

    Example:

    >>> check_loss_weight(1, "pixel_weight")
    1.0
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value >= 0:
        raise ValueError(f"`{name}` must be a number >= 0. Received: {name}={value!r}")
    return float(value)


def check_single_output_model(model, name):
    """Checks that `model` is a functional Keras model with one output.

    Args:
        model: the argument to check.
        name: the argument's name, used in the error.

    Returns:
        `model`, unchanged.

    Raises:
        ValueError: naming the argument and the value.

    Example:

    ```python
    check_single_output_model(classifier, "student")  # classifier
    ```
    """
    import keras

    if not isinstance(model, keras.Model) or len(getattr(model, "outputs", None) or []) != 1:
        raise ValueError(
            f"`{name}` must be a functional keras.Model with one output (class "
            f"probabilities). Received: {name}={model!r}"
        )
    return model


def check_choice(value, name, choices):
    """Returns `value` if it is one of `choices`.

    Args:
        value: the argument to check.
        name: the argument's name, used in the error.
        choices: the allowed values (a tuple owned by the module that
            defines them).

    Returns:
        `value`, unchanged.

    Raises:
        ValueError: naming the argument, the choices, and the value.

    Example:

    >>> check_choice("ste", "estimator", ("ste", "gumbel"))
    'ste'
    """
    try:
        allowed = value in choices
    except (TypeError, ValueError):
        # An unhashable value tested against a set, or an array whose
        # comparison has no single truth value.
        allowed = False
    if not allowed:
        raise ValueError(
            f"`{name}` must be one of {tuple(choices)}. Received: {name}={_plain(value)!r}"
        )
    return value


def check_fraction(value, name, low_open=False, high_open=False):
    """Returns `value` as a float if it is a number in the unit interval.

    Args:
        value: the argument to check.
        name: the argument's name, used in the error.
        low_open: whether 0 is excluded.
        high_open: whether 1 is excluded.

    Returns:
        `value` as a Python float.

    Raises:
        ValueError: naming the argument, the interval, and the value, for
            non-numbers (booleans included), NaN and values outside it.

    Example:

    >>> check_fraction(0.25, "ratio", low_open=True)
    0.25
    """
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if ok:
        number = float(value)
        ok = (number > 0 if low_open else number >= 0) and (
            number < 1 if high_open else number <= 1
        )
    if not ok:
        interval = f"{'(' if low_open else '['}0, 1{')' if high_open else ']'}"
        raise ValueError(
            f"`{name}` must be a number in {interval}. Received: {name}={_plain(value)!r}"
        )
    return number


def check_pair(value, name, low=1):
    """`(a, b)` from an int or a pair of ints, each >= `low`.

    Args:
        value: an int, or a list or tuple of two ints.
        name: the argument's name, used in the error.
        low: the smallest allowed entry.

    Returns:
        A tuple of two Python ints.

    Raises:
        ValueError: naming the argument, what was expected, and the value.

    Example:

    >>> check_pair(2, "strides"), check_pair([1, 3], "kernel_size")
    ((2, 2), (1, 3))
    """
    pair = (value, value) if is_int(value) else value
    if (
        not isinstance(pair, (tuple, list))
        or len(pair) != 2
        or any(not is_int(v) or v < low for v in pair)
    ):
        raise ValueError(
            f"`{name}` must be an int >= {low} or a pair of such ints. "
            f"Received: {name}={_plain(value)!r}"
        )
    return int(pair[0]), int(pair[1])
