"""AdaptiveNeighbourGrowth and its rule."""

import math
import os

import keras
import numpy as np
import pytest

from keras_seltransfer.callbacks import AdaptiveNeighbourGrowth
from keras_seltransfer.callbacks import grow_neighbour_counts
from keras_seltransfer.callbacks import prediction_entropy
from keras_seltransfer.data.joint_sampler import JointSampler


def test_entropy_closed_forms():
    p = np.array([[0.5, 0.5], [1.0, 0.0]])
    np.testing.assert_allclose(prediction_entropy(p), [math.log(2), 0.0])
    uniform = np.full((1, 4), 0.25)
    np.testing.assert_allclose(prediction_entropy(uniform), [math.log(4)])
    q = np.array([[0.9, 0.1]])
    np.testing.assert_allclose(prediction_entropy(q), [-(0.9 * math.log(0.9) + 0.1 * math.log(0.1))])
    with pytest.raises(ValueError, match="shape"):
        prediction_entropy(np.array([0.5, 0.5]))


def test_growth_rule_cases():
    counts = np.array([10, 10, 10, 10, 195, 30])
    labels = np.array([0, 0, 0, 1, 1, 0])
    probabilities = np.array(
        [
            [0.2, 0.8],  # misclassified: += 4 * k0
            [0.6, 0.4],  # correct, entropy 0.673 >= delta: += 2 * k0
            [0.99, 0.01],  # correct and confident: unchanged
            [0.45, 0.55],  # correct but uncertain: += 2 * k0
            [0.9, 0.1],  # misclassified near the cap: capped
            [0.7, 0.3],  # correct, entropy 0.611 >= 0.5
        ]
    )
    new, grown = grow_neighbour_counts(
        counts, labels, probabilities, k0=10, sigma0=4, sigma1=2, delta=0.5, k_max=200
    )
    np.testing.assert_array_equal(new, [50, 30, 10, 30, 200, 50])
    np.testing.assert_array_equal(grown, [True, True, False, True, True, True])
    # A higher threshold spares the mildly uncertain ones.
    new, _ = grow_neighbour_counts(
        counts, labels, probabilities, k0=10, sigma0=4, sigma1=2, delta=0.65, k_max=200
    )
    np.testing.assert_array_equal(new, [50, 30, 10, 30, 200, 30])
    with pytest.raises(ValueError, match="same N"):
        grow_neighbour_counts(counts[:2], labels, probabilities, k0=1, delta=0.1, k_max=5)


class _Fixed(keras.layers.Layer):
    """Outputs fixed probabilities per example id (the image's first pixel)."""

    def __init__(self, table, **kwargs):
        super().__init__(**kwargs)
        self.table = np.asarray(table, np.float32)

    def call(self, x):
        ids = keras.ops.cast(x[:, 0, 0, 0], "int32")
        return keras.ops.take(self.table, ids, axis=0)


def test_callback_grows_lists_logs_and_writes_tensorboard(tmp_path):
    rng = np.random.default_rng(0)
    ids = np.stack([rng.permutation(100)[:20] for _ in range(4)])
    sampler = JointSampler.from_neighbours(ids, np.arange(100) % 3, k0=2)
    table = [[0.1, 0.9], [0.95, 0.05], [0.6, 0.4], [0.99, 0.01]]
    labels = np.array([0, 0, 0, 0])
    images = np.broadcast_to(np.arange(4, dtype=np.float32)[:, None, None, None], (4, 2, 2, 1))
    inputs = keras.Input((2, 2, 1))
    model = keras.Model(inputs, {"target": _Fixed(table)(inputs)})
    log_dir = str(tmp_path / "growth")
    growth = AdaptiveNeighbourGrowth(sampler, images, labels, period=2, delta=0.3, log_dir=log_dir)
    growth.set_model(model)
    logs = {}
    growth.on_epoch_end(0, logs)  # not a growth epoch
    np.testing.assert_array_equal(sampler.get_neighbour_counts(), [2, 2, 2, 2])
    assert logs["neighbours_grown"] == 0 and logs["neighbours_mean"] == 2
    growth.on_epoch_end(1, logs)
    # Wrong -> +8; confident -> 2; entropy 0.673 >= 0.3 -> +4; confident -> 2.
    np.testing.assert_array_equal(sampler.get_neighbour_counts(), [10, 2, 6, 2])
    assert logs["neighbours_grown"] == 2 and logs["neighbours_max"] == 10
    growth.on_epoch_end(3, logs)
    np.testing.assert_array_equal(sampler.get_neighbour_counts(), [18, 2, 10, 2])
    for _ in range(3):
        growth.on_epoch_end(5, logs)
    assert sampler.get_neighbour_counts()[0] == 20  # capped at the stored list length
    growth.on_train_end()
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(log_dir))


def test_default_delta_is_half_the_maximum_entropy():
    sampler = JointSampler.from_neighbours(np.array([[0, 1, 2, 3]] * 2), np.zeros(4, int), k0=1)
    # Entropies: 0.325 (below ln2/2 = 0.347) and 0.500 (above).
    table = [[0.9, 0.1], [0.8, 0.2]]
    images = np.arange(2, dtype=np.float32)[:, None, None, None] * np.ones((2, 1, 1, 1), np.float32)
    inputs = keras.Input((1, 1, 1))
    model = keras.Model(inputs, _Fixed(table)(inputs))
    growth = AdaptiveNeighbourGrowth(sampler, images, np.array([0, 0]), period=1)
    growth.set_model(model)
    growth.on_epoch_end(0, {})
    np.testing.assert_array_equal(sampler.get_neighbour_counts(), [1, 3])


def test_callback_errors():
    pool = JointSampler.from_pool(np.arange(5), np.zeros(5, int), 3)
    with pytest.raises(ValueError, match="from_neighbours"):
        AdaptiveNeighbourGrowth(pool, np.zeros((3, 2, 2, 1)), np.zeros(3))
    sampler = JointSampler.from_neighbours(np.array([[0, 1]] * 3), np.zeros(2, int), k0=1)
    with pytest.raises(ValueError, match="3 labels"):
        AdaptiveNeighbourGrowth(sampler, np.zeros((3, 2, 2, 1)), np.zeros(4))
    with pytest.raises(ValueError, match="period"):
        AdaptiveNeighbourGrowth(sampler, np.zeros((3, 2, 2, 1)), np.zeros(3), period=0)
