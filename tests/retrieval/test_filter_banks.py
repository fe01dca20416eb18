import json
import math

import keras
import numpy as np
import pytest
import tensorflow as tf
from scipy import signal

from keras_seltransfer.models import load_backbone
from keras_seltransfer.models import small_cnn
from keras_seltransfer.models.classifier import iter_layers
from keras_seltransfer.retrieval import gabor_bank
from keras_seltransfer.retrieval.conv_bank import ConvBank
from keras_seltransfer.retrieval.filter_banks import bank_from_config
from keras_seltransfer.retrieval.gabor_bank import gabor_kernels
from keras_seltransfer.retrieval.gabor_bank import GaborBank
from keras_seltransfer.utils import histograms


def _reference_gabor(f, theta, x, y, bandwidth=1.0):
    """Closed-form complex Gabor at pixel offset (x right, y down)."""
    sigma = (
        1.0 / np.pi * np.sqrt(np.log(2) / 2) * (2**bandwidth + 1) / (2**bandwidth - 1) / f
    )
    xr = x * np.cos(theta) + y * np.sin(theta)
    yr = -x * np.sin(theta) + y * np.cos(theta)
    envelope = np.exp(-(xr**2 + yr**2) / (2 * sigma**2)) / (2 * np.pi * sigma**2)
    return envelope * np.exp(1j * 2 * np.pi * f * xr)


def _random_images(shape, seed=0):
    return np.random.default_rng(seed).uniform(0, 255, shape).astype("float32")


# --- Gabor kernels -----------------------------------------------------------


def test_gabor_kernels_equal_closed_form():
    kernels = gabor_kernels()
    assert kernels.shape == (31, 31, 1, 48) and kernels.dtype == np.float32
    h = 15
    freqs = (0.05, 0.1, 0.2, 0.4)
    # (frequency index, orientation index, row, col); the kernel is centred.
    for fi, j, r, c in [(0, 0, 15, 15), (0, 1, 3, 20), (1, 2, 10, 25), (2, 4, 12, 19),
                        (3, 5, 14, 17), (3, 1, 16, 12), (2, 3, 7, 9)]:
        theta = j * np.pi / 6
        expected = _reference_gabor(freqs[fi], theta, x=c - h, y=r - h)
        channel = 2 * (fi * 6 + j)
        real, imag = kernels[r, c, 0, channel], kernels[r, c, 0, channel + 1]
        np.testing.assert_allclose(real, expected.real, rtol=1e-5, atol=1e-9)
        np.testing.assert_allclose(imag, expected.imag, rtol=1e-5, atol=1e-9)
    # Each filter is zero outside its own ceil(3 sigma) square: 5 px for f = 0.4.
    channel = 2 * (3 * 6 + 2)
    assert kernels[h, h + 5, 0, channel] != 0
    assert np.all(kernels[:, : h - 5, 0, channel] == 0)
    assert np.all(kernels[h + 6 :, :, 0, channel + 1] == 0)


def test_gabor_kernels_sizes_and_explicit_size():
    # 3-sigma half sizes 9 (f=0.2) and 5 (f=0.4): size 19, below the cap.
    assert gabor_kernels(frequencies=(0.2, 0.4)).shape == (19, 19, 1, 24)
    assert gabor_kernels(frequencies=(0.4,), num_orientations=4).shape == (11, 11, 1, 8)
    kernels = gabor_kernels(frequencies=(0.05,), num_orientations=2, kernel_size=9)
    assert kernels.shape == (9, 9, 1, 4)
    expected = _reference_gabor(0.05, np.pi / 2, x=4, y=-3)
    np.testing.assert_allclose(kernels[1, 8, 0, 2], expected.real, rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose(kernels[1, 8, 0, 3], expected.imag, rtol=1e-5, atol=1e-9)
    # Another bandwidth changes sigma as the closed form says.
    kernels = gabor_kernels(frequencies=(0.3,), num_orientations=1, bandwidth=1.5)
    h = kernels.shape[0] // 2
    expected = _reference_gabor(0.3, 0.0, x=2, y=1, bandwidth=1.5)
    np.testing.assert_allclose(kernels[h + 1, h + 2, 0, 0], expected.real, rtol=1e-5)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"frequencies": ()}, "frequencies"),
        ({"frequencies": (0.1, 0.6)}, "frequencies"),
        ({"frequencies": (0.0,)}, "frequencies"),
        ({"num_orientations": 0}, "num_orientations"),
        ({"kernel_size": 8}, "kernel_size"),
        ({"bandwidth": 0}, "bandwidth"),
    ],
)
def test_gabor_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=f"{match}=.*"):
        gabor_kernels(**kwargs)
    with pytest.raises(ValueError, match=match):
        GaborBank(**kwargs)


# --- GaborBank ---------------------------------------------------------------


def test_gabor_bank_selects_matching_grating():
    bank = GaborBank()
    assert bank.groups == [("gabor", 48)] and bank.num_channels == 48
    rows, cols = np.mgrid[0:64, 0:64]
    pairs = [(f, j) for f in range(4) for j in range(6)]
    images = []
    for fi, j in pairs:
        f, theta = bank.frequencies[fi], j * np.pi / 6
        phase = 2 * np.pi * f * (cols * np.cos(theta) + rows * np.sin(theta))
        images.append(127.5 + 127.5 * np.cos(phase))
    (responses,) = bank(np.stack(images)[..., None].astype("float32"))
    responses = responses.numpy()[:, 16:48, 16:48]
    energy = (responses[..., 0::2] ** 2 + responses[..., 1::2] ** 2).mean(axis=(1, 2))
    np.testing.assert_array_equal(np.argmax(energy, axis=1), [fi * 6 + j for fi, j in pairs])


@pytest.mark.parametrize("padding, mode", [("symmetric", "same"), ("valid", "valid")])
def test_gabor_bank_equals_scipy_correlation(padding, mode):
    bank = GaborBank(frequencies=(0.2, 0.4), num_orientations=3, kernel_size=7, padding=padding)
    images = _random_images((2, 10, 12, 3))
    (responses,) = bank(images)
    responses = responses.numpy()
    expected_size = (10, 12) if padding == "symmetric" else (4, 6)
    assert responses.shape == (2,) + expected_size + (12,)
    kernels = gabor_kernels(frequencies=(0.2, 0.4), num_orientations=3, kernel_size=7)
    for b in range(2):
        grey = images[b] @ np.array([0.299, 0.587, 0.114]) / 255.0
        for channel in (0, 3, 7, 11):
            expected = signal.correlate2d(
                grey, kernels[:, :, 0, channel], mode=mode, boundary="symm"
            )
            np.testing.assert_allclose(responses[b, :, :, channel], expected, atol=1e-6)


def test_gabor_bank_grey_input_errors_and_config_round_trip():
    bank = GaborBank(frequencies=(0.25,), num_orientations=2, kernel_size=5)
    grey = _random_images((1, 8, 8, 1))
    rgb = np.repeat(grey, 3, axis=-1)
    # Luma weights sum to 1, so a grey image and its RGB copy respond alike.
    np.testing.assert_allclose(bank(grey)[0], bank(rgb)[0], atol=1e-5)
    with pytest.raises(ValueError, match="1 or 3 channels"):
        bank(_random_images((1, 8, 8, 2)))
    with pytest.raises(ValueError, match="images.shape"):
        bank(_random_images((8, 8, 1)))
    with pytest.raises(ValueError, match="at least 15 px"):
        GaborBank()(_random_images((1, 14, 40, 1)))
    with pytest.raises(ValueError, match="padding"):
        GaborBank(padding="same")
    config = json.loads(json.dumps(bank.get_config()))
    assert config["type"] == "gabor"
    rebuilt = bank_from_config(config)
    np.testing.assert_array_equal(rebuilt.kernels, bank.kernels)
    np.testing.assert_array_equal(rebuilt(rgb)[0], bank(rgb)[0])


# --- ConvBank ----------------------------------------------------------------


def _small_cnn_with_random_bn(shape=(16, 16, 1), widths=(4, 8)):
    # Fresh BatchNormalization is nearly the identity, which would hide a
    # tap taken after it: give it statistics far from (0, 1).
    model = small_cnn(shape, widths)
    rng = np.random.default_rng(1)
    for i in range(1, len(widths) + 1):
        bn = model.get_layer(f"block{i}_bn")
        gamma, beta, mean, var = (w.shape for w in bn.get_weights())
        bn.set_weights([rng.uniform(0.5, 2, gamma), rng.normal(0, 1, beta),
                        rng.normal(0, 0.2, mean), rng.uniform(0.2, 2, var)])
    return model


def _outputs(model, names, images):
    sub = keras.Model(model.input, [model.get_layer(n).output for n in names])
    return [np.asarray(o) for o in sub(images, training=False)]


def test_conv_bank_pre_and_post_activation_on_small_cnn():
    model = _small_cnn_with_random_bn()
    images = _random_images((3, 16, 16, 1))
    pre = ConvBank(model)
    assert pre.groups == [("block1_conv", 4), ("block2_conv", 8)] and pre.num_channels == 12
    responses = pre(images)
    assert all(r.dtype == tf.float32 for r in responses)
    for got, want in zip(responses, _outputs(model, ["block1_conv", "block2_conv"], images)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    # The tap is before BatchNormalization, not after.
    bn1 = _outputs(model, ["block1_bn"], images)[0]
    assert np.abs(responses[0].numpy() - bn1).max() > 0.1
    post = ConvBank(model, layers=2, pre_activation=False)
    relus = _outputs(model, ["block1_relu", "block2_relu"], images)
    for got, want in zip(post(images), relus):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def _tiny_vgg():
    inputs = keras.Input((12, 12, 3))
    x = keras.layers.Rescaling(1 / 127.5, offset=-1)(inputs)
    bias = "random_normal"
    x = keras.layers.Conv2D(
        5, 3, padding="same", activation="relu", bias_initializer=bias, name="c1"
    )(x)
    x = keras.layers.DepthwiseConv2D(3, activation="relu", bias_initializer=bias, name="dw")(x)
    x = keras.layers.MaxPooling2D(name="pool")(x)
    x = keras.layers.Conv2D(6, 3, padding="same", activation="relu", name="c3")(x)
    return keras.Model(inputs, x, name="tiny_vgg")


def test_conv_bank_fused_activation_gives_linear_and_activated_outputs():
    model = _tiny_vgg()
    # An independent reference: the same network with linear convolutions.
    linear = keras.models.clone_model(
        model,
        clone_function=lambda layer: layer.__class__.from_config(
            {**layer.get_config(), "activation": "linear"}
            if isinstance(layer, (keras.layers.Conv2D, keras.layers.DepthwiseConv2D))
            else layer.get_config()
        ),
    )
    linear.set_weights(model.get_weights())
    images = _random_images((2, 12, 12, 3))
    c1_linear = linear.get_layer("c1")(linear.layers[1](images))
    dw_linear = linear.get_layer("dw")(model.get_layer("c1")(model.layers[1](images)))

    pre = ConvBank(model, layers=2)
    assert pre.groups == [("c1", 5), ("dw", 5)]
    got_c1, got_dw = [r.numpy() for r in pre(images)]
    np.testing.assert_allclose(got_c1, c1_linear, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got_dw, dw_linear, rtol=1e-5, atol=1e-5)
    assert (got_c1 < 0).any() and (got_dw < 0).any()

    post = ConvBank(model, layers=2, pre_activation=False)
    post_c1, post_dw = [r.numpy() for r in post(images)]
    assert (post_c1 >= 0).all() and (post_dw >= 0).all()
    np.testing.assert_allclose(post_c1, np.maximum(got_c1, 0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(post_dw, np.maximum(got_dw, 0), rtol=1e-5, atol=1e-5)


def test_conv_bank_layers_by_name_and_errors():
    model = _small_cnn_with_random_bn(widths=(4, 8, 6))
    images = _random_images((2, 16, 16, 1))
    bank = ConvBank(model, layers=["block3_conv", "block1_conv"])
    assert bank.groups == [("block3_conv", 6), ("block1_conv", 4)]
    want = _outputs(model, ["block3_conv", "block1_conv"], images)
    for got, w in zip(bank(images), want):
        np.testing.assert_allclose(got, w, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="no layer named 'nope'.*Received: layers="):
        ConvBank(model, layers=["block1_conv", "nope"])
    with pytest.raises(ValueError, match="'block1_bn' is a BatchNormalization.*Received"):
        ConvBank(model, layers=["block1_bn"])
    with pytest.raises(ValueError, match=r"at most .* \(3\)\. Received: layers=4"):
        ConvBank(model, layers=4)
    with pytest.raises(ValueError, match="positive int. Received: layers=0"):
        ConvBank(model, layers=0)
    with pytest.raises(ValueError, match="channel"):
        bank(_random_images((1, 16, 16, 3)))


def test_conv_bank_post_activation_needs_an_activation():
    inputs = keras.Input((8, 8, 2))
    x = keras.layers.Conv2D(2, 3, padding="same", name="c1")(inputs)
    x = keras.layers.Add(name="add")([x, inputs])
    x = keras.layers.ReLU(name="relu")(x)
    model = keras.Model(inputs, x)
    assert ConvBank(model, layers=1).groups == [("c1", 2)]
    with pytest.raises(ValueError, match=r"feeds add \(Add\).*pre_activation=False"):
        ConvBank(model, layers=1, pre_activation=False)


def test_conv_bank_direct_activation_and_nested_model():
    inputs = keras.Input((8, 8, 1))
    x = keras.layers.Conv2D(3, 3, name="c1", bias_initializer="random_normal")(inputs)
    x = keras.layers.Activation("tanh", name="act")(x)
    model = keras.Model(inputs, x)
    images = _random_images((2, 8, 8, 1))
    (post,) = ConvBank(model, layers=1, pre_activation=False)(images)
    (pre,) = ConvBank(model, layers=1)(images)
    np.testing.assert_allclose(post, np.tanh(pre), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(post, model(images), rtol=1e-5, atol=1e-6)



def test_conv_bank_taps_conv_layers_inside_nested_models():
    # A Sequential inside a functional model inside the backbone, as
    # ConvNeXt's stem and a wrapped keras.applications model nest them; the
    # nested model reads an intermediate tensor, as a KerasHub backbone
    # follows its image converter.
    inner_conv = keras.layers.Conv2D(2, 3, name="inner_conv", bias_initializer="random_normal")
    inner = keras.Sequential(
        [keras.Input((8, 8, 1)), inner_conv, keras.layers.ReLU(name="inner_relu")], name="inner"
    )
    middle_inputs = keras.Input((8, 8, 1))
    middle = keras.Model(middle_inputs, inner(middle_inputs), name="middle")
    outer_inputs = keras.Input((8, 8, 1))
    top = keras.layers.Conv2D(3, 3, name="top")
    halved = keras.layers.Rescaling(0.5, name="halve")(outer_inputs)
    outer = keras.Model(outer_inputs, top(middle(halved)))
    images = _random_images((2, 8, 8, 1))

    bank = ConvBank(outer, layers=2)
    assert bank.groups == [("inner_conv", 2), ("top", 3)]
    got_inner, got_top = [r.numpy() for r in bank(images)]
    # Independent reference: each conv applied by hand (NumPy correlation).
    kernel, bias = [w.numpy() for w in inner_conv.weights]
    patches = np.lib.stride_tricks.sliding_window_view(images * 0.5, (3, 3), axis=(1, 2))
    want_inner = np.einsum("bhwcij,ijcf->bhwf", patches, kernel) + bias
    np.testing.assert_allclose(got_inner, want_inner, rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(got_top, top(np.maximum(want_inner, 0)), rtol=1e-4, atol=1e-3)
    (post,) = ConvBank(outer, layers=["inner_conv"], pre_activation=False)(images)
    np.testing.assert_allclose(post, np.maximum(want_inner, 0), rtol=1e-4, atol=1e-3)
    # The backbone itself is unchanged and still computes what it did.
    np.testing.assert_allclose(outer(images), got_top, rtol=1e-5, atol=1e-5)


def test_conv_bank_sees_operation_nodes_that_are_not_layers():
    inputs = keras.Input((8, 8, 2))
    y = keras.layers.Conv2D(2, 3, padding="same", name="c1")(inputs)
    relu = keras.layers.ReLU(name="relu")(y)
    # `y * 2.0` is an operation node of the graph, not a layer.
    model = keras.Model(inputs, keras.layers.Add(name="add")([relu, y * 2.0]))
    assert not any(layer.name.startswith("multiply") for layer in model.layers)
    with pytest.raises(ValueError, match=r"feeds relu \(ReLU\), multiply\S* \(Multiply operation\)"):
        ConvBank(model, layers=1, pre_activation=False)
    images = _random_images((2, 8, 8, 2))
    (pre,) = ConvBank(model, layers=1)(images)
    np.testing.assert_allclose(pre, model.get_layer("c1")(images), rtol=1e-5, atol=1e-5)


def _application(name, size):
    keras.utils.set_random_seed(0)
    return load_backbone(name, (size, size, 3))


@pytest.mark.parametrize(
    "name, size, nested",
    [
        ("MobileNetV3Small", 32, False),
        ("ConvNeXtTiny", 32, True),
        ("NASNetMobile", 32, False),
        ("Xception", 32, False),
    ],
)
def test_conv_bank_describes_images_on_application_backbones(name, size, nested):
    backbone = _application(name, size)
    images = _random_images((2, size, size, 3))
    bank = ConvBank(backbone, layers=2)
    responses = [r.numpy() for r in bank(images)]
    first = bank.layers[0]
    assert (first not in [layer.name for layer in backbone.layers]) == nested
    # Reference: the first conv layer called on what the backbone feeds it.
    producer = backbone.get_layer("convnext_tiny_stem") if nested else backbone.get_layer(first)
    feed = keras.Model(backbone.input, producer.input)(images, training=False)
    want = next(l for l in iter_layers(backbone) if l.name == first)(feed)
    np.testing.assert_allclose(responses[0], want, rtol=1e-4, atol=1e-3)
    assert [r.shape[-1] for r in responses] == [c for _, c in bank.groups]
    assert all(np.isfinite(r).all() and r.std() > 0 for r in responses)
    edges = histograms.fit_bin_edges(bank, tf.data.Dataset.from_tensors(images), num_bins=4, progress=False)
    described = histograms.describe(
        bank, edges, tf.data.Dataset.from_tensors(images), progress=False
    )
    assert described.shape == (2, bank.num_channels, 4)
    np.testing.assert_allclose(described.sum(-1), 1.0, rtol=1e-5)


def test_conv_bank_taps_after_mobilenet_v3_activations_and_names_its_operations():
    backbone = _application("MobileNetV3Small", 32)
    images = _random_images((2, 32, 32, 3))
    (post,) = ConvBank(backbone, layers=["conv"], pre_activation=False)(images)
    # conv -> conv_bn -> hard-swish Activation layer.
    want = keras.Model(backbone.input, backbone.get_layer("activation").output)(images)
    np.testing.assert_allclose(post, want, rtol=1e-4, atol=1e-4)
    # The squeeze-excite conv feeds the `x + 3` of the hard sigmoid.
    with pytest.raises(ValueError, match=r"feeds add\S* \(Add operation\)"):
        ConvBank(
            backbone, layers=["expanded_conv_squeeze_excite_conv_1"], pre_activation=False
        )


def test_conv_bank_config_round_trip():
    model = _small_cnn_with_random_bn()
    bank = ConvBank(model, layers=["block2_conv"], pre_activation=False)
    config = json.loads(json.dumps(bank.get_config()))
    assert config == {"type": "conv", "layers": ["block2_conv"], "pre_activation": False,
                      "backbone": model.name}
    rebuilt = bank_from_config(config, backbone=model)
    images = _random_images((2, 16, 16, 1))
    np.testing.assert_array_equal(rebuilt(images)[0], bank(images)[0])
    with pytest.raises(ValueError, match="backbone=None"):
        bank_from_config(config)
    with pytest.raises(ValueError, match="type"):
        bank_from_config({"type": "wavelet"})
    other = small_cnn((16, 16, 1), (4, 8), name="other")
    with pytest.warns(UserWarning, match="built on backbone"):
        bank_from_config(config, backbone=other)


def test_banks_run_under_mirrored_strategy():
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    images = _random_images((4, 16, 16, 1))
    with strategy.scope():
        model = small_cnn((16, 16, 1), (4, 8))
        banks = [ConvBank(model), GaborBank(frequencies=(0.2,), num_orientations=2)]
    dataset = strategy.experimental_distribute_dataset(
        tf.data.Dataset.from_tensor_slices(images).batch(4)
    )
    for bank in banks:
        step = tf.function(lambda x, bank=bank: bank(x))
        for batch in dataset:
            per_replica = strategy.run(step, args=(batch,))
        for g in range(len(bank.groups)):
            got = np.concatenate(
                [np.asarray(t) for t in strategy.experimental_local_results(per_replica[g])]
            )
            np.testing.assert_allclose(got, bank(images)[g], rtol=1e-5, atol=1e-6)


def test_auto_size_cap_and_dc_of_truncated_kernels():
    assert gabor_bank.MAX_AUTO_KERNEL_SIZE == 31
    # f = 0.05 would need 69 px for +-3 sigma; the cap cuts it to 31 px,
    # which leaves its real part a DC of about -0.067 (documented).
    capped = gabor_kernels(frequencies=(0.05,), num_orientations=1)
    full = gabor_kernels(frequencies=(0.05,), num_orientations=1, kernel_size=69)
    assert capped.shape[0] == 31 and full.shape[0] == 69
    assert math.isclose(float(capped[..., 0].sum()), -0.067, abs_tol=0.002)
    assert math.isclose(float(full[..., 0].sum()), 0.001, abs_tol=0.0005)
    assert abs(float(full[..., 1].sum())) < 1e-6
