"""FilterMask: per-channel mask held in non-trainable weights."""

import keras
import numpy as np
import pytest

from keras_seltransfer.layers.filter_mask import FilterMask
from tests import helpers


def _x(shape=(2, 3, 3, 4), seed=0):
    return np.random.default_rng(seed).normal(0, 100, shape).astype(np.float32)


def test_matches_numpy_and_masked_channels_are_exactly_zero():
    layer = FilterMask()
    x = _x()
    np.testing.assert_array_equal(layer(x), x)  # starts as the identity
    mask = np.array([1.0, 0.0, 0.5, 0.0], np.float32)
    layer.mask.assign(mask)
    out = np.asarray(layer(x))
    np.testing.assert_array_equal(out, x * mask)
    assert np.all(out[..., [1, 3]] == 0)
    # `transferred` is a record only: it never changes the output.
    layer.transferred.assign([0.0, 1.0, 0.0, 1.0])
    np.testing.assert_array_equal(layer(x), out)
    assert [w.name for w in layer.weights] == ["mask", "transferred"]
    assert not layer.trainable_weights and len(layer.non_trainable_weights) == 2


def test_channels_first_axis_and_symbolic_call():
    layer = FilterMask(axis=1)
    x = _x((2, 3, 4, 4))
    symbolic = layer(keras.Input((3, 4, 4)))
    assert tuple(symbolic.shape) == (None, 3, 4, 4)
    layer.mask.assign([0.0, 1.0, 2.0])
    np.testing.assert_array_equal(layer(x), x * np.array([0.0, 1.0, 2.0])[None, :, None, None])


def test_config_and_keras_round_trip_keep_the_mask(tmp_path):
    layer = FilterMask(axis=-1, name="m")
    inputs = keras.Input((3, 3, 4))
    model = keras.Model(inputs, layer(keras.layers.Conv2D(4, 1)(inputs)))
    layer.mask.assign([1.0, 0.0, 1.0, 0.0])
    layer.transferred.assign([1.0, 1.0, 0.0, 0.0])
    restored = helpers.assert_layer_round_trip(layer, _x((2, 3, 3, 4)), tmp_path, model=model)
    assert restored.axis == -1
    np.testing.assert_array_equal(restored.mask.numpy(), [1, 0, 1, 0])
    np.testing.assert_array_equal(restored.transferred.numpy(), [1, 1, 0, 0])


def test_training_step_leaves_the_mask_and_masked_filter_alone():
    inputs = keras.Input((4, 4, 2))
    conv = keras.layers.Conv2D(3, 3, padding="same", name="conv")
    mask = FilterMask(name="mask")
    x = mask(conv(inputs))
    outputs = keras.layers.Dense(1)(keras.layers.GlobalAveragePooling2D()(x))
    model = keras.Model(inputs, outputs)
    mask.mask.assign([1.0, 0.0, 1.0])
    kernel = conv.kernel.numpy().copy()
    model.compile(keras.optimizers.SGD(0.1), "mse")
    model.fit(_x((8, 4, 4, 2)), np.ones((8, 1)), epochs=1, batch_size=8, verbose=0)
    np.testing.assert_array_equal(mask.mask.numpy(), [1.0, 0.0, 1.0])
    after = conv.kernel.numpy()
    # The pruned filter gets no gradient; the others train.
    np.testing.assert_array_equal(after[..., 1], kernel[..., 1])
    assert np.abs(after[..., [0, 2]] - kernel[..., [0, 2]]).max() > 0


def test_errors():
    with pytest.raises(ValueError, match="`axis` must be an int"):
        FilterMask(axis="last")
    with pytest.raises(ValueError, match="known channel dimension"):
        FilterMask()(keras.Input((3, None)))
    with pytest.raises(ValueError, match="rank >= 2"):
        FilterMask(axis=3).build((None, 4))
