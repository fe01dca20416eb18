import numpy as np
import pytest

from keras_seltransfer.utils.validation import check_int
from keras_seltransfer.utils.validation import image_size_pair


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
