import keras
import numpy as np
import pytest

from keras_seltransfer.evaluation import accuracy_vs_shift
from keras_seltransfer.evaluation import shift_consistency


def _pixel_reader(size=6):
    """Predicts class 1 when the top-left pixel of its input is 1, else 0."""
    inputs = keras.Input((size, size, 1))
    x = keras.layers.Cropping2D(((0, size - 1), (0, size - 1)))(inputs)
    x = keras.layers.Flatten()(x)
    dense = keras.layers.Dense(2, activation="softmax")
    outputs = dense(x)
    dense.set_weights([np.array([[-4.0, 4.0]], "float32"), np.array([2.0, -2.0], "float32")])
    return keras.Model(inputs, outputs)


def _mean_reader(size=6):
    """Predicts from the global mean: exactly invariant to circular shifts."""
    inputs = keras.Input((size, size, 1))
    x = keras.layers.GlobalAveragePooling2D()(inputs)
    dense = keras.layers.Dense(2, activation="softmax")
    outputs = dense(x)
    dense.set_weights([np.array([[-1.0, 1.0]], "float32"), np.array([0.5, -0.5], "float32")])
    return keras.Model(inputs, outputs)


def _checkerboards(n=3, size=6):
    board = (np.add.outer(np.arange(size), np.arange(size)) % 2).astype("float32")
    # Alternate phases so both classes occur at the unshifted position.
    images = np.stack([board if i % 2 == 0 else 1.0 - board for i in range(n)])
    return images[..., None], np.array([i % 2 for i in range(n)])


def test_one_pixel_model_on_checkerboards_gives_the_hand_computed_value():
    # The top-left pixel of a crop at offset (dy, dx) of a reflect-padded
    # checkerboard has the parity of dy + dx. With offsets uniform on
    # {0, 1, 2} per axis, P(dy + dx even) = (2/3)^2 + (1/3)^2 = 5/9, and two
    # independent shifts agree with probability (5/9)^2 + (4/9)^2 = 41/81.
    model, (images, _) = _pixel_reader(), _checkerboards()
    assert shift_consistency(model, images, max_shift=1, num_pairs=None) == pytest.approx(41 / 81)
    # max_shift=2: P(even) = (3/5)^2 + (2/5)^2 = 13/25; agreement 313/625.
    assert shift_consistency(model, images, max_shift=2, num_pairs=None) == pytest.approx(313 / 625)
    # Random pairs estimate the same expectation.
    estimate = shift_consistency(model, images, max_shift=1, num_pairs=300, seed=0)
    assert abs(estimate - 41 / 81) < 4 * np.sqrt(0.25 / 900)
    assert shift_consistency(model, images, max_shift=1, num_pairs=300, seed=0) == estimate


def test_shift_invariant_model_is_fully_consistent():
    images = np.random.default_rng(0).uniform(0, 1, (5, 6, 6, 1)).astype("float32")
    images[::2] += 0.6  # both classes present
    model = _mean_reader()
    assert shift_consistency(model, images, max_shift=2, num_pairs=None, pad_mode="wrap") == 1.0
    assert shift_consistency(model, images, max_shift=2, num_pairs=20, pad_mode="wrap") == 1.0
    # Zero shift only: every model is consistent.
    assert shift_consistency(_pixel_reader(), images, max_shift=0, num_pairs=None) == 1.0


def test_accuracy_vs_shift_on_checkerboards():
    model, (images, labels) = _pixel_reader(), _checkerboards(4)
    result = accuracy_vs_shift(model, images, labels, max_shift=2, direction="horizontal")
    assert result["shifts"] == [-2, -1, 0, 1, 2]
    # An odd horizontal shift flips the parity of the read pixel.
    assert result["accuracy"] == [1.0, 0.0, 1.0, 0.0, 1.0]
    assert result["agreement"] == [1.0, 0.0, 1.0, 0.0, 1.0]
    diagonal = accuracy_vs_shift(model, images, labels, max_shift=2)
    assert diagonal["accuracy"] == [1.0] * 5  # dy + dx stays even


def test_images_with_real_margins():
    # pad_mode=None takes images larger by max_shift on each side.
    model = _pixel_reader()
    board = _checkerboards(2, size=8)[0]
    padded = shift_consistency(model, board[:, 1:7, 1:7], max_shift=1, num_pairs=None)
    margin = shift_consistency(model, board, max_shift=1, num_pairs=None, pad_mode=None)
    assert margin == pytest.approx(41 / 81) and padded == pytest.approx(41 / 81)


def test_bad_arguments():
    model, (images, labels) = _pixel_reader(), _checkerboards()
    with pytest.raises(ValueError, match="`max_shift` must be an int >= 0"):
        shift_consistency(model, images, max_shift=-1)
    with pytest.raises(ValueError, match="`pad_mode` must be one of"):
        shift_consistency(model, images, pad_mode="mirror")
    with pytest.raises(ValueError, match="`num_pairs` must be a positive int or None"):
        shift_consistency(model, images, max_shift=1, num_pairs=0)
    with pytest.raises(ValueError, match=r"model's input size \(6, 6\)"):
        shift_consistency(model, images[:, :5], max_shift=1)
    with pytest.raises(ValueError, match="plus a margin"):
        shift_consistency(model, images, max_shift=1, pad_mode=None)
    with pytest.raises(ValueError, match="`direction` must be one of"):
        accuracy_vs_shift(model, images, labels, direction="up")
    with pytest.raises(ValueError, match="`labels` must be"):
        accuracy_vs_shift(model, images, labels[:2], max_shift=1)
