import os
import sys

import keras
import numpy as np
import pytest

from keras_seltransfer.models import backbones
from keras_seltransfer.layers.image_preprocessing import ImagePreprocessing
from keras_seltransfer.models import build_classifier
from keras_seltransfer.models import named_backbones


def test_small_cnn_shape_and_parameter_count():
    model = backbones.small_cnn((64, 64, 1))
    assert tuple(model.output.shape) == (None, 128)
    # 3x3 convs 1->32->64->128->128 without bias, plus 4 params per BN channel.
    convs = 9 * (1 * 32 + 32 * 64 + 64 * 128 + 128 * 128)
    bn = 4 * (32 + 64 + 128 + 128)
    assert model.count_params() == convs + bn == 241312
    assert model.get_layer("features") is model.layers[-1]


def test_small_cnn_rescales_raw_pixels():
    model = backbones.small_cnn((8, 8, 1), widths=(2,))
    pre = model.get_layer("preprocess")
    x = np.full((1, 8, 8, 1), 255.0, "float32")
    np.testing.assert_allclose(pre(x), np.ones_like(x))


def test_small_cnn_stem_stride_halves_resolution():
    strided = backbones.small_cnn((16, 16, 1), widths=(2, 2), stem_stride=2)
    plain = backbones.small_cnn((16, 16, 1), widths=(2, 2), stem_stride=1)
    assert tuple(strided.get_layer("block1_conv").output.shape) == (None, 8, 8, 2)
    assert tuple(plain.get_layer("block1_conv").output.shape) == (None, 16, 16, 2)
    assert strided.count_params() == plain.count_params()


def test_small_cnn_bad_arguments():
    with pytest.raises(ValueError, match="input_shape"):
        backbones.small_cnn((64, 64))
    with pytest.raises(ValueError, match="widths"):
        backbones.small_cnn((8, 8, 1), widths=(4, 0))
    with pytest.raises(ValueError, match="stem_stride"):
        backbones.small_cnn((8, 8, 1), stem_stride=3)


def _saved_classifier(tmp_path, size=16):
    backbone = backbones.small_cnn((size, size, 1), widths=(4, 8))
    model = build_classifier(backbone, 3, head_name="source_head")
    path = str(tmp_path / "pre.keras")
    model.save(path)
    return model, path


def test_load_saved_model_cuts_at_features_and_keeps_weights(tmp_path):
    model, path = _saved_classifier(tmp_path)
    backbone = backbones.load_backbone(path, (16, 16, None))
    assert tuple(backbone.output.shape) == (None, 8)
    assert tuple(backbone.input.shape) == (None, 16, 16, 1)
    x = np.random.default_rng(0).uniform(0, 255, (2, 16, 16, 1)).astype("float32")
    expected = keras.Model(model.input, model.get_layer("features").output)(x)
    np.testing.assert_allclose(backbone(x), expected, rtol=1e-5, atol=1e-6)


def test_load_saved_model_at_another_size_reuses_weights(tmp_path):
    model, path = _saved_classifier(tmp_path, size=16)
    backbone = backbones.load_backbone(path, (24, 24, 1))
    assert tuple(backbone.input.shape) == (None, 24, 24, 1)
    original = model.get_layer("block1_conv").get_weights()[0]
    np.testing.assert_array_equal(backbone.get_layer("block1_conv").get_weights()[0], original)


def test_load_saved_model_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="Backbone file not found"):
        backbones.load_backbone(str(tmp_path / "missing.keras"), (16, 16, 1))
    _, path = _saved_classifier(tmp_path)
    with pytest.raises(ValueError, match="takes 1-channel images"):
        backbones.load_backbone(path, (16, 16, 3))
    with pytest.raises(ValueError, match="has no layer named 'nope'"):
        backbones.load_backbone(path, (16, 16, 1), cut_layer="nope")
    with pytest.raises(ValueError, match="`weights` applies to named backbones"):
        backbones.load_backbone(path, (16, 16, 1), weights="imagenet")


def test_load_keras_file_loads_graphs_deeper_than_the_recursion_limit(tmp_path):
    # Keras rebuilds a saved graph recursively: a 1400-layer chain (the depth
    # of EfficientNetV2L with a filter mask after every conv) passes Python's
    # default limit of 1000 in `keras.saving.load_model`.
    inputs = keras.Input((4,))
    x = inputs
    for i in range(1400):
        x = keras.layers.Activation("linear", name=f"a{i}")(x)
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(10000)
    try:
        path = str(tmp_path / "deep.keras")
        keras.Model(inputs, x).save(path)
    finally:
        sys.setrecursionlimit(limit)
    loaded = backbones.load_keras_file(path)
    assert len(loaded.layers) == 1401
    assert sys.getrecursionlimit() == limit
    x = np.arange(8, dtype="float32").reshape(2, 4)
    np.testing.assert_array_equal(np.asarray(loaded(x)), x)


def test_unsafe_lambda_model_is_refused(tmp_path):
    inputs = keras.Input((4, 4, 1))
    outputs = keras.layers.Lambda(lambda t: t * 2, name="features")(inputs)
    path = str(tmp_path / "lambda.keras")
    keras.Model(inputs, outputs).save(path)
    with pytest.raises(ValueError, match="(?i)unsafe|safe_mode"):
        backbones.load_backbone(path, (4, 4, 1))


@pytest.mark.parametrize("name", ["MobileNetV2", "mobilenet_v2", "resnet50"])
def test_keras_applications_without_weights(name):
    backbone = backbones.load_backbone(name, (32, 32, None))
    assert tuple(backbone.input.shape) == (None, 32, 32, 3)
    assert len(backbone.output.shape) == 2
    # The preprocessing layer and the application's layers form one flat graph.
    assert backbone.get_layer("preprocess") is not None
    assert not any(isinstance(layer, keras.Model) for layer in backbone.layers)


def test_unknown_backbone_lists_names():
    with pytest.raises(ValueError, match="Unknown backbone.*small_cnn.*ResNet50"):
        backbones.load_backbone("resnet9000", (32, 32, 3))
    close = r"Did you mean 'EfficientNetV2B\d'.*spec='efficientnet_v2b'"
    with pytest.raises(ValueError, match=close):
        backbones.load_backbone("efficientnet_v2b", (32, 32, 3))


def _application_constructors():
    return sorted(
        name
        for name in dir(keras.applications)
        if name[0].isupper() and callable(getattr(keras.applications, name))
    )


def test_every_keras_application_is_a_backbone_name():
    # A Keras release adding an application fails here until it is listed.
    assert set(_application_constructors()) <= set(backbones.available_backbones())


@pytest.mark.parametrize("name", _application_constructors())
def test_application_normalisation_equals_its_preprocess_input(name):
    # Independent reference: the application module's own preprocess_input,
    # applied outside the model as its documentation asks; the model built
    # by load_backbone applies its ImagePreprocessing layer plus whatever
    # normalisation the application contains.
    module = sys.modules[getattr(keras.applications, name).__module__]
    pixels = np.random.default_rng(0).uniform(0, 255, (2, 4, 4, 3)).astype("float32")
    mode = named_backbones.APPLICATION_MODES[name]
    ours = ImagePreprocessing(mode)(pixels)
    np.testing.assert_allclose(ours, module.preprocess_input(pixels.copy()), rtol=1e-5, atol=1e-4)


def test_builtin_needs_channels_and_refuses_imagenet():
    with pytest.raises(ValueError, match="channel count"):
        backbones.load_backbone("small_cnn", (32, 32, None))
    with pytest.raises(ValueError, match="no ImageNet weights"):
        backbones.load_backbone("small_cnn", (32, 32, 1), weights="imagenet")


def test_reinitialize_changes_weights_not_architecture():
    model = backbones.small_cnn((16, 16, 1), widths=(4, 8))
    fresh = backbones.reinitialize(model, seed=3)
    assert [l.name for l in fresh.layers] == [l.name for l in model.layers]
    a = model.get_layer("block2_conv").get_weights()[0]
    b = fresh.get_layer("block2_conv").get_weights()[0]
    assert a.shape == b.shape and not np.allclose(a, b)


def test_with_dtype_policy_keeps_head_float32(tmp_path):
    model, _ = _saved_classifier(tmp_path)
    mixed = backbones.with_dtype_policy(model, "mixed_bfloat16")
    assert mixed.get_layer("block1_conv").compute_dtype == "bfloat16"
    assert mixed.get_layer("source_head").compute_dtype == "float32"
    x = np.random.default_rng(0).uniform(0, 255, (2, 16, 16, 1)).astype("float32")
    np.testing.assert_allclose(mixed(x), model(x), atol=0.05)


def test_cut_backbone_pools_feature_maps():
    model = backbones.small_cnn((16, 16, 1), widths=(4, 8))
    trunk = backbones.cut_backbone(model, "block1_relu")
    assert tuple(trunk.output.shape) == (None, 4)
    trunk = backbones.cut_backbone(model, "block1_relu", pooling=None)
    assert tuple(trunk.output.shape) == (None, 8, 8, 4)  # stride-2 stem
    with pytest.raises(ValueError, match="pooling"):
        backbones.cut_backbone(model, "block1_relu", pooling="min")


def test_is_backbone_path():
    assert backbones.is_backbone_path("a/b.keras")
    assert backbones.is_backbone_path(os.path.join("dir", "model"))
    assert not backbones.is_backbone_path("ResNet50")


def _hub_preset(path):
    """A small KerasHub ResNet preset written locally (no download)."""
    keras_hub = pytest.importorskip("keras_hub")
    keras.utils.set_random_seed(0)
    keras_hub.models.ResNetBackbone(
        input_conv_filters=[64], input_conv_kernel_sizes=[3], stackwise_num_filters=[64, 16],
        stackwise_num_blocks=[1, 1], stackwise_num_strides=[1, 2], block_type="basic_block",
        use_pre_activation=False, image_shape=(None, None, 3),
    ).save_to_preset(str(path))
    keras_hub.layers.ResNetImageConverter(
        image_size=(224, 224), scale=1 / 255.0, offset=-0.5
    ).save_to_preset(str(path))
    return f"kerashub:{path}"


def test_kerashub_preset_backbone_from_raw_images(tmp_path):
    from keras_seltransfer.retrieval import ConvBank

    spec = _hub_preset(tmp_path / "preset")
    random = backbones.load_backbone(spec, (32, 32, None))
    pretrained = backbones.load_backbone(spec, (32, 32, None), weights="preset")
    assert tuple(pretrained.input.shape) == (None, 32, 32, 3)
    assert pretrained.output_shape == (None, 16)
    pixels = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 3)).astype("float32")
    # The converter's normalisation, not its resizing, is inside the model.
    np.testing.assert_allclose(
        pretrained.get_layer("preprocess")(pixels), pixels / 255.0 - 0.5, rtol=1e-6, atol=1e-6
    )
    saved = [w.numpy() for w in pretrained.weights]
    assert not all(np.array_equal(a, w.numpy()) for a, w in zip(saved, random.weights))
    # The preset's weights are the ones written.
    reloaded = backbones.load_backbone(spec, (32, 32, 3), weights="preset")
    for a, b in zip(saved, reloaded.weights):
        np.testing.assert_array_equal(a, b.numpy())
    # Saved and loaded in safe mode, as a run's model.keras is.
    path = str(tmp_path / "hub.keras")
    pretrained.save(path)
    np.testing.assert_allclose(
        backbones.load_keras_file(path)(pixels), pretrained(pixels), rtol=1e-5, atol=1e-5
    )
    # The conv bank reaches the convolutions inside the nested KerasHub model.
    responses = ConvBank(pretrained, layers=2)(pixels)
    assert [r.shape[-1] for r in responses] == [64, 64]
    with pytest.raises(ValueError, match=r"None .*'preset'.*Received: weights='imagenet'"):
        backbones.load_backbone(spec, (32, 32, 3), weights="imagenet")
