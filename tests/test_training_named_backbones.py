"""Fine-tuning a keras.applications backbone named on the command line
(random weights: the tests never download)."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_seltransfer import training
from tests import helpers


@pytest.mark.parametrize("method", ["baseline", "l2sp"])
def test_finetune_a_keras_application_by_name(tmp_path, method):
    target = helpers.write_npz(tmp_path / "target.npz", num_per_class=12, seed=1)
    config = helpers.small_run_config(
        method=method, target=f"numpy:{target}", backbone="MobileNetV2", image_size=32,
        epochs=1, batch_size=8, output_dir=str(tmp_path / method), export=method == "baseline",
    )
    with pytest.warns(UserWarning, match="starts from random weights.*imagenet"):
        outputs = training.finetune(config)
    assert outputs["report"]["backbone"] == "MobileNetV2"
    model = keras.saving.load_model(outputs["model"])
    # The application's normalisation ("tf": x / 127.5 - 1) sits in the
    # model, so the saved classifier takes raw grey images made RGB.
    assert model.get_layer("preprocess").mode == "tf"
    images = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    probabilities = np.asarray(model(images.astype("float32"), training=False))
    np.testing.assert_allclose(probabilities.sum(-1), 1.0, rtol=1e-5)
    if method == "baseline":
        serve = tf.saved_model.load(outputs["saved_model"]).signatures["serving_default"]
        served = serve(tf.constant(images))["probabilities"].numpy()
        np.testing.assert_allclose(served, probabilities, rtol=1e-4, atol=1e-5)
