import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_seltransfer.export import export_saved_model
from keras_seltransfer.export import load_class_names
from keras_seltransfer.models import build_classifier
from keras_seltransfer.models import small_cnn


def _model(channels=1):
    return build_classifier(small_cnn((16, 16, channels), widths=(4, 8)), 3)


def test_reloaded_saved_model_matches_keras(tmp_path):
    model = _model()
    path = export_saved_model(model, str(tmp_path / "export"), class_names=["a", "b", "c"])
    served = tf.saved_model.load(path)
    images = np.random.default_rng(0).integers(0, 256, (4, 16, 16, 1)).astype("uint8")
    out = served.serve(tf.constant(images))
    expected = model(images.astype("float32"), training=False)
    np.testing.assert_allclose(out["probabilities"], expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(out["class_id"], np.argmax(expected, axis=1))
    assert load_class_names(path) == ["a", "b", "c"]


def test_serving_resizes_like_the_pipeline(tmp_path):
    model = _model()
    served = tf.saved_model.load(export_saved_model(model, str(tmp_path / "e")))
    images = np.random.default_rng(1).integers(0, 256, (2, 40, 30, 1)).astype("uint8")
    resized = tf.image.resize(images.astype("float32"), (16, 16), antialias=True)
    np.testing.assert_allclose(
        served.serve(tf.constant(images))["probabilities"], model(resized), rtol=1e-5, atol=1e-6
    )


def test_failed_export_leaves_previous_export(tmp_path):
    path = str(tmp_path / "e")
    export_saved_model(_model(), path)
    before = sorted(os.listdir(path))
    with pytest.raises(FileExistsError):
        export_saved_model(_model(), path, overwrite=False)
    with pytest.raises(ValueError, match="class_names"):
        export_saved_model(_model(), path, class_names=["only_one"])
    assert sorted(os.listdir(path)) == before
    assert [p for p in os.listdir(tmp_path) if p.startswith(".")] == []


def test_multi_output_model_is_refused(tmp_path):
    inputs = keras.Input((4, 4, 1))
    x = keras.layers.Flatten()(inputs)
    model = keras.Model(inputs, [keras.layers.Dense(2)(x), keras.layers.Dense(3)(x)])
    with pytest.raises(ValueError, match="target sub-model"):
        export_saved_model(model, str(tmp_path / "e"))
