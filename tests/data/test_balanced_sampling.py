"""Class-balanced sampling of the single-task pipeline (`sampling="balanced"`)."""

import numpy as np
import pytest
import tensorflow as tf

from keras_seltransfer.data.pipeline import make_dataset
from keras_seltransfer.data.readers import from_numpy
from keras_seltransfer.training import loop
from tests import helpers

COUNTS = (60, 15, 5)  # a 75% / 19% / 6% class imbalance


def _imbalanced_source(seed=0):
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(len(COUNTS)), COUNTS)
    images = rng.integers(0, 256, (len(labels), 4, 4, 1), dtype=np.uint8)
    # Pixel (0, 0) encodes the label, so an image can be checked against it.
    images[:, 0, 0, 0] = labels * 100
    return from_numpy(images, labels)


def _labels(dataset, batches):
    return np.concatenate([y.numpy() for _, y in dataset.take(batches)])


def test_balanced_sampling_draws_classes_equally():
    source = _imbalanced_source()
    dataset = make_dataset(
        source, 4, 16, training=True, repeat=True, seed=3, augment="none", sampling="balanced"
    )
    images, labels = [], []
    for x, y in dataset.take(250):
        images.append(x.numpy())
        labels.append(y.numpy())
    images, labels = np.concatenate(images), np.concatenate(labels)
    assert images.shape[0] == labels.shape[0] == 250 * 16  # batch sizes unchanged
    np.testing.assert_array_equal(images[:, 0, 0, 0], labels * 100)  # images keep their labels
    frequencies = np.bincount(labels, minlength=3) / len(labels)
    # Each class has probability 1/3 per draw; five binomial standard
    # deviations of a frequency over 4000 draws is 0.037, while uniform
    # sampling would give 0.75 / 0.19 / 0.06.
    bound = 5 * np.sqrt((1 / 3) * (2 / 3) / len(labels))
    np.testing.assert_allclose(frequencies, 1 / 3, atol=bound)
    # Every image of the minority class recurs.
    minority = images[labels == 2].reshape(-1, 16)
    assert len(np.unique(minority, axis=0)) == COUNTS[2]


def test_uniform_sampling_is_unchanged():
    source = _imbalanced_source()
    default = make_dataset(source, 4, 16, training=True, repeat=True, seed=3, augment="none")
    uniform = make_dataset(
        source, 4, 16, training=True, repeat=True, seed=3, augment="none", sampling="uniform"
    )
    np.testing.assert_array_equal(_labels(default, 20), _labels(uniform, 20))
    # One epoch (80 images = 5 batches) draws every image once.
    epoch = _labels(uniform, 5)
    np.testing.assert_array_equal(np.bincount(epoch, minlength=3), COUNTS)


def test_balanced_sampling_is_deterministic_under_a_seed():
    source = _imbalanced_source()

    def draw(seed):
        tf.random.set_seed(0)
        dataset = make_dataset(
            source, 4, 8, training=True, repeat=True, seed=seed, sampling="balanced"
        )
        return [(x.numpy(), y.numpy()) for x, y in dataset.take(12)]

    first, again, other = draw(5), draw(5), draw(6)
    for (xa, ya), (xb, yb) in zip(first, again):
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ya, yb)
    assert not all(np.array_equal(ya, yc) for (_, ya), (_, yc) in zip(first, other))


def test_classifier_data_keeps_steps_per_epoch_and_balances(tmp_path):
    source = _imbalanced_source()
    strategy = tf.distribute.get_strategy()
    steps = {}
    for sampling in ("uniform", "balanced"):
        config = helpers.small_run_config(
            target="numpy:unused", backbone="small_cnn", image_size=8
        )
        train_data, _, steps[sampling] = loop.classifier_data(
            strategy, source, source, config, channels=1, sampling=sampling
        )
        if sampling == "balanced":
            labels = _labels(train_data(0), 100)
    assert steps["uniform"] == steps["balanced"] == 5  # ceil(80 / 16)
    frequencies = np.bincount(labels, minlength=3) / len(labels)
    np.testing.assert_allclose(frequencies, 1 / 3, atol=5 * np.sqrt(2 / 9 / len(labels)))


def test_balanced_sampling_errors():
    source = _imbalanced_source()
    with pytest.raises(ValueError, match=r"Received: sampling='balanced', training=True, repeat=False"):
        make_dataset(source, 4, 8, training=True, sampling="balanced")
    with pytest.raises(ValueError, match=r"Received: sampling='weighted'"):
        make_dataset(source, 4, 8, training=True, repeat=True, sampling="weighted")
    with pytest.raises(ValueError, match=r"--method=sjft draws its own batches. Received: sampling="):
        helpers.small_run_config(method="sjft", sampling="balanced")
    with pytest.raises(ValueError, match=r"`sampling` must be one of \('uniform', 'balanced'\)"):
        helpers.small_run_config(sampling="oversample")
