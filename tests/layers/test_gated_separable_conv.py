import keras
import numpy as np
import pytest

from keras_seltransfer.layers.gated_separable_conv import GatedSeparableConv
from tests import helpers
from tests.layers.test_gated_conv import EPS
from tests.layers.test_gated_conv import assign_random
from tests.layers.test_gated_conv import np_bn
from tests.layers.test_gated_conv import np_conv


def _np_separable(x, depthwise, pointwise, strides, padding, dilation):
    """Depthwise convolution, then the 1x1 pointwise one, in float64."""
    y = np_conv(x, depthwise, strides, padding, dilation, depthwise=True)
    return np.einsum("nhwc,cf->nhwf", y, pointwise[0, 0].astype(np.float64))


def _model(layer, shape=(9, 9, 3), filters=5):
    images = keras.Input(shape, name="x")
    gates = keras.Input((filters,), name="g")
    return keras.Model([images, gates], layer(images, gates))


CASES = {
    "same": dict(kernel_size=3, padding="same"),
    "strided_multiplier": dict(kernel_size=3, strides=2, depth_multiplier=2, padding="same"),
    "dilated_valid": dict(kernel_size=(3, 2), dilation_rate=2, padding="valid"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_numpy_reference_with_mixed_gates(case):
    rng = np.random.default_rng(0)
    x = rng.normal(0, 1, (3, 9, 9, 3)).astype("float32")
    layer = GatedSeparableConv(5, **CASES[case], batchnorm=True, epsilon=EPS, activation="relu")
    gates = rng.integers(0, 2, (3, 5)).astype("float32")
    layer(x, gates)
    values = assign_random(layer, rng)
    paths = []
    for prefix in ("pretrained_", ""):
        y = _np_separable(
            x,
            values[prefix + "kernel"],
            values[prefix + "pointwise_kernel"],
            layer.strides,
            layer.padding,
            layer.dilation_rate,
        )
        y = y + values[prefix + "bias"]
        y = np_bn(
            y,
            values[prefix + "moving_mean"],
            values[prefix + "moving_variance"],
            values[prefix + "gamma"],
            values[prefix + "beta"],
        )
        paths.append(np.maximum(y, 0))
    pre, ft = paths
    assert np.abs(pre - ft).max() > 0.1  # the two paths really differ
    g = gates[:, None, None, :]
    got = np.asarray(layer(x, gates, training=False))
    assert got.shape == layer.compute_output_shape(x.shape, gates.shape)
    np.testing.assert_allclose(got, (1 - g) * pre + g * ft, rtol=1e-4, atol=1e-4)


def test_loaded_from_a_separable_conv_it_computes_it_whatever_the_gates():
    rng = np.random.default_rng(1)
    x = rng.normal(0, 1, (4, 8, 8, 3)).astype("float32")
    sep = keras.layers.SeparableConv2D(5, 3, strides=2, padding="same", depth_multiplier=2)
    expected = np.asarray(sep(x))
    for w in sep.weights:
        w.assign(rng.normal(0, 0.5, w.shape).astype("float32"))
    expected = np.asarray(sep(x))
    layer = GatedSeparableConv(5, 3, strides=2, padding="same", depth_multiplier=2)
    layer(x, np.zeros((4, 5), "float32"))
    layer.load_pretrained(sep.depthwise_kernel, sep.pointwise_kernel, bias=sep.bias)
    for gates in (np.zeros((4, 5)), np.ones((4, 5)), rng.integers(0, 2, (4, 5))):
        np.testing.assert_allclose(
            layer(x, gates.astype("float32")), expected, rtol=1e-5, atol=1e-5
        )
    with pytest.raises(ValueError, match=r"`pointwise_kernel` must have shape \(1, 1, 6, 5\)"):
        layer.load_pretrained(sep.depthwise_kernel, np.ones((1, 1, 3, 5)))


def test_config_round_trip_keras_file_and_one_training_step(tmp_path):
    layer = GatedSeparableConv(
        5, 3, depth_multiplier=2, padding="same", batchnorm=True, activation="relu",
        pointwise_regularizer=keras.regularizers.L2(1e-3), name="gated_sep",
    )
    model = _model(layer)
    rng = np.random.default_rng(2)
    assign_random(layer, rng)
    x = rng.normal(0, 1, (4, 9, 9, 3)).astype("float32")
    g = rng.integers(0, 2, (4, 5)).astype("float32")
    restored = helpers.assert_layer_round_trip(layer, [x, g], tmp_path, model=model, rtol=0, atol=0)
    assert restored.depth_multiplier == 2 and len(restored.losses) == 1
    before = {w.name: w.numpy().copy() for w in layer.weights}
    model.compile(keras.optimizers.SGD(0.1), "mse")
    model.fit([x, g], rng.normal(0, 1, (4, 9, 9, 5)), batch_size=4, epochs=1, verbose=0)
    changed = {w.name for w in layer.weights if not np.array_equal(w.numpy(), before[w.name])}
    # The bias is not among them: the batch norm's batch statistics remove
    # any per-channel offset, so its gradient is zero.
    assert changed == {
        "kernel", "pointwise_kernel", "gamma", "beta", "moving_mean", "moving_variance"
    }


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="takes no `groups`. Received: groups=2"):
        GatedSeparableConv(4, 3, groups=2)
    with pytest.raises(ValueError, match="`depth_multiplier` must be a positive int"):
        GatedSeparableConv(4, 3, depth_multiplier=0)
