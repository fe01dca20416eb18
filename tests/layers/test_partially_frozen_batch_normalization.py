"""PartiallyFrozenBatchNormalization: batch norm frozen channel by channel."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_seltransfer.layers.partially_frozen_batch_normalization import (
    PartiallyFrozenBatchNormalization,
)
from tests import helpers

FROZEN = np.array([1.0, 0.0, 1.0, 0.0], np.float32)


def _x(shape=(3, 5, 5, 4), seed=0):
    rng = np.random.default_rng(seed)
    return (rng.normal(0, 1, shape) * [1.0, 3.0, 0.5, 2.0] + [0.0, 4.0, -1.0, 2.0]).astype(
        np.float32
    )


def _layer(momentum=0.9, seed=1, **kwargs):
    layer = PartiallyFrozenBatchNormalization(momentum=momentum, epsilon=1e-3, **kwargs)
    layer.build((None, 5, 5, 4))
    rng = np.random.default_rng(seed)
    weights = [
        rng.uniform(0.5, 2.0, 4),
        rng.normal(0, 0.5, 4),
        rng.normal(0, 0.5, 4),
        rng.uniform(0.5, 2.0, 4),
    ]
    for variable, value in zip(
        (layer.gamma, layer.beta, layer.moving_mean, layer.moving_variance), weights
    ):
        variable.assign(value.astype(np.float32))
    return layer, [w.astype(np.float64) for w in weights]


def _reference(x, gamma, beta, mean, variance, frozen, momentum, eps=1e-3):
    """NumPy: frozen channels normalised with the moving statistics (kept),
    the others with the batch's population statistics (moving averages
    updated)."""
    x = x.astype(np.float64)
    batch_mean = x.mean(axis=(0, 1, 2))
    batch_variance = x.var(axis=(0, 1, 2))
    keep = frozen > 0.5
    use_mean = np.where(keep, mean, batch_mean)
    use_variance = np.where(keep, variance, batch_variance)
    out = (x - use_mean) / np.sqrt(use_variance + eps) * gamma + beta
    new_mean = np.where(keep, mean, momentum * mean + (1 - momentum) * batch_mean)
    new_variance = np.where(keep, variance, momentum * variance + (1 - momentum) * batch_variance)
    return out, new_mean, new_variance


def test_training_mode_matches_numpy_per_channel():
    layer, (gamma, beta, mean, variance) = _layer()
    layer.frozen.assign(FROZEN)
    x = _x()
    out = np.asarray(layer(x, training=True))
    expected, new_mean, new_variance = _reference(x, gamma, beta, mean, variance, FROZEN, 0.9)
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(layer.moving_mean.numpy(), new_mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(layer.moving_variance.numpy(), new_variance, rtol=1e-5, atol=1e-6)
    # Frozen channels' statistics are kept bit for bit.
    np.testing.assert_array_equal(layer.moving_mean.numpy()[[0, 2]], mean[[0, 2]].astype(np.float32))
    np.testing.assert_array_equal(
        layer.moving_variance.numpy()[[0, 2]], variance[[0, 2]].astype(np.float32)
    )


def test_inference_and_untrainable_layer_are_batch_normalization():
    layer, (gamma, beta, mean, variance) = _layer()
    x = _x()
    plain = keras.layers.BatchNormalization(momentum=0.9, epsilon=1e-3)
    plain.build((None, 5, 5, 4))
    plain.set_weights(layer.get_weights()[:4])
    # No channel frozen: BatchNormalization in training mode too.
    np.testing.assert_allclose(layer(x, training=True), plain(x, training=True), atol=1e-5)
    np.testing.assert_allclose(layer.get_weights()[:4], plain.get_weights(), rtol=1e-6)
    layer.frozen.assign(FROZEN)
    np.testing.assert_allclose(layer(x, training=False), plain(x, training=False), atol=1e-6)
    before = [w.copy() for w in layer.get_weights()]
    layer.trainable = False
    expected = (x - before[2]) / np.sqrt(before[3] + 1e-3) * before[0] + before[1]
    np.testing.assert_allclose(layer(x, training=True), expected, rtol=1e-4, atol=1e-4)
    for a, b in zip(layer.get_weights(), before):
        np.testing.assert_array_equal(a, b)


def test_gradient_reaches_only_the_unfrozen_scale_and_offset():
    layer, _ = _layer()
    layer.frozen.assign(FROZEN)
    x = tf.constant(_x())
    weights = tf.constant(np.random.default_rng(3).normal(size=(1, 5, 5, 4)), tf.float32)
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(layer(x, training=True) * weights)
    grad_gamma, grad_beta = tape.gradient(loss, [layer.gamma, layer.beta])
    for grad in (np.asarray(grad_gamma), np.asarray(grad_beta)):
        assert np.all(grad[[0, 2]] == 0) and np.all(grad[[1, 3]] != 0)


def test_compiled_training_steps_train_only_the_unfrozen_channels():
    inputs = keras.Input((5, 5, 4))
    bn = PartiallyFrozenBatchNormalization(name="bn")
    outputs = keras.layers.Dense(1)(keras.layers.GlobalAveragePooling2D()(bn(inputs)))
    model = keras.Model(inputs, outputs)
    bn.frozen.assign(FROZEN)
    before = [w.copy() for w in bn.get_weights()]
    model.compile(keras.optimizers.Adam(0.1), "mse")
    x = _x((8, 5, 5, 4))
    model.fit(x, np.ones((8, 1)), epochs=3, batch_size=4, verbose=0)
    after = bn.get_weights()
    for a, b in zip(after[:4], before[:4]):  # gamma, beta, moving mean, variance
        np.testing.assert_array_equal(a[[0, 2]], b[[0, 2]])
        assert np.all(a[[1, 3]] != b[[1, 3]])
    np.testing.assert_array_equal(after[4], FROZEN)


def test_config_and_keras_round_trip_keep_the_frozen_channels(tmp_path):
    layer = PartiallyFrozenBatchNormalization(momentum=0.8, epsilon=1e-4, name="bn")
    inputs = keras.Input((5, 5, 4))
    model = keras.Model(inputs, layer(inputs))
    layer.frozen.assign(FROZEN)
    layer(_x(), training=True)  # moves the unfrozen channels' statistics
    x = _x(seed=5)
    restored = helpers.assert_layer_round_trip(layer, x, tmp_path, model=model)
    assert (restored.momentum, restored.epsilon) == (0.8, 1e-4)
    np.testing.assert_array_equal(restored.frozen.numpy(), FROZEN)
    np.testing.assert_allclose(restored(x, training=True), layer(x, training=True), atol=1e-6)
    symbolic = PartiallyFrozenBatchNormalization()(keras.Input((5, 5, 4)))
    assert tuple(symbolic.shape) == (None, 5, 5, 4)


def test_channels_first():
    layer = PartiallyFrozenBatchNormalization(axis=1, momentum=0.5, epsilon=1e-3)
    x = np.transpose(_x(), (0, 3, 1, 2))
    layer.build(x.shape)
    layer.frozen.assign(FROZEN)
    out = np.transpose(np.asarray(layer(x, training=True)), (0, 2, 3, 1))
    expected, new_mean, _ = _reference(
        np.transpose(x, (0, 2, 3, 1)), 1.0, 0.0, np.zeros(4), np.ones(4), FROZEN, 0.5
    )
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(layer.moving_mean.numpy(), new_mean, atol=1e-6)


def test_bad_arguments():
    with pytest.raises(ValueError, match=r"`axis`.*must be an int. Received: axis=\[1, 2\]"):
        PartiallyFrozenBatchNormalization(axis=[1, 2])
    with pytest.raises(ValueError, match="renormalization. Received: renorm=True"):
        PartiallyFrozenBatchNormalization(renorm=True)
    layer = PartiallyFrozenBatchNormalization()
    with pytest.raises(ValueError, match="does not take a mask"):
        layer(_x(), mask=tf.ones((3, 5, 5), bool))


def test_recalibration_re_estimates_frozen_channels_too_and_keeps_them_frozen():
    from keras_seltransfer.models.batchnorm import recalibrate_batchnorm

    inputs = keras.Input((5, 5, 4))
    bn = PartiallyFrozenBatchNormalization(name="bn")
    model = keras.Model(inputs, bn(inputs))
    bn.frozen.assign(FROZEN)
    bn.trainable = False
    x = _x((8, 5, 5, 4), seed=7)
    recalibrate_batchnorm(model, x, batch_size=8)
    np.testing.assert_allclose(bn.moving_mean.numpy(), x.mean(axis=(0, 1, 2)), atol=1e-5)
    np.testing.assert_allclose(bn.moving_variance.numpy(), x.var(axis=(0, 1, 2)), rtol=1e-4)
    np.testing.assert_array_equal(bn.frozen.numpy(), FROZEN)
    assert not bn.trainable
