import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_seltransfer.export import export_saved_model
from keras_seltransfer.layers.blur_pool import BlurPool
from keras_seltransfer.models import backbones
from keras_seltransfer.models import build_classifier
from keras_seltransfer.models import set_batchnorm_mode
from keras_seltransfer.models import surgery
from keras_seltransfer.models.antialiasing import aligned_layer_name
from keras_seltransfer.models.antialiasing import antialias
from keras_seltransfer.models.antialiasing import blur_layers


def _images(shape, seed=0):
    return np.random.default_rng(seed).uniform(0, 255, shape).astype("float32")


def _count(weights):
    return int(sum(np.prod(w.shape) for w in weights))


def _randomise_batchnorm(model, seed=0):
    # Non-trivial statistics, so that a BatchNorm running on the wrong map
    # or with lost statistics would show.
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.set_weights(
                [
                    (
                        rng.uniform(0.5, 1.5, w.shape).astype("float32")
                        if i in (0, 3)
                        else rng.normal(0, 0.2, w.shape).astype("float32")
                    )
                    for i, w in enumerate(layer.get_weights())
                ]
            )


def _aligned_maps(original, new, x):
    """Outputs of every original layer and of its counterpart in `new`."""
    names = [
        layer.name
        for layer in original.layers
        if not isinstance(layer, keras.layers.InputLayer)
        and aligned_layer_name(new, layer.name) in {l.name for l in new.layers}
    ]
    names = [
        n
        for n in names
        if tuple(original.get_layer(n).output.shape)
        == tuple(new.get_layer(aligned_layer_name(new, n)).output.shape)
    ]
    before = keras.Model(original.inputs[0], [original.get_layer(n).output for n in names])(x)
    after = keras.Model(
        new.inputs[0], [new.get_layer(aligned_layer_name(new, n)).output for n in names]
    )(x)
    return names, [np.asarray(v) for v in before], [np.asarray(v) for v in after]


def _check_preserved(original, new, x, exact=True):
    """Shapes, weights and parameter counts kept; filt_size=1 outputs equal."""
    assert tuple(new.output.shape) == tuple(original.output.shape)
    assert _count(new.trainable_weights) == _count(original.trainable_weights)
    blur_params = sum(_count(layer.weights) for layer in new.layers if isinstance(layer, BlurPool))
    assert _count(new.weights) == _count(original.weights) + blur_params
    assert all(not layer.trainable_weights for layer in new.layers if isinstance(layer, BlurPool))
    for layer in original.layers:
        if layer.weights:
            for a, b in zip(layer.get_weights(), new.get_layer(layer.name).get_weights()):
                np.testing.assert_array_equal(a, b)
    # Every layer output that is not an intermediate dense map has its shape.
    flat = surgery.flatten(original)
    changed = []
    for layer in flat.layers:
        counterpart = new.get_layer(aligned_layer_name(new, layer.name))
        if tuple(counterpart.output.shape) != tuple(layer.output.shape):
            changed.append(layer.name)
    for name in changed:
        # Only the dense (stride-1) part of a conv -> BN -> activation chain
        # grows (with the inner layers of an activation made of several
        # nodes, such as the hard-swish), and the blur after it restores the
        # shape.
        assert isinstance(
            original.get_layer(name),
            (
                keras.layers.Conv2D,
                keras.layers.DepthwiseConv2D,
                keras.layers.SeparableConv2D,
                keras.layers.ReLU,
                keras.layers.BatchNormalization,
                keras.layers.MaxPooling2D,
                keras.layers.AveragePooling2D,
            ),
        ), name


def test_small_cnn_swaps_and_exact_filt_size_one():
    original = build_classifier(backbones.small_cnn((16, 16, 1), widths=(4, 8, 8)), 3)
    _randomise_batchnorm(original)
    one = antialias(original, filt_size=1)
    four = antialias(original, filt_size=4)
    x = _images((3, 16, 16, 1))
    for new in (one, four):
        _check_preserved(original, new, x)
        assert new.name == original.name
    producers = surgery.producers(four)
    # The stem conv runs at stride 1 (explicit zero padding keeps its grid),
    # BN and ReLU on the dense map, the blur after the activation.
    assert four.get_layer("block1_conv").strides == (1, 1)
    assert four.get_layer("block1_conv").padding == "valid"
    assert four.get_layer("block1_conv_aa_pad").padding == ((0, 2), (0, 2))
    assert producers["block1_relu_blurpool"] == ["block1_relu"]
    assert producers["block1_pool_blurpool"] == ["block1_pool"]
    assert four.get_layer("block1_pool").strides == (1, 1)
    assert four.get_layer("block1_relu_blurpool").filt_size == 4
    assert blur_layers(four) == [
        "block1_relu_blurpool",
        "block1_pool_blurpool",
        "block2_pool_blurpool",
    ]
    names, before, after = _aligned_maps(original, one, x)
    assert "block1_relu" in names and "block2_pool" in names
    for name, a, b in zip(names, before, after):
        np.testing.assert_array_equal(a, b, err_msg=name)
    diff = np.abs(np.asarray(four(x)) - np.asarray(original(x))).max()
    assert diff > 1e-4
    # The model is new: training it leaves the original alone.
    assert not any(a is b for a in four.weights for b in original.weights)


def test_keep_stem_leaves_the_first_downsampling_strided():
    inputs = keras.Input((16, 16, 1), name="image")
    scaled = keras.layers.Rescaling(1 / 255.0, name="scale")(inputs)
    x = keras.layers.ZeroPadding2D(((0, 1), (0, 1)), name="pad")(scaled)
    stem = keras.layers.Conv2D(4, 3, strides=2, activation="relu", name="stem")(x)
    side = keras.layers.Conv2D(4, 1, strides=2, name="side")(scaled)  # also reads the input
    x = keras.layers.Add(name="add")([stem, side])
    x = keras.layers.Conv2D(4, 3, strides=2, padding="same", activation="relu", name="later")(x)
    model = keras.Model(inputs, keras.layers.GlobalAveragePooling2D()(x))
    kept = antialias(model, keep_stem=True)
    assert kept.get_layer("stem").strides == (2, 2) and kept.get_layer("side").strides == (2, 2)
    assert blur_layers(kept) == ["later_blurpool"]
    assert sorted(blur_layers(antialias(model))) == [
        "later_blurpool",
        "side_input_blurpool",
        "stem_blurpool",
    ]
    x = _images((2, 16, 16, 1))
    np.testing.assert_array_equal(
        np.asarray(antialias(model, filt_size=1, keep_stem=True)(x)), np.asarray(model(x))
    )


def test_odd_sizes_and_dynamic_sizes():
    original = build_classifier(backbones.small_cnn((15, 15, 1), widths=(4, 8, 8)), 2)
    _randomise_batchnorm(original, 1)
    x = _images((2, 15, 15, 1))
    one = antialias(original, filt_size=1)
    _check_preserved(original, one, x)
    # An odd size pads 'same' like stride 1 does: no explicit padding needed.
    assert "block1_conv_aa_pad" not in [layer.name for layer in one.layers]
    np.testing.assert_array_equal(np.asarray(one(x)), np.asarray(original(x)))
    dynamic = build_classifier(backbones.small_cnn((None, None, 1), widths=(4, 8)), 2)
    aa = antialias(dynamic, filt_size=3, pad_type="replicate")
    for size in (9, 12):
        x = _images((1, size, size, 1))
        features = keras.Model(aa.inputs[0], aa.get_layer("block2_relu").output)(x)
        reference = keras.Model(dynamic.inputs[0], dynamic.get_layer("block2_relu").output)(x)
        assert features.shape == reference.shape


def _swap_model():
    inputs = keras.Input((24, 24, 3), name="x")
    a = keras.layers.Conv2D(4, 3, strides=2, padding="same", activation="relu", name="fused")(
        inputs
    )
    b = keras.layers.Conv2D(4, 1, strides=2, name="shortcut")(inputs)
    b = keras.layers.BatchNormalization(name="shortcut_bn")(b)
    c = keras.layers.Conv2D(4, 3, strides=2, padding="same", name="linear")(inputs)
    x = keras.layers.Add(name="add")([a, b, c])
    x = keras.layers.DepthwiseConv2D(3, strides=2, padding="same", name="dw")(x)
    x = keras.layers.BatchNormalization(name="dw_bn")(x)
    x = keras.layers.ReLU(6.0, name="dw_relu")(x)
    y = keras.layers.MaxPooling2D(3, strides=2, padding="same", name="maxsame")(x)
    z = keras.layers.AveragePooling2D(3, strides=2, padding="same", name="avgsame")(x)
    x = keras.layers.Concatenate(name="cat")([y, z])
    x = keras.layers.Conv2D(5, 1, activation="relu", name="mix")(x)
    x = keras.layers.AveragePooling2D(2, name="box")(
        keras.layers.ZeroPadding2D(((0, 1), (0, 0)), name="odd")(x)
    )
    x = keras.layers.MaxPooling2D((2, 1), strides=(2, 1), name="tall")(x)
    outputs = keras.layers.Dense(2, activation="softmax", name="head")(keras.layers.Flatten()(x))
    return keras.Model(inputs, outputs)


def test_every_swap_rule_keeps_shapes_and_filt_size_one_outputs():
    original = _swap_model()
    _randomise_batchnorm(original, 2)
    x = _images((2, 24, 24, 3), 3) / 255.0
    one = antialias(original, filt_size=1)
    four = antialias(original, filt_size=4, pad_type="zero")
    _check_preserved(original, one, x)
    _check_preserved(original, four, x)
    np.testing.assert_allclose(np.asarray(one(x)), np.asarray(original(x)), rtol=1e-6, atol=1e-7)
    names, before, after = _aligned_maps(original, one, x)
    for name, a, b in zip(names, before, after):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6, err_msg=name)
    producers = surgery.producers(four)
    # Fused activation: blur after the conv itself.
    assert producers["fused_blurpool"] == ["fused"]
    # A 1x1 conv without activation: blur first, then the conv at stride 1.
    assert producers["shortcut"] == ["shortcut_input_blurpool"]
    assert four.get_layer("shortcut").strides == (1, 1)
    # A 3x3 conv without activation: the conv, then the blur.
    assert producers["linear_blurpool"] == ["linear"]
    # conv -> BN -> activation: the blur after the activation.
    assert producers["dw_relu_blurpool"] == ["dw_relu"]
    assert four.get_layer("dw").strides == (1, 1)
    # 'same' pools: stride 1, then a crop that keeps the sampling grid.
    assert producers["maxsame_blurpool"] == ["maxsame_aa_crop"]
    assert producers["avgsame_blurpool"] == ["avgsame_aa_crop"]
    # A non-overlapping box pool becomes a BlurPool (its odd last row cropped);
    # with filt_size=1 it stays, as in Zhang's code.
    assert "box" not in [layer.name for layer in four.layers]
    assert producers["box_blurpool"] == ["box_aa_crop"]
    assert isinstance(one.get_layer("box"), keras.layers.AveragePooling2D)
    assert four.get_layer("tall_blurpool").strides == (2, 1)
    assert np.abs(np.asarray(four(x)) - np.asarray(original(x))).max() > 1e-5


def test_antialias_twice_changes_nothing_more():
    once = antialias(build_classifier(backbones.small_cnn((16, 16, 1), widths=(4, 8)), 2))
    twice = antialias(once)
    assert [layer.name for layer in twice.layers] == [layer.name for layer in once.layers]
    x = _images((2, 16, 16, 1))
    np.testing.assert_array_equal(np.asarray(twice(x)), np.asarray(once(x)))


def test_save_load_saved_model_and_a_training_step(tmp_path):
    original = build_classifier(backbones.small_cnn((16, 16, 1), widths=(4, 8)), 2)
    model = antialias(original, filt_size=5, pad_type="replicate")
    set_batchnorm_mode(model, "frozen")
    x = _images((4, 16, 16, 1))
    expected = np.asarray(model(x))
    path = str(tmp_path / "aa.keras")
    model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    assert blur_layers(loaded) == blur_layers(model)
    assert loaded.get_layer("block1_relu_blurpool").pad_type == "replicate"
    np.testing.assert_allclose(np.asarray(loaded(x)), expected, rtol=1e-6)
    export = export_saved_model(model, str(tmp_path / "export"))
    reloaded = tf.saved_model.load(export)
    served = reloaded.serve(tf.constant(x.astype("uint8")))
    np.testing.assert_allclose(
        served["probabilities"].numpy(),
        np.asarray(model(x.astype("uint8").astype("float32"))),
        rtol=1e-5,
    )
    model.compile(keras.optimizers.SGD(0.1), "sparse_categorical_crossentropy")
    kernel = model.get_layer("block1_relu_blurpool").kernel.numpy().copy()
    conv = model.get_layer("block1_conv").kernel.numpy().copy()
    model.fit(x, np.array([0, 1, 0, 1]), epochs=1, batch_size=4, verbose=0)
    np.testing.assert_array_equal(model.get_layer("block1_relu_blurpool").kernel.numpy(), kernel)
    assert np.abs(model.get_layer("block1_conv").kernel.numpy() - conv).max() > 0
    # The original's weights were copied, not shared.
    np.testing.assert_array_equal(original.get_layer("block1_conv").kernel.numpy(), conv)


def _application(name):
    return build_classifier(backbones.load_backbone(name, (32, 32, 3)), 3)


def _check_application(model, expected_blurs):
    _randomise_batchnorm(model, 4)
    x = _images((2, 32, 32, 3), 5)
    one = antialias(model, filt_size=1)
    four = antialias(model)
    _check_preserved(model, four, x)
    names, before, after = _aligned_maps(model, one, x)
    for name, a, b in zip(names, before, after):
        # Equal up to float rounding: a 1x1 conv at stride 1 multiplies
        # differently shaped matrices than at stride 2.
        np.testing.assert_allclose(
            a, b, rtol=1e-5, atol=1e-5 * max(1.0, np.abs(a).max()), err_msg=name
        )
    for name in expected_blurs:
        assert name in blur_layers(four), name
    _, before, after = _aligned_maps(model, four, x)
    assert max(np.abs(a - b).max() for a, b in zip(before, after)) > 1e-3
    return model, four


def test_resnet50():
    model, four = _check_application(
        _application("ResNet50"),
        [
            "conv1_relu_blurpool",
            "pool1_pool_blurpool",
            "conv3_block1_1_relu_blurpool",
            "conv3_block1_0_conv_input_blurpool",
            "conv5_block1_0_conv_input_blurpool",
        ],
    )
    kept = antialias(model, keep_stem=True)
    assert kept.get_layer("conv1_conv").strides == (2, 2)
    assert "conv1_relu_blurpool" not in blur_layers(kept) and "pool1_pool_blurpool" in blur_layers(
        kept
    )
    # The shortcut and the 1x1 conv of a conv block both run at stride 1.
    assert four.get_layer("conv3_block1_1_conv").strides == (1, 1)
    assert four.get_layer("conv3_block1_0_conv").strides == (1, 1)
    assert surgery.producers(four)["conv3_block1_0_conv"] == ["conv3_block1_0_conv_input_blurpool"]


@pytest.mark.slow
def test_mobilenet_v2():
    _, four = _check_application(
        _application("MobileNetV2"),
        [
            "Conv1_relu_blurpool",
            "block_1_depthwise_relu_blurpool",
            "block_13_depthwise_relu_blurpool",
        ],
    )
    assert four.get_layer("Conv1_aa_pad").padding == ((0, 2), (0, 2))


@pytest.mark.slow
def test_vgg16():
    _check_application(_application("VGG16"), [f"block{i}_pool_blurpool" for i in range(1, 6)])


@pytest.mark.slow
def test_densenet121():
    _, four = _check_application(
        _application("DenseNet121"),
        ["conv1_relu_blurpool", "pool1_blurpool", "pool2_pool_blurpool", "pool4_pool_blurpool"],
    )
    assert "pool2_pool" not in [layer.name for layer in four.layers]


def test_errors_name_the_layer():
    inputs = keras.Input((8, 8, 2))

    class Block(keras.layers.Layer):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.conv = keras.layers.Conv2D(2, 3, strides=2, padding="same", name="inner")

        def call(self, x):
            return self.conv(x)

    block = keras.Model(inputs, Block(name="block")(inputs))
    with pytest.raises(
        ValueError, match=r"cannot convert layer 'block' \(Block\).*\['inner'\].*exclude='\^block\$'"
    ):
        antialias(block)
    # The suggested option leaves that layer alone.
    assert not blur_layers(antialias(block, exclude="^block$"))
    with pytest.raises(ValueError, match="`exclude` must be a regular expression"):
        antialias(block, exclude="(")
    x = keras.layers.DepthwiseConv2D(3, strides=2, dilation_rate=2, name="dilated")(inputs)
    with pytest.raises(ValueError, match="'dilated'.*dilation"):
        antialias(keras.Model(inputs, x))
    shared = keras.layers.MaxPooling2D(2, name="shared_pool")
    x = keras.layers.Add()([shared(inputs), shared(inputs * 2.0)])
    with pytest.raises(ValueError, match="'shared_pool'.*shared layer"):
        antialias(keras.Model(inputs, x))
    x = keras.layers.PReLU(name="prelu")(keras.layers.Conv2D(2, 3, strides=2)(inputs))
    with pytest.raises(ValueError, match="'prelu'.*shared_axes"):
        antialias(keras.Model(inputs, x))
    model = build_classifier(backbones.small_cnn((16, 16, 1), widths=(4,)), 2)
    with pytest.raises(ValueError, match=r"`filt_size` must be an int in \[1, 7\]"):
        antialias(model, filt_size=0)
    with pytest.raises(ValueError, match="`pad_type` must be one of"):
        antialias(model, pad_type="symmetric")
    with pytest.raises(ValueError, match="Sequential.*build it"):
        antialias(keras.Sequential([keras.layers.MaxPooling2D()]))
    with pytest.raises(ValueError, match="has no layer 'nope'"):
        aligned_layer_name(model, "nope")


def _np_blur(x, filt_size, stride):
    """Reflect-padded binomial blur then subsampling, as Zhang's BlurPool."""
    taps = np.array([1.0])
    for _ in range(filt_size - 1):
        taps = np.convolve(taps, [1.0, 1.0])
    kernel = np.outer(taps, taps) / taps.sum() ** 2
    before, after = (filt_size - 1) // 2, filt_size // 2
    padded = np.pad(x.astype(np.float64), ((0, 0), (before, after), (before, after), (0, 0)), "reflect")
    n, h, w, c = x.shape
    out = np.zeros((n, -(-h // stride), -(-w // stride), c))
    for i in range(out.shape[1]):
        for j in range(out.shape[2]):
            patch = padded[:, i * stride : i * stride + filt_size, j * stride : j * stride + filt_size]
            out[:, i, j] = np.einsum("nhwc,hw->nc", patch, kernel)
    return out


def _hard_swish(x):
    # MobileNetV3's hard-swish, from plain operations on symbolic tensors.
    return x * keras.layers.ReLU(6.0)(x + 3.0) * (1.0 / 6.0)


def test_strided_separable_conv_and_an_activation_of_plain_operations():
    inputs = keras.Input((12, 12, 3))
    x = keras.layers.SeparableConv2D(4, 3, strides=2, padding="same", name="sep")(inputs)
    x = keras.layers.BatchNormalization(name="sep_bn")(x)
    x = keras.layers.ReLU(name="sep_relu")(x)
    x = keras.layers.Conv2D(4, 3, strides=2, padding="same", name="conv")(x)
    x = keras.layers.BatchNormalization(name="conv_bn")(x)
    outputs = _hard_swish(x)
    model = keras.Model(inputs, outputs)
    _randomise_batchnorm(model)
    images = _images((2, 12, 12, 3))
    exact = antialias(model, filt_size=1)
    _check_preserved(model, exact, images)
    np.testing.assert_allclose(exact(images), model(images), rtol=1e-5, atol=1e-4)

    new = antialias(model, filt_size=3)
    graph = surgery.model_graph(new)
    assert new.get_layer("sep").strides == (1, 1) and new.get_layer("conv").strides == (1, 1)
    # The blurs follow the activations: the ReLU layer, and the last node of
    # the hard-swish (a plain multiply, not a layer).
    assert graph.producers["sep_relu_blurpool"] == ["sep_relu"]
    (last,) = graph.producers[blur_layers(new)[-1]]
    assert type(graph.nodes[last]).__name__ == "Multiply"
    assert graph.consumers[last] == [blur_layers(new)[-1]]
    # NumPy reference: the blur of the dense (stride-1) map x * relu6(x + 3),
    # then the hard-swish's last scaling by 1/6 (a linear operation, which
    # the activation does not need to include).
    dense = keras.Model(new.inputs, graph.nodes[last].output)(images)
    expected = _np_blur(np.asarray(dense), 3, 2) / 6.0
    np.testing.assert_allclose(new(images), expected, rtol=1e-4, atol=1e-4)
    assert new.output.shape == model.output.shape
