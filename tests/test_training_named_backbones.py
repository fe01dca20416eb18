"""Fine-tuning a keras.applications backbone named on the command line
(random weights: the tests never download)."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_seltransfer import training
from tests import helpers


@pytest.mark.slow
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


def test_every_copy_of_a_named_backbone_has_the_same_names_and_starting_weights():
    # A keras.applications backbone built twice gets new names for its
    # unnamed layers and new random weights: the frozen reference of DELTA,
    # L2-SP and KTFT must be the network the run starts from, by name.
    config = helpers.small_run_config(backbone="MobileNetV3Small", image_size=32)
    with pytest.warns(UserWarning, match="random weights"):
        load = training.finetuning.backbone_loader(config, 1)
        tuned = load()
    names = [layer.name for layer in tuned.layers]
    start = [np.array(w) for w in tuned.get_weights()]
    for variable in tuned.trainable_variables:  # training moves the tuned copy
        variable.assign(variable + 1.0)
    reference = load()
    assert reference is not tuned
    assert [layer.name for layer in reference.layers] == names
    for got, expected in zip(reference.get_weights(), start):
        np.testing.assert_array_equal(got, expected)
    images = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 3)).astype("float32")
    assert not np.allclose(np.asarray(reference(images)), np.asarray(tuned(images)))


@pytest.mark.slow
def test_delta_on_an_application_with_unnamed_layers(tmp_path):
    # DELTA reads feature maps by layer name from its frozen reference copy.
    target = helpers.write_npz(tmp_path / "target.npz", num_per_class=6, seed=1)
    config = helpers.small_run_config(
        method="delta", target=f"numpy:{target}", backbone="MobileNetV3Small", image_size=32,
        epochs=1, batch_size=8, output_dir=str(tmp_path / "delta"), delta_attention_images=8,
    )
    with pytest.warns(UserWarning, match="random weights"):
        outputs = training.finetune(config)
    assert outputs["report"]["delta"]["layers"]


def test_ktft_and_delta_find_layers_inside_nested_sequential_blocks(tmp_path):
    # A backbone wrapping an application whose blocks are nested models:
    # KTFT and DELTA compare feature maps by the inner layers' names.
    def nested_backbone():
        block = keras.Sequential(
            [keras.layers.Conv2D(4, 3, strides=2, padding="same", name="inner_conv"),
             keras.layers.BatchNormalization(name="inner_bn"),
             keras.layers.ReLU(name="inner_relu")],
            name="inner_block",
        )
        inputs = keras.Input((16, 16, 3))
        x = block(keras.layers.Conv2D(4, 3, padding="same", name="stem")(inputs))
        x = keras.layers.Conv2D(8, 3, strides=2, padding="same", name="top_conv")(x)
        return keras.Model(inputs, keras.layers.GlobalAveragePooling2D(name="pool")(x))

    path = tmp_path / "nested.keras"
    nested_backbone().save(path)
    target = helpers.write_npz(tmp_path / "target.npz", num_per_class=6, seed=1)
    for method in ("ktft", "delta"):
        config = helpers.small_run_config(
            method=method, target=f"numpy:{target}", backbone=str(path), channels=3,
            epochs=1, batch_size=8, output_dir=str(tmp_path / method), delta_attention_images=8,
        )
        report = training.finetune(config)["report"]
        layers = report["ktft"]["layers"] if method == "ktft" else report["delta"]["layers"]
        assert any("inner" in str(name) for name in np.ravel(layers)), layers
