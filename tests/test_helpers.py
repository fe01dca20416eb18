"""The shared layer round-trip check fails on layers that lose state."""

import keras
import numpy as np
import pytest

from keras_seltransfer.layers import FilterMask
from tests import helpers


@keras.saving.register_keras_serializable(package="keras_seltransfer_tests")
class ForgetfulScale(keras.layers.Layer):
    """Multiplies by `scale`, but its config drops `scale`."""

    def __init__(self, scale=1.0, **kwargs):
        super().__init__(**kwargs)
        self.scale = scale

    def call(self, inputs):
        return inputs * self.scale

    def get_config(self):
        return super().get_config()


@keras.saving.register_keras_serializable(package="keras_seltransfer_tests")
class ConfiguredScale(ForgetfulScale):
    """Multiplies by `scale`, and its config keeps it."""

    def get_config(self):
        return {**super().get_config(), "scale": self.scale}


@keras.saving.register_keras_serializable(package="keras_seltransfer_tests")
class HiddenOffset(keras.layers.Layer):
    """Adds an offset held in a plain attribute, not a weight: a file loses it."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.offset = np.zeros((), "float32")

    def call(self, inputs):
        return inputs + self.offset


def _x():
    return np.random.default_rng(0).normal(size=(3, 4)).astype("float32")


def test_passes_a_layer_that_round_trips_with_its_weights(tmp_path):
    layer = FilterMask(name="mask")
    layer.build((None, 4))
    layer.mask.assign([1.0, 0.0, 0.5, 0.0])
    restored = helpers.assert_layer_round_trip(layer, _x(), tmp_path)
    np.testing.assert_array_equal(restored.mask.numpy(), [1.0, 0.0, 0.5, 0.0])
    helpers.assert_layer_round_trip(ConfiguredScale(2.0, name="scale"), _x(), tmp_path)


def test_fails_when_get_config_drops_an_argument(tmp_path):
    with pytest.raises(AssertionError, match=r"drops constructor arguments \['scale'\]"):
        helpers.assert_layer_round_trip(ForgetfulScale(2.0), _x(), tmp_path)


def test_fails_when_state_lives_outside_the_weights(tmp_path):
    layer = HiddenOffset(name="offset")
    layer.offset = np.float32(3.0)
    with pytest.raises(AssertionError, match="HiddenOffset.from_config"):
        helpers.assert_layer_round_trip(layer, _x(), tmp_path)
