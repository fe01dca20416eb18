import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_seltransfer.layers.gated_conv import GatedConv
from tests import helpers

EPS = 1e-3


def np_conv(x, kernel, strides, padding, dilation, groups=1, depthwise=False):
    """Direct NHWC convolution in float64 (TF's "same" padding convention)."""
    x = x.astype(np.float64)
    kernel = kernel.astype(np.float64)
    n, h, w, c = x.shape
    kh, kw = kernel.shape[:2]
    if depthwise:
        # [kh, kw, c, m] is the grouped kernel [kh, kw, 1, c * m] with one
        # group per input channel (output channel c * m + j).
        kernel = kernel.reshape(kh, kw, 1, -1)
        groups = c
    (sh, sw), (dh, dw) = strides, dilation
    eff_h, eff_w = (kh - 1) * dh + 1, (kw - 1) * dw + 1
    if padding == "same":
        out_h, out_w = math.ceil(h / sh), math.ceil(w / sw)
        pad_h = max((out_h - 1) * sh + eff_h - h, 0)
        pad_w = max((out_w - 1) * sw + eff_w - w, 0)
        top, left = pad_h // 2, pad_w // 2
        x = np.pad(x, ((0, 0), (top, pad_h - top), (left, pad_w - left), (0, 0)))
    else:
        out_h, out_w = (h - eff_h) // sh + 1, (w - eff_w) // sw + 1
    filters = kernel.shape[-1]
    cin, fout = c // groups, filters // groups
    out = np.zeros((n, out_h, out_w, filters))
    for i in range(out_h):
        for j in range(out_w):
            patch = x[:, i * sh : i * sh + eff_h : dh, j * sw : j * sw + eff_w : dw, :]
            for g in range(groups):
                out[:, i, j, g * fout : (g + 1) * fout] = np.einsum(
                    "nhwc,hwcf->nf",
                    patch[..., g * cin : (g + 1) * cin],
                    kernel[..., g * fout : (g + 1) * fout],
                )
    return out


def np_bn(x, mean, var, gamma, beta):
    return (x - mean) / np.sqrt(var + EPS) * gamma + beta


CASES = {
    "3x3_same": dict(filters=4, kernel_size=3, padding="same"),
    "strided_valid_bias": dict(filters=3, kernel_size=(3, 2), strides=2, padding="valid"),
    "dilated_same": dict(filters=4, kernel_size=3, dilation_rate=2, padding="same"),
    "grouped": dict(filters=6, kernel_size=3, groups=2, padding="same", strides=(1, 2)),
    "depthwise_strided": dict(filters=4, kernel_size=3, depthwise=True, strides=2, padding="same"),
    "depthwise_multiplier_dilated": dict(
        filters=8, kernel_size=3, depthwise=True, dilation_rate=2, padding="valid"
    ),
}


def assign_random(layer, rng):
    """Distinct random values for every weight of both paths; returns them."""
    values = {}
    for w in layer.weights:
        if "variance" in w.name:
            value = rng.uniform(0.5, 2.0, w.shape)
        elif "gamma" in w.name:
            value = rng.uniform(0.5, 1.5, w.shape)
        else:
            value = rng.normal(0, 0.5, w.shape)
        w.assign(value.astype("float32"))
        values[w.name] = value.astype("float32")
    return values


def _reference(layer, values, x, batch_stats=False):
    """Both paths of `layer` computed in NumPy from its weights."""
    kw = dict(
        strides=layer.strides,
        padding=layer.padding,
        dilation=layer.dilation_rate,
        groups=layer.groups,
        depthwise=layer.depthwise,
    )
    paths = {}
    for prefix in ("pretrained_", ""):
        y = np_conv(x, values[prefix + "kernel"], **kw)
        if layer.use_bias:
            y = y + values[prefix + "bias"]
        if layer.batchnorm:
            if batch_stats and not prefix:
                mean, var = y.mean(axis=(0, 1, 2)), y.var(axis=(0, 1, 2))
            else:
                mean = values[prefix + "moving_mean"]
                var = values[prefix + "moving_variance"]
            y = np_bn(y, mean, var, values[prefix + "gamma"], values[prefix + "beta"])
        if layer.activation is keras.activations.relu:
            y = np.maximum(y, 0)
        paths[prefix or "finetuned"] = y
    return paths["pretrained_"], paths["finetuned"]


def _inputs(rng, n=3, size=9, channels=4):
    return rng.normal(0, 1, (n, size, size, channels)).astype("float32")


def test_matches_numpy_reference_with_mixed_gates():
    # One test over every case: each test pays a fixed Keras session teardown.
    for case in sorted(CASES):
        for batchnorm in (False, True):
            _check_against_reference(case, batchnorm)


def _check_against_reference(case, batchnorm):
    rng = np.random.default_rng(0)
    x = _inputs(rng)
    layer = GatedConv(**CASES[case], batchnorm=batchnorm, epsilon=EPS, activation="relu")
    gates = rng.integers(0, 2, (3, layer.filters)).astype("float32")
    layer(x, gates)
    values = assign_random(layer, rng)
    pre, ft = _reference(layer, values, x)
    assert np.abs(pre - ft).max() > 0.1  # the two paths really differ
    g = gates[:, None, None, :]
    expected = (1 - g) * pre + g * ft
    got = np.asarray(layer(x, gates, training=False))
    assert got.shape == expected.shape == layer.compute_output_shape(x.shape, gates.shape)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4, err_msg=f"{case} {batchnorm}")

    # Each example and filter takes exactly one path: all-0 gates give the
    # pretrained path, all-1 the fine-tuned one, and mixed gates pick per
    # example and per filter between those two outputs, bit for bit.
    frozen = np.asarray(layer(x, np.zeros_like(gates)))
    tuned = np.asarray(layer(x, np.ones_like(gates)))
    np.testing.assert_allclose(frozen, pre, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(tuned, ft, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(got, np.where(g > 0.5, tuned, frozen))


def test_all_zero_gates_ignore_the_finetuned_weights_and_all_one_the_pretrained():
    rng = np.random.default_rng(1)
    x = _inputs(rng)
    layer = GatedConv(5, 3, padding="same", batchnorm=True)
    zeros, ones = np.zeros((3, 5), "float32"), np.ones((3, 5), "float32")
    layer(x, zeros)
    assign_random(layer, rng)
    frozen, tuned = np.asarray(layer(x, zeros)), np.asarray(layer(x, ones))
    for w in layer.weights:  # change one path's weights at a time
        if not w.name.startswith("pretrained_"):
            w.assign(w.numpy() * 3.0 + 1.0)
    np.testing.assert_array_equal(layer(x, zeros), frozen)
    assert np.abs(np.asarray(layer(x, ones)) - tuned).max() > 0.1
    tuned = np.asarray(layer(x, ones))
    for w in layer.weights:
        if w.name.startswith("pretrained_"):
            w.assign(w.numpy() * 3.0 + 1.0)
    np.testing.assert_array_equal(layer(x, ones), tuned)


def test_equal_paths_make_the_output_independent_of_the_gates():
    rng = np.random.default_rng(2)
    x = _inputs(rng)
    layer = GatedConv(4, 3, batchnorm=True, activation="relu")
    layer(x, np.zeros((3, 4), "float32"))
    layer.load_pretrained(
        rng.normal(0, 1, (3, 3, 4, 4)),
        bias=rng.normal(0, 1, 4),
        gamma=rng.uniform(0.5, 1.5, 4),
        beta=rng.normal(0, 1, 4),
        moving_mean=rng.normal(0, 1, 4),
        moving_variance=rng.uniform(0.5, 2, 4),
    )
    reference = np.asarray(layer(x, np.zeros((3, 4), "float32")))
    for _ in range(3):
        gates = rng.integers(0, 2, (3, 4)).astype("float32")
        np.testing.assert_array_equal(layer(x, gates), reference)
    # Relaxed gates mix two equal values: equal up to rounding.
    soft = rng.uniform(0, 1, (3, 4)).astype("float32")
    np.testing.assert_allclose(layer(x, soft), reference, rtol=1e-6, atol=1e-6)
    # A plain Conv2D + BatchNormalization with those weights computes the same.
    conv = keras.layers.Conv2D(4, 3, activation=None)
    bn = keras.layers.BatchNormalization(epsilon=1e-3)
    conv.build(x.shape)
    conv.set_weights([layer.pretrained_kernel.numpy(), layer.pretrained_bias.numpy()])
    bn.build((None, 7, 7, 4))
    bn.set_weights(
        [w.numpy() for w in (layer.pretrained_gamma, layer.pretrained_beta,
                             layer.pretrained_moving_mean, layer.pretrained_moving_variance)]
    )
    plain = np.maximum(np.asarray(bn(conv(x), training=False)), 0)
    np.testing.assert_allclose(reference, plain, rtol=1e-5, atol=1e-5)


def test_training_uses_batch_statistics_on_the_finetuned_path_only():
    rng = np.random.default_rng(3)
    x = _inputs(rng, n=4)
    layer = GatedConv(3, 3, padding="same", batchnorm=True, momentum=0.9, epsilon=EPS)
    gates = rng.integers(0, 2, (4, 3)).astype("float32")
    layer(x, gates)
    values = assign_random(layer, rng)
    pre, ft = _reference(layer, values, x, batch_stats=True)
    g = gates[:, None, None, :]
    got = np.asarray(layer(x, gates, training=True))
    np.testing.assert_allclose(got, (1 - g) * pre + g * ft, rtol=1e-4, atol=1e-4)
    y = np_conv(x, values["kernel"], (1, 1), "same", (1, 1)) + values["bias"]
    np.testing.assert_allclose(
        layer.moving_mean.numpy(), 0.9 * values["moving_mean"] + 0.1 * y.mean(axis=(0, 1, 2)),
        rtol=1e-5, atol=1e-5,
    )
    np.testing.assert_allclose(
        layer.moving_variance.numpy(),
        0.9 * values["moving_variance"] + 0.1 * y.var(axis=(0, 1, 2)),
        rtol=1e-4, atol=1e-5,
    )
    for name in ("pretrained_moving_mean", "pretrained_moving_variance"):
        np.testing.assert_array_equal(getattr(layer, name).numpy(), values[name])

    # With a frozen fine-tuned batch norm, training changes nothing.
    frozen = GatedConv(3, 3, padding="same", batchnorm=True, train_batchnorm=False, epsilon=EPS)
    frozen(x, gates)
    values = assign_random(frozen, rng)
    pre, ft = _reference(frozen, values, x)
    np.testing.assert_allclose(
        frozen(x, gates, training=True), (1 - g) * pre + g * ft, rtol=1e-4, atol=1e-4
    )
    np.testing.assert_array_equal(frozen.moving_mean.numpy(), values["moving_mean"])
    assert {w.name for w in frozen.trainable_weights} == {"kernel", "bias"}
    assert {w.name for w in layer.trainable_weights} == {"kernel", "bias", "gamma", "beta"}


def test_gradients_reach_gates_and_finetuned_weights_only():
    rng = np.random.default_rng(4)
    x = tf.constant(_inputs(rng))
    layer = GatedConv(4, 3, padding="same")
    gates = tf.Variable(rng.integers(0, 2, (3, 4)).astype("float32"))
    layer(x, gates)
    values = assign_random(layer, rng)
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(layer(x, gates))
    grads = tape.gradient(loss, [gates] + layer.trainable_weights)
    # d(sum y) / d g[i, f] = sum over positions of (ft - pre)[i, :, :, f].
    pre, ft = _reference(layer, values, x.numpy())
    np.testing.assert_allclose(grads[0], (ft - pre).sum(axis=(1, 2)), rtol=1e-4, atol=1e-3)
    assert [w.name for w in layer.trainable_weights] == ["kernel", "bias"]
    # The fine-tuned kernel learns only from the examples whose gates open it.
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(layer(x, tf.zeros((3, 4))))
    assert np.abs(tape.gradient(loss, layer.kernel).numpy()).max() == 0.0


def _model(layer, shape=(8, 8, 2), filters=4):
    images = keras.Input(shape, name="x")
    gates = keras.Input((filters,), name="g")
    return keras.Model([images, gates], layer(images, gates))


def test_config_round_trip_and_keras_file(tmp_path):
    layer = GatedConv(
        4, (3, 1), strides=(2, 1), padding="same", activation="relu", batchnorm=True,
        train_batchnorm=False, momentum=0.9, epsilon=1e-4, center=False,
        kernel_regularizer=keras.regularizers.L2(1e-3), name="gated",
    )
    model = _model(layer)
    rng = np.random.default_rng(5)
    assign_random(layer, rng)
    x = rng.normal(0, 1, (2, 8, 8, 2)).astype("float32")
    g = rng.integers(0, 2, (2, 4)).astype("float32")
    restored = helpers.assert_layer_round_trip(layer, [x, g], tmp_path, model=model, rtol=0, atol=0)
    assert restored.beta is None and not restored.train_batchnorm
    assert len(restored.losses) == 1  # the fine-tuned kernel's regularizer


def test_symbolic_and_eager_calls_and_one_training_step():
    layer = GatedConv(4, 3, padding="same", batchnorm=True, activation="relu")
    model = _model(layer)
    assert model.output.shape == (None, 8, 8, 4)
    rng = np.random.default_rng(6)
    x = rng.normal(0, 1, (8, 8, 8, 2)).astype("float32")
    g = rng.integers(0, 2, (8, 4)).astype("float32")
    y = rng.normal(0, 1, (8, 8, 8, 4)).astype("float32")
    assert layer(x, g).shape == (8, 8, 8, 4)  # eager
    before = {w.name: w.numpy().copy() for w in layer.weights}
    model.compile(keras.optimizers.SGD(0.1), "mse")
    model.fit([x, g], y, batch_size=8, epochs=1, verbose=0)
    changed = {w.name for w in layer.weights if not np.array_equal(w.numpy(), before[w.name])}
    assert changed == {"kernel", "bias", "gamma", "beta", "moving_mean", "moving_variance"}


def test_load_pretrained_sets_both_paths_and_checks_its_input():
    layer = GatedConv(2, 1, use_bias=False, depthwise=True)
    with pytest.raises(ValueError, match="must be built"):
        layer.load_pretrained(np.ones((1, 1, 2, 1)))
    layer(np.ones((1, 3, 3, 2), "float32"), np.ones((1, 2), "float32"))
    kernel = np.arange(2, dtype="float32").reshape(1, 1, 2, 1)
    layer.load_pretrained(kernel)
    np.testing.assert_array_equal(layer.pretrained_kernel.numpy(), kernel)
    np.testing.assert_array_equal(layer.kernel.numpy(), kernel)
    with pytest.raises(ValueError, match=r"`kernel` must have shape \(1, 1, 2, 1\)"):
        layer.load_pretrained(np.ones((1, 1, 1, 2)))
    with pytest.raises(ValueError, match="no bias"):
        layer.load_pretrained(kernel, bias=np.ones(2))
    with pytest.raises(ValueError, match="no batch-norm `gamma`"):
        layer.load_pretrained(kernel, gamma=np.ones(2))


BAD_ARGUMENTS = [
    (dict(filters=0, kernel_size=3), "`filters` must be a positive int"),
    (dict(filters=4, kernel_size=0), "`kernel_size` must be an int >= 1"),
    (dict(filters=4, kernel_size=3, padding="causal"), "`padding` must be one of"),
    (dict(filters=5, kernel_size=3, groups=2), "divisible by `groups`"),
    (dict(filters=4, kernel_size=3, depthwise=True, groups=2), "takes no `groups`"),
    (dict(filters=4, kernel_size=3, strides=2, dilation_rate=2), "cannot be combined"),
    (dict(filters=4, kernel_size=3, momentum=2.0), "`momentum` must be in"),
    (dict(filters=4, kernel_size=3, epsilon=0), "`epsilon` must be > 0"),
]
SHAPE_ERRORS = [
    (dict(filters=4, kernel_size=3), 2, 3, r"expects gates \[batch, 4\]"),
    (dict(filters=6, kernel_size=3, depthwise=True), 4, 6, "multiple of the 4 input"),
    (dict(filters=4, kernel_size=3, groups=4), 6, 4, "divisible by `groups`"),
]


def test_bad_arguments_and_shapes_raise_clear_errors():
    for kwargs, message in BAD_ARGUMENTS:
        with pytest.raises(ValueError, match=message):
            GatedConv(**kwargs)
    # Shape problems are raised in build, on the first call.
    for kwargs, channels, gates, message in SHAPE_ERRORS:
        layer = GatedConv(**kwargs)
        with pytest.raises(ValueError, match=message):
            layer(np.ones((1, 5, 5, channels), "float32"), np.ones((1, gates), "float32"))
