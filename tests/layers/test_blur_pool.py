import itertools

import keras
import numpy as np
import pytest
import tensorflow as tf
from numpy.lib.stride_tricks import sliding_window_view

from keras_seltransfer.layers.base_blur_pool import binomial_taps
from keras_seltransfer.layers.base_blur_pool import pad_spatial
from keras_seltransfer.layers.blur_pool import BlurPool
from keras_seltransfer.layers.max_blur_pool import MaxBlurPool
from tests import helpers

_NUMPY_MODES = {"reflect": "reflect", "replicate": "edge", "zero": "constant"}


def _pascal_row(filt_size):
    row = np.array([1.0])
    for _ in range(filt_size - 1):
        row = np.convolve(row, [1.0, 1.0])
    return row


def _reference_blur(x, filt_size, strides, pad_type):
    """Zhang's BlurPool in NumPy: pad, slide an f x f window, weight, subsample."""
    taps = _pascal_row(filt_size)
    kernel = np.outer(taps, taps) / taps.sum() ** 2
    before, after = (filt_size - 1) // 2, filt_size - 1 - (filt_size - 1) // 2
    padded = np.pad(
        x.astype(np.float64),
        ((0, 0), (before, after), (before, after), (0, 0)),
        mode=_NUMPY_MODES[pad_type],
    )
    windows = sliding_window_view(padded, (filt_size, filt_size), axis=(1, 2))
    blurred = np.einsum("bhwcij,ij->bhwc", windows, kernel)
    return blurred[:, :: strides[0], :: strides[1], :]


def _images(shape, seed=0):
    return np.random.default_rng(seed).normal(size=shape).astype("float32")


def test_binomial_taps_are_pascal_rows_normalised():
    for f in range(1, 8):
        np.testing.assert_allclose(binomial_taps(f), _pascal_row(f) / 2 ** (f - 1))
    np.testing.assert_array_equal(_pascal_row(4), [1, 3, 3, 1])


@pytest.mark.parametrize("filt_size", range(1, 8))
def test_matches_numpy_reference(filt_size):
    # Odd and even sizes, a non-square map, maps smaller than the padding
    # (repeated reflection), several channel counts, every stride and padding.
    cases = [((2, 7, 10, 3), 0), ((1, 8, 5, 1), 1), ((2, 2, 3, 5), 2), ((1, 1, 4, 2), 3)]
    for shape, seed in cases:
        x = _images(shape, seed)
        for pad_type in ("reflect", "replicate", "zero"):
            for strides in (1, 2, 3, (2, 3)):
                pair = (strides, strides) if isinstance(strides, int) else strides
                layer = BlurPool(filt_size, strides=strides, pad_type=pad_type)
                out = np.asarray(layer(x))
                expected = _reference_blur(x, filt_size, pair, pad_type)
                assert out.shape == (
                    shape[0],
                    -(-shape[1] // pair[0]),
                    -(-shape[2] // pair[1]),
                    shape[3],
                )
                np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def _reference_blur_gradient(x, weights, filt_size, strides, pad_type):
    """The gradient of sum(weights * blur(x)) in NumPy: each output spreads
    its weight over its padded window, and every padded sample hands its
    share back to the map sample it copies (none for zero padding)."""
    taps = _pascal_row(filt_size)
    kernel = np.outer(taps, taps) / taps.sum() ** 2
    before, after = (filt_size - 1) // 2, filt_size - 1 - (filt_size - 1) // 2
    batch, height, width, channels = x.shape
    padded = np.zeros((batch, height + filt_size - 1, width + filt_size - 1, channels))
    for i in range(weights.shape[1]):
        for j in range(weights.shape[2]):
            r, c = i * strides[0], j * strides[1]
            padded[:, r : r + filt_size, c : c + filt_size] += (
                weights[:, i, j][:, None, None, :] * kernel[None, :, :, None]
            )
    mode = {"reflect": "reflect", "replicate": "edge", "zero": "constant"}[pad_type]

    def source(n):
        if mode == "constant":
            return np.pad(np.arange(n), (before, after), constant_values=-1)
        return np.pad(np.arange(n), (before, after), mode=mode)

    gradient = np.zeros(x.shape)
    for r, row in enumerate(source(height)):
        for c, col in enumerate(source(width)):
            if row >= 0 and col >= 0:
                gradient[:, row, col] += padded[:, r, c]
    return gradient


@pytest.mark.parametrize("pad_type", ["reflect", "replicate", "zero"])
def test_values_and_gradients_on_maps_with_separate_borders(pad_type):
    # Small maps (two matrix products) and maps large enough for the 'same'
    # convolution plus the ring of copied samples (odd and even sizes, so
    # odd filters take the padded copy on even ones): values and input
    # gradients match the NumPy blur and its adjoint for every filter size
    # and equal stride.
    cases = [((2, 16, 13, 3), 0), ((1, 9, 12, 1), 2), ((1, 41, 34, 2), 1), ((1, 36, 37, 1), 3)]
    for filt_size in range(2, 8):
        for stride in (1, 2, 3):
            for shape, seed in cases:
                x = _images(shape, seed)
                layer = BlurPool(filt_size, strides=stride, pad_type=pad_type)
                out_shape = (shape[0], -(-shape[1] // stride), -(-shape[2] // stride), shape[3])
                weights = _images(out_shape, seed + 10)
                tensor = tf.constant(x)
                with tf.GradientTape() as tape:
                    tape.watch(tensor)
                    out = layer(tensor)
                    loss = tf.reduce_sum(out * weights)
                np.testing.assert_allclose(
                    out.numpy(),
                    _reference_blur(x, filt_size, (stride, stride), pad_type),
                    rtol=1e-5,
                    atol=1e-5,
                )
                np.testing.assert_allclose(
                    tape.gradient(loss, tensor).numpy(),
                    _reference_blur_gradient(x, weights, filt_size, (stride, stride), pad_type),
                    rtol=1e-5,
                    atol=1e-5,
                )


def _graph_op_types(layer, x):
    """Op types of the compiled forward and backward pass of `layer` on `x`."""

    @tf.function
    def step(t):
        with tf.GradientTape() as tape:
            tape.watch(t)
            loss = tf.reduce_sum(layer(t) ** 2)
        return tape.gradient(loss, t)

    graph = step.get_concrete_function(x).graph
    types = {op.type for op in graph.get_operations()}
    for function in graph._functions.values():
        types |= {node.op for node in function.definition.node_def}
    return types


def test_static_maps_blur_without_padded_copies():
    # The fast paths make no padded copy of the map and no full-size
    # scatter: a 'same' convolution for zero padding; for reflect and
    # replicate padding the same convolution plus the ring of copied
    # samples added in place to the border rows and columns (the padded
    # copy, two concatenations, and a copying scatter per axis in the
    # gradient, cost several times the convolution on CPUs).
    copies = {"MirrorPad", "MirrorPadGrad", "Pad", "PadV2", "ConcatV2", "TensorScatterAdd"}
    # Small maps blur as two matrix products, larger ones by the ring.
    for size, path in ((16, "BatchMatMulV2"), (48, "InplaceAdd")):
        x = tf.constant(_images((2, size, size, 8)))
        for pad_type in ("reflect", "replicate", "zero"):
            types = _graph_op_types(BlurPool(4, strides=2, pad_type=pad_type), x)
            assert not types & copies, (size, pad_type, types & copies)
            assert pad_type == "zero" or path in types, (size, pad_type)
    # An odd filter on an even map pads a copy, and folds the gradient of
    # the padding back in place rather than by a copying scatter.
    types = _graph_op_types(BlurPool(3, strides=2, pad_type="reflect"), x)
    assert not types & {"MirrorPad", "MirrorPadGrad", "TensorScatterAdd"}
    assert "InplaceAdd" in types
    # Plain subsampling has no strided-slice gradient (several times slower).
    assert "StridedSliceGrad" not in _graph_op_types(BlurPool(1, strides=2), x)


def test_in_place_adds_leave_inputs_and_gradients_alone():
    # The in-place additions only touch intermediates of the blur: the
    # input, the output gradient handed in, and a second call are intact.
    for filt_size in (3, 4):
        layer = BlurPool(filt_size, strides=2, pad_type="reflect")
        x = tf.constant(_images((2, 40, 40, 3)))
        kept = x.numpy().copy()
        upstream = tf.constant(_images((2, 20, 20, 3), 1))
        upstream_kept = upstream.numpy().copy()

        @tf.function
        def step(t, g):
            with tf.GradientTape() as tape:
                tape.watch(t)
                y = layer(t)
            return y, tape.gradient(y, t, output_gradients=g)

        first = [v.numpy() for v in step(x, upstream)]
        second = [v.numpy() for v in step(x, upstream)]
        np.testing.assert_array_equal(x.numpy(), kept)
        np.testing.assert_array_equal(upstream.numpy(), upstream_kept)
        for a, b in zip(first, second):
            np.testing.assert_array_equal(a, b)
        np.testing.assert_allclose(
            first[1],
            _reference_blur_gradient(kept, upstream_kept, filt_size, (2, 2), "reflect"),
            rtol=1e-5,
            atol=1e-5,
        )


def test_xla_compiled_blur_matches():
    # Under XLA (Keras compiles with it by default on GPUs) the in-place
    # additions become scatters, with the same values and gradients.
    for filt_size, shape in ((4, (2, 40, 34, 3)), (3, (2, 40, 34, 3)), (4, (2, 12, 10, 3))):
        layer = BlurPool(filt_size, strides=2, pad_type="reflect")
        x = tf.constant(_images(shape))

        def step(t):
            with tf.GradientTape() as tape:
                tape.watch(t)
                loss = tf.reduce_sum(layer(t) ** 2)
            return layer(t), tape.gradient(loss, t)

        plain = step(x)
        compiled = tf.function(step, jit_compile=True)(x)
        for a, b in zip(plain, compiled):
            np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-6)


def test_filt_size_one_is_exact_subsampling():
    x = _images((2, 9, 8, 4))
    np.testing.assert_array_equal(np.asarray(BlurPool(1, strides=2)(x)), x[:, ::2, ::2])
    np.testing.assert_array_equal(np.asarray(BlurPool(1, strides=(3, 1))(x)), x[:, ::3])
    # Its gradient puts each output's gradient back on the sample it kept.
    tensor = tf.constant(x)
    weights = _images((2, 3, 8, 4), 1)
    with tf.GradientTape() as tape:
        tape.watch(tensor)
        loss = tf.reduce_sum(BlurPool(1, strides=(3, 1))(tensor) * weights)
    expected = np.zeros_like(x)
    expected[:, ::3] = weights
    np.testing.assert_array_equal(tape.gradient(loss, tensor).numpy(), expected)


def test_reflect_is_not_symmetric_padding():
    x = np.arange(4, dtype="float32").reshape(1, 4, 1, 1)
    padded = np.asarray(pad_spatial(x, ((2, 1), (0, 0)), "reflect"))[0, :, 0, 0]
    np.testing.assert_array_equal(padded, [2, 1, 0, 1, 2, 3, 2])
    padded = np.asarray(pad_spatial(x, ((2, 1), (0, 0)), "replicate"))[0, :, 0, 0]
    np.testing.assert_array_equal(padded, [0, 0, 0, 1, 2, 3, 3])


def test_dynamic_spatial_sizes_match_static_ones():
    layer = BlurPool(5, strides=2, pad_type="reflect")
    inputs = keras.Input((None, None, 2))
    model = keras.Model(inputs, layer(inputs))
    assert tuple(model.output.shape) == (None, None, None, 2)
    for shape in ((1, 9, 6, 2), (1, 2, 3, 2)):
        x = _images(shape)
        fn = tf.function(lambda t: model(t), input_signature=[tf.TensorSpec([None, None, None, 2])])
        np.testing.assert_allclose(
            fn(x).numpy(), _reference_blur(x, 5, (2, 2), "reflect"), rtol=1e-5, atol=1e-5
        )
    replicate = BlurPool(4, pad_type="replicate")
    fn = tf.function(replicate, input_signature=[tf.TensorSpec([None, None, None, 3])])
    x = _images((2, 5, 7, 3))
    np.testing.assert_allclose(
        fn(x).numpy(), _reference_blur(x, 4, (2, 2), "replicate"), rtol=1e-5, atol=1e-5
    )


def test_kernel_is_a_non_trainable_weight_from_the_config():
    layer = BlurPool(3, strides=2)
    layer.build((None, 8, 8, 2))
    assert layer.trainable_weights == []
    assert [w.name for w in layer.non_trainable_weights] == ["kernel"]
    kernel = layer.kernel.numpy()
    assert kernel.shape == (3, 3, 2, 1)
    np.testing.assert_allclose(kernel[:, :, 0, 0], np.outer([1, 2, 1], [1, 2, 1]) / 16.0)
    np.testing.assert_allclose(kernel.sum(axis=(0, 1)), 1.0)


def test_config_round_trip_symbolic_and_eager(tmp_path):
    layer = BlurPool(5, strides=(2, 3), pad_type="replicate", name="blur")
    config = layer.get_config()
    assert (config["filt_size"], config["strides"], config["pad_type"]) == (5, (2, 3), "replicate")
    restored = helpers.assert_layer_round_trip(layer, _images((2, 11, 9, 4)), tmp_path)
    assert (restored.filt_size, restored.strides, restored.pad_type) == (5, (2, 3), "replicate")
    symbolic = layer(keras.Input((11, 9, 4)))
    assert tuple(symbolic.shape) == (None, 6, 3, 4)
    assert layer.compute_output_shape((None, 11, 9, 4)) == (None, 6, 3, 4)


def _blur_model():
    inputs = keras.Input((12, 12, 3))
    x = keras.layers.Conv2D(4, 3, padding="same", activation="relu", name="conv")(inputs)
    x = BlurPool(4, name="blur")(x)
    x = MaxBlurPool(2, filt_size=3, name="maxblur")(x)
    outputs = keras.layers.Dense(2, activation="softmax")(keras.layers.Flatten()(x))
    return keras.Model(inputs, outputs)


def test_keras_save_load_and_saved_model_export(tmp_path):
    model = _blur_model()
    x = _images((3, 12, 12, 3))
    expected = np.asarray(model(x))
    helpers.assert_layer_round_trip(model.get_layer("blur"), x, tmp_path, model=model)
    restored = helpers.assert_layer_round_trip(model.get_layer("maxblur"), x, tmp_path, model=model)
    assert restored.pool_size == (2, 2)
    export_dir = str(tmp_path / "export")
    model.export(export_dir, verbose=False)
    served = tf.saved_model.load(export_dir)
    np.testing.assert_allclose(served.serve(x).numpy(), expected, rtol=1e-6)


def test_one_compiled_training_step_leaves_the_kernel_alone():
    model = _blur_model()
    model.compile(keras.optimizers.SGD(0.1), "sparse_categorical_crossentropy")
    kernel = model.get_layer("blur").kernel.numpy().copy()
    conv = model.get_layer("conv").kernel.numpy().copy()
    x, y = _images((8, 12, 12, 3)), np.arange(8) % 2
    model.fit(x, y, epochs=1, batch_size=8, verbose=0)
    np.testing.assert_array_equal(model.get_layer("blur").kernel.numpy(), kernel)
    assert np.abs(model.get_layer("conv").kernel.numpy() - conv).max() > 0


def test_max_blur_pool_matches_numpy_and_max_pooling():
    x = _images((2, 9, 8, 3))
    windows = sliding_window_view(x, (2, 2), axis=(1, 2))
    dense_max = windows.max(axis=(-2, -1))
    out = np.asarray(MaxBlurPool(2, filt_size=4, pad_type="zero")(x))
    np.testing.assert_allclose(
        out, _reference_blur(dense_max, 4, (2, 2), "zero"), rtol=1e-5, atol=1e-5
    )
    pooled = np.asarray(keras.layers.MaxPooling2D(2)(x))
    assert out.shape == pooled.shape
    np.testing.assert_array_equal(np.asarray(MaxBlurPool(2, filt_size=1)(x)), pooled)
    same = MaxBlurPool(3, padding="same")
    assert tuple(same(keras.Input((9, 8, 3))).shape) == (None, 5, 4, 3)



def test_max_blur_pool_config_round_trip(tmp_path):
    layer = MaxBlurPool(3, filt_size=2, strides=3, padding="same", name="maxblur")
    restored = helpers.assert_layer_round_trip(layer, _images((2, 9, 8, 3)), tmp_path)
    assert (restored.pool_size, restored.strides, restored.padding) == ((3, 3), (3, 3), "same")


def test_mixed_precision_computes_in_float16():
    layer = BlurPool(4, dtype="mixed_float16")
    out = layer(_images((1, 8, 8, 2)))
    assert out.dtype == "float16" and layer.kernel.dtype == "float32"


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_half_precision_blur_and_gradient_match_numpy(policy):
    # The taps are exact in 16-bit floats: values and gradients of every
    # padding stay within half-precision rounding of the NumPy blur.
    tolerance = 2e-2 if policy == "mixed_bfloat16" else 2e-3
    for (x, weights), pad_type in itertools.product(
        [(_images((2, 16, 13, 3)), _images((2, 8, 7, 3), 1)),
         (_images((1, 40, 33, 2)), _images((1, 20, 17, 2), 1))],
        ("reflect", "replicate", "zero"),
    ):
        layer = BlurPool(4, strides=2, pad_type=pad_type, dtype=policy)
        tensor = tf.constant(x, dtype=policy.split("_")[1])
        with tf.GradientTape() as tape:
            tape.watch(tensor)
            out = layer(tensor)
            loss = tf.reduce_sum(tf.cast(out, "float32") * weights)
        np.testing.assert_allclose(
            tf.cast(out, "float32").numpy(),
            _reference_blur(x, 4, (2, 2), pad_type),
            rtol=tolerance,
            atol=tolerance,
        )
        np.testing.assert_allclose(
            tf.cast(tape.gradient(loss, tensor), "float32").numpy(),
            _reference_blur_gradient(x, weights, 4, (2, 2), pad_type),
            rtol=tolerance,
            atol=tolerance,
        )


def test_bad_arguments_and_inputs():
    with pytest.raises(
        ValueError, match=r"`filt_size` must be an int in \[1, 7\]. Received: filt_size=8"
    ):
        BlurPool(8)
    with pytest.raises(ValueError, match="`filt_size`"):
        BlurPool(True)
    with pytest.raises(ValueError, match="`strides` must be an int >= 1"):
        BlurPool(strides=0)
    with pytest.raises(ValueError, match="`pad_type` must be one of"):
        BlurPool(pad_type="symmetric")
    with pytest.raises(ValueError, match="`padding` must be 'valid' or 'same'"):
        MaxBlurPool(padding="causal")
    with pytest.raises(ValueError, match="channels-last images"):
        BlurPool()(keras.Input((8, 3)))
    with pytest.raises(ValueError, match="at least that large"):
        MaxBlurPool(3)(keras.Input((2, 8, 3)))
