import numpy as np
import pytest

from keras_seltransfer.utils.validation import check_choice
from keras_seltransfer.utils.validation import check_fraction
from keras_seltransfer.utils.validation import check_int
from keras_seltransfer.utils.validation import check_pair
from keras_seltransfer.utils.validation import image_size_pair
from keras_seltransfer.utils.validation import is_int


def test_check_int_accepts_ints_in_range():
    assert check_int(np.int64(3), "n", 1, 5) == 3 and isinstance(check_int(3, "n", 1), int)


@pytest.mark.parametrize(
    "value, low, high, message",
    [
        (0, 1, None, r"`n` to be a positive int. Received: n=0"),
        (True, 0, None, r"an int >= 0. Received: n=True"),
        (7, 1, 5, r"an int in \[1, 5\]. Received: n=7"),
        (2.0, 1, None, r"Received: n=2.0"),
    ],
)
def test_check_int_errors(value, low, high, message):
    with pytest.raises(ValueError, match=message):
        check_int(value, "n", low, high)


def test_image_size_pair():
    assert image_size_pair(8) == (8, 8) and image_size_pair((4, 6)) == (4, 6)
    for bad in (0, (4,), (4, 0), "8", True):
        with pytest.raises(ValueError, match="image_size"):
            image_size_pair(bad)


def test_is_int():
    assert is_int(3) and is_int(np.int64(3))
    assert not (is_int(True) or is_int(3.0) or is_int("3") or is_int(None))


def test_check_choice():
    assert check_choice("ste", "estimator", ("ste", "gumbel")) == "ste"
    for bad, shown in (("hard", "'hard'"), (np.str_("hard"), "'hard'"), ([1], r"\[1\]")):
        with pytest.raises(
            ValueError,
            match=rf"`estimator` must be one of \('ste', 'gumbel'\). Received: estimator={shown}$",
        ):
            check_choice(bad, "estimator", ("ste", "gumbel"))


def test_check_choice_with_an_array_value():
    with pytest.raises(ValueError, match="`mode` must be one of"):
        check_choice(np.array([1, 2]), "mode", (1, 2))


@pytest.mark.parametrize(
    "value, low_open, high_open, expected",
    [(0, False, False, 0.0), (1, False, False, 1.0), (np.float32(0.5), True, True, 0.5)],
)
def test_check_fraction_accepts(value, low_open, high_open, expected):
    result = check_fraction(value, "ratio", low_open=low_open, high_open=high_open)
    assert result == expected and type(result) is float


@pytest.mark.parametrize(
    "value, low_open, high_open, message",
    [
        (0, True, False, r"`ratio` must be a number in \(0, 1\]. Received: ratio=0$"),
        (1, False, True, r"in \[0, 1\). Received: ratio=1$"),
        (1.5, False, False, r"in \[0, 1\]. Received: ratio=1.5$"),
        (np.float64(-0.5), False, False, r"Received: ratio=-0.5$"),
        (float("nan"), False, False, r"Received: ratio=nan$"),
        (True, False, False, r"Received: ratio=True$"),
        ("0.5", False, False, r"Received: ratio='0.5'$"),
    ],
)
def test_check_fraction_errors(value, low_open, high_open, message):
    with pytest.raises(ValueError, match=message):
        check_fraction(value, "ratio", low_open=low_open, high_open=high_open)


def test_check_pair():
    assert check_pair(2, "strides") == (2, 2)
    assert check_pair([1, np.int64(3)], "kernel_size") == (1, 3)
    assert check_pair((0, 0), "padding", low=0) == (0, 0)
    for bad in (0, (1,), (1, 2, 3), (1, 0), (1.0, 2), True, (True, 1), "22"):
        with pytest.raises(
            ValueError, match=r"`strides` must be an int >= 1 or a pair of such ints. Received"
        ):
            check_pair(bad, "strides")
    with pytest.raises(ValueError, match=r"Received: strides=0$"):
        check_pair(np.int64(0), "strides")
