"""Argument checks shared across the package, with uniform error messages."""

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
