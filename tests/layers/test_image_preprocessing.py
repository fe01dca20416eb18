import keras
import numpy as np
import pytest

from keras_seltransfer.layers import ImagePreprocessing
from tests import helpers


def _reference(x, mode):
    x = x.astype(np.float64)
    if mode == "rescale":
        return x / 255.0
    if mode == "tf":
        return x / 127.5 - 1.0
    if mode == "torch":
        return (x / 255.0 - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
    if mode == "caffe":
        return x[..., ::-1] - np.array([103.939, 116.779, 123.68])
    return x


@pytest.mark.parametrize("mode", ["none", "rescale", "tf", "torch", "caffe"])
def test_matches_numpy_reference(mode):
    x = np.random.default_rng(0).uniform(0, 255, size=(2, 5, 4, 3)).astype("float32")
    out = ImagePreprocessing(mode)(x)
    np.testing.assert_allclose(np.asarray(out), _reference(x, mode), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("mode", ["tf", "caffe"])
def test_matches_keras_applications_preprocess_input(mode):
    x = np.random.default_rng(1).uniform(0, 255, size=(2, 4, 4, 3)).astype("float32")
    expected = keras.applications.imagenet_utils.preprocess_input(x.copy(), mode=mode)
    np.testing.assert_allclose(np.asarray(ImagePreprocessing(mode)(x)), expected, atol=1e-4)


def test_config_round_trip_and_keras_save(tmp_path):
    layer = ImagePreprocessing("caffe", name="pre")
    x = np.random.default_rng(2).uniform(0, 255, (1, 4, 4, 3)).astype("float32")
    restored = helpers.assert_layer_round_trip(layer, x, tmp_path)
    assert restored.mode == "caffe" and restored.name == "pre"


def test_symbolic_shape():
    out = ImagePreprocessing("tf")(keras.Input((7, 5, 3)))
    assert tuple(out.shape) == (None, 7, 5, 3)


def test_bad_mode_and_channels():
    with pytest.raises(ValueError, match="`mode` must be one of"):
        ImagePreprocessing("bgr")
    with pytest.raises(ValueError, match="needs RGB inputs with 3 channels"):
        ImagePreprocessing("caffe")(keras.Input((4, 4, 1)))
