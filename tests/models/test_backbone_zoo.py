"""Every backbone a user brings, through every model transform.

Each `keras.applications` constructor of the installed Keras (random
weights, no top, the smallest input it accepts) and a few KerasHub backbones
built from constructor arguments go through `antialias`, `adafilter`,
`selective_filter_transfer` and a `.keras` save/load of each result; SJFT's
`ConvBank(2)` describes images with it, and `build_multitask_model` gives
its two heads (saved and reloaded too). The
default run checks the smallest models; `pytest -m slow` checks them all.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_seltransfer.layers.base_blur_pool import BaseBlurPool
from keras_seltransfer.models import adafilter
from keras_seltransfer.models import antialias
from keras_seltransfer.models import load_keras_file
from keras_seltransfer.models import selective_filter_transfer
from keras_seltransfer.models.antialiasing import BLUR_SUFFIX
from keras_seltransfer.models.multitask import build_multitask_model
from keras_seltransfer.retrieval.conv_bank import ConvBank

# Every keras.applications constructor, by family (the test fails when Keras
# adds one, so that it joins the zoo).
FAMILIES = {
    "ConvNeXt": ["ConvNeXtTiny", "ConvNeXtSmall", "ConvNeXtBase", "ConvNeXtLarge", "ConvNeXtXLarge"],
    "DenseNet": ["DenseNet121", "DenseNet169", "DenseNet201"],
    "EfficientNet": [f"EfficientNetB{i}" for i in range(8)],
    "EfficientNetV2": [f"EfficientNetV2B{i}" for i in range(4)]
    + ["EfficientNetV2S", "EfficientNetV2M", "EfficientNetV2L"],
    "Inception": ["InceptionV3"],
    "InceptionResNet": ["InceptionResNetV2"],
    "MobileNet": ["MobileNet"],
    "MobileNetV2": ["MobileNetV2"],
    "MobileNetV3": ["MobileNetV3Small", "MobileNetV3Large"],
    "NASNet": ["NASNetMobile", "NASNetLarge"],
    "ResNet": ["ResNet50", "ResNet101", "ResNet152"],
    "ResNetV2": ["ResNet50V2", "ResNet101V2", "ResNet152V2"],
    "VGG": ["VGG16", "VGG19"],
    "Xception": ["Xception"],
}
# Smallest input each accepts (32 for the others).
MIN_SIZE = {"InceptionV3": 75, "InceptionResNetV2": 75, "Xception": 71}
# The default run: the smallest application, with much of what the zoo's
# graph surgery needs (plain operations in its hard-swish, depthwise
# convolutions, squeeze-and-excite products, residual adds); nested
# Sequential models (ConvNeXt) and separable convolutions (NASNet, Xception)
# are covered by small models in test_surgery, test_antialiasing and
# test_gating, and here by the slow run and the KerasHub Xception.
FAST = {"MobileNetV3Small": dict(alpha=0.75)}
TRANSFORMS = (
    "antialias_exact",
    "antialias_shapes",
    "adafilter",
    "selective_filter_transfer",
    "conv_bank",
    "multitask",
)


def _images(size, n=2):
    return np.random.default_rng(0).uniform(0, 255, (n, size, size, 3)).astype("float32")


def _assert_same(got, expected):
    got, expected = np.asarray(got), np.asarray(expected)
    scale = max(1.0, float(np.abs(expected).max()))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * scale)


def _round_trip(model, x, path):
    model.save(path)
    restored = load_keras_file(path)
    _assert_same(restored(x), model(x))


def check_backbone(model, size, tmp_path, transforms=TRANSFORMS):
    """Runs `model` through each transform; returns `{transform: "ok" or the error}`."""
    x = _images(size)
    expected = np.asarray(model(x))
    results = {}
    for transform in transforms:
        try:
            if transform == "antialias_exact":
                new = antialias(model, filt_size=1)
                _assert_same(new(x), expected)
            elif transform == "antialias_shapes":
                new = antialias(model, filt_size=4)
                assert tuple(new.output.shape) == tuple(model.output.shape)
                original = {layer.name: layer for layer in model.layers}
                blurs = [layer for layer in new.layers if isinstance(layer, BaseBlurPool)]
                assert blurs, "no BlurPool inserted"
                for blur in blurs:
                    source = original.get(blur.name[: -len(BLUR_SUFFIX)])
                    if source is not None and blur.name.endswith(BLUR_SUFFIX):
                        assert tuple(blur.output.shape) == tuple(source.output.shape), blur.name
                assert np.asarray(new(x)).shape == expected.shape
            elif transform == "adafilter":
                new = adafilter(model, seed=0)
                _assert_same(new(x), expected)
            elif transform == "conv_bank":
                groups = ConvBank(model, layers=2)(x)
                assert len(groups) == 2, f"{len(groups)} conv groups"
                for group in groups:
                    group = np.asarray(group)
                    assert group.shape[0] == len(x) and group.ndim == 4, group.shape
                    assert np.isfinite(group).all()
                results[transform] = "ok"
                continue
            elif transform == "multitask":
                inputs = keras.Input(model.input_shape[1:])
                pooled = keras.layers.GlobalAveragePooling2D(name="zoo_pool")(model(inputs))
                new = build_multitask_model(keras.Model(inputs, pooled), 5, 3)
                outputs = new(x)
                assert np.asarray(outputs["source"]).shape == (len(x), 5)
                assert np.asarray(outputs["target"]).shape == (len(x), 3)
                np.testing.assert_allclose(np.asarray(outputs["target"]).sum(-1), 1.0, rtol=1e-5)
                path = str(tmp_path / "multitask.keras")
                new.save(path)
                restored = load_keras_file(path)(x)
                for head in ("source", "target"):
                    _assert_same(restored[head], outputs[head])
                results[transform] = "ok"
                continue
            else:
                data = tf.data.Dataset.from_tensor_slices(x).batch(2)
                new = selective_filter_transfer(model, data, ratio=0.5, seed=0)
                assert np.asarray(new(x)).shape == expected.shape
            _round_trip(new, x, str(tmp_path / f"{transform}.keras"))
            results[transform] = "ok"
        except Exception as e:  # noqa: BLE001 - reported in the table
            results[transform] = f"{type(e).__name__}: {e}"
    return results


def _application(name, **kwargs):
    size = MIN_SIZE.get(name, 32)
    model = getattr(keras.applications, name)(
        input_shape=(size, size, 3), weights=None, include_top=False, **kwargs
    )
    return model, size


def test_every_constructor_is_in_the_zoo():
    constructors = {
        name
        for name in dir(keras.applications)
        if name[0].isupper() and callable(getattr(keras.applications, name))
    }
    listed = {name for names in FAMILIES.values() for name in names}
    assert constructors == listed


@pytest.mark.parametrize("name", sorted(FAST))
def test_smallest_applications(name, tmp_path):
    model, size = _application(name, **FAST[name])
    results = check_backbone(model, size, tmp_path)
    assert results == {t: "ok" for t in TRANSFORMS}


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for names in FAMILIES.values() for n in names])
def test_every_application(name, tmp_path):
    model, size = _application(name)
    results = check_backbone(model, size, tmp_path)
    assert results == {t: "ok" for t in TRANSFORMS}


def _keras_hub_backbones(size):
    keras_hub = pytest.importorskip("keras_hub")
    models = keras_hub.models
    shape = (size, size, 3)
    return {
        "ResNetBackbone": lambda: models.ResNetBackbone(
            input_conv_filters=[64],
            input_conv_kernel_sizes=[3],
            stackwise_num_filters=[64, 16],
            stackwise_num_blocks=[1, 1],
            stackwise_num_strides=[1, 2],
            block_type="basic_block",
            image_shape=shape,
        ),
        "VGGBackbone": lambda: models.VGGBackbone(
            stackwise_num_repeats=[1, 1], stackwise_num_filters=[4, 8], image_shape=shape
        ),
        "XceptionBackbone": lambda: models.XceptionBackbone(
            stackwise_conv_filters=[[8, 8], [16, 16]],
            stackwise_pooling=[True, False],
            image_shape=shape,
        ),
        "DenseNetBackbone": lambda: models.DenseNetBackbone(
            stackwise_num_repeats=[1, 1], growth_rate=4, image_shape=shape
        ),
    }


@pytest.mark.parametrize(
    "name", ["ResNetBackbone", "VGGBackbone", "XceptionBackbone", "DenseNetBackbone"]
)
def test_keras_hub_backbones(name, tmp_path):
    model = _keras_hub_backbones(32)[name]()
    results = check_backbone(model, 32, tmp_path)
    assert results == {t: "ok" for t in TRANSFORMS}


def test_keras_hub_blocks_that_subsample_inside_are_named():
    # KerasHub's MobileNet builds blocks as custom layers whose strided
    # convolutions graph surgery cannot reach: antialias says which and how
    # to leave them alone.
    keras_hub = pytest.importorskip("keras_hub")
    model = keras_hub.models.MobileNetBackbone(
        stackwise_expansion=[[4]],
        stackwise_num_blocks=[1],
        stackwise_num_filters=[[8]],
        stackwise_kernel_size=[[3]],
        stackwise_num_strides=[[2]],
        stackwise_se_ratio=[[None]],
        stackwise_activation=[["relu"]],
        stackwise_padding=[[1]],
        output_num_filters=16,
        depthwise_filters=8,
        depthwise_stride=2,
        depthwise_residual=False,
        last_layer_filter=16,
        image_shape=(32, 32, 3),
        input_num_filters=8,
    )
    with pytest.raises(ValueError, match=r"cannot convert layer 'block_0_0' \(DepthwiseConvBlock\).*exclude="):
        antialias(model)
    with pytest.warns(UserWarning, match="graph surgery cannot reach: block_0_0 \\(DepthwiseConvBlock\\)"):
        gated = adafilter(model)
    x = _images(32)
    _assert_same(gated(x), model(x))
