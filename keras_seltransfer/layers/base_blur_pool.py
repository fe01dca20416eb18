"""Shared logic of the anti-aliasing layers: binomial taps, padding, the blur."""

import math

import keras
import numpy as np
from keras import ops

from keras_seltransfer.utils.validation import check_choice
from keras_seltransfer.utils.validation import check_pair

PAD_TYPES = ("reflect", "replicate", "zero")
MAX_FILT_SIZE = 7


def binomial_taps(filt_size):
    """The 1-D binomial filter of Zhang's BlurPool, normalised to sum 1.

    `filt_size` 1 to 7 gives [1], [1, 1], [1, 2, 1], [1, 3, 3, 1],
    [1, 4, 6, 4, 1], [1, 5, 10, 10, 5, 1] and [1, 6, 15, 20, 15, 6, 1],
    divided by their sum (a power of two).
    """
    filt_size = check_filt_size(filt_size)
    taps = np.array([math.comb(filt_size - 1, k) for k in range(filt_size)], dtype=np.float64)
    return taps / taps.sum()


def blur_kernel(filt_size):
    """The 2-D blur kernel `[filt_size, filt_size]`: the outer product of the
    binomial taps with themselves, so it sums to 1."""
    taps = binomial_taps(filt_size)
    return np.outer(taps, taps)


def blur_padding(filt_size):
    """`(before, after)` padding of one spatial axis: floor((f-1)/2) before and
    ceil((f-1)/2) after, so a valid blur at stride s gives ceil(n/s) outputs."""
    return (filt_size - 1) // 2, filt_size // 2


def check_filt_size(filt_size):
    """Returns `filt_size` as an int if it is in [1, MAX_FILT_SIZE], else
    raises ValueError."""
    if (
        isinstance(filt_size, bool)
        or not isinstance(filt_size, (int, np.integer))
        or not 1 <= filt_size <= MAX_FILT_SIZE
    ):
        raise ValueError(
            f"`filt_size` must be an int in [1, {MAX_FILT_SIZE}]. Received: filt_size={filt_size!r}"
        )
    return int(filt_size)


def check_pad_type(pad_type):
    """Returns `pad_type` if it is one of `PAD_TYPES`, else raises ValueError."""
    return check_choice(pad_type, "pad_type", PAD_TYPES)


def _static_indices(n, before, after, pad_type):
    return _source_indices(np.arange(-before, n + after), n, pad_type)


def _source_indices(index, n, pad_type):
    """The map sample that each padded position `index` (-1 is the first
    sample before the map) copies, for an axis of size `n`."""
    if pad_type == "replicate" or n == 1:
        return np.clip(index, 0, n - 1)
    # Reflection about the first and last samples (NumPy's and PyTorch's
    # "reflect", not TensorFlow's SYMMETRIC), repeated when the padding is
    # longer than the axis, as NumPy does.
    period = 2 * (n - 1)
    index = np.mod(index, period)
    return np.where(index >= n, period - index, index)


def _dynamic_indices(n, before, after, pad_type):
    index = ops.arange(-before, n + after, dtype="int32")
    if pad_type == "replicate":
        return ops.clip(index, 0, n - 1)
    period = ops.maximum(2 * (n - 1), 1)
    index = ops.mod(index, period)
    return ops.where(index >= n, period - index, index)


def pad_spatial(x, padding, pad_type):
    """Pads the height and width axes of a channels-last batch.

    Args:
        x: tensor `[batch, height, width, channels]`.
        padding: `((top, bottom), (left, right))`.
        pad_type: `"reflect"` (mirror about the edge samples), `"replicate"`
            (repeat the edge samples) or `"zero"`.

    Returns:
        The padded tensor.
    """
    (top, bottom), (left, right) = padding
    if not (top or bottom or left or right):
        return x
    if pad_type == "zero":
        return ops.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)))
    height, width = x.shape[1], x.shape[2]
    if height is not None and width is not None and keras.backend.backend() == "tensorflow":
        return _gathered_pad(x, padding, pad_type)
    for axis, (before, after) in ((1, (top, bottom)), (2, (left, right))):
        if not (before or after):
            continue
        n = x.shape[axis]
        if n is not None:
            index = _static_indices(n, before, after, pad_type)
        else:
            index = _dynamic_indices(ops.shape(x)[axis], before, after, pad_type)
        x = ops.take(x, index, axis=axis)
    return x


def blurred_size(n, stride):
    return None if n is None else -(-n // stride)


def padded_blur(x, kernel, filt_size, strides, pad_type):
    """The blur as written: pad every side, then a 'valid' strided depthwise
    convolution.

    Reflect and replicate padding of static maps are built by `pad_spatial`
    (two concatenations, the gradient folded back in place). Unequal strides
    run at stride 1 and are subsampled after (TensorFlow's CPU depthwise
    convolution takes equal strides only).
    """
    stride_h, stride_w = strides
    before, after = blur_padding(filt_size)
    x = pad_spatial(x, ((before, after), (before, after)), pad_type)
    if stride_h == stride_w:
        return ops.depthwise_conv(x, kernel, strides=stride_h, padding="valid")
    y = ops.depthwise_conv(x, kernel, strides=1, padding="valid")
    return y[:, ::stride_h, ::stride_w, :]


def _same_matches(n, filt_size, stride):
    """Whether a 'same' convolution pads an axis of size n as the blur does
    (floor((f-1)/2) zeros before, the samples it reads after in range)."""
    before, _ = blur_padding(filt_size)
    out = -(-n // stride)
    total = max((out - 1) * stride + filt_size - n, 0)
    return total // 2 == before


def _zero_padded_blur(x, kernel, filt_size, stride):
    """The blur of `x` zero-padded on every side, without a padded copy where
    a 'same' convolution pads the same way (even filter sizes, and odd ones
    on odd sizes)."""
    if _same_matches(x.shape[1], filt_size, stride) and _same_matches(
        x.shape[2], filt_size, stride
    ):
        return ops.depthwise_conv(x, kernel, strides=stride, padding="same")
    before, after = blur_padding(filt_size)
    x = ops.pad(x, ((0, 0), (before, after), (before, after), (0, 0)))
    return ops.depthwise_conv(x, kernel, strides=stride, padding="valid")


def _add_rows(target, rows, values):
    """`target[rows] += values` for a 2-D `target` that nothing else reads
    (a fresh intermediate): in place, where TensorFlow's scatter would copy
    the whole of `target` first; as a scatter under XLA, which has no
    in-place kernel and updates in place itself."""
    import tensorflow as tf
    from tensorflow.python.ops import control_flow_util

    if control_flow_util.GraphOrParentsInXlaContext(tf.compat.v1.get_default_graph()):
        return tf.tensor_scatter_nd_add(target, rows[:, None], values)
    return tf.raw_ops.InplaceAdd(x=target, i=rows, v=values)


def _fold(gradient, axis, index, start, size):
    """The adjoint of gathering `index` along `axis` when positions
    `[start, start + size)` of `index` are the map itself: the map's slice
    of `gradient`, plus every padded position's gradient added, in place, to
    the sample it copied."""
    import tensorflow as tf

    inner = [slice(None)] * 4
    inner[axis] = slice(start, start + size)
    result = gradient[tuple(inner)]
    padded = [p for p in range(len(index)) if not start <= p < start + size]
    if not padded:
        return result
    part = tf.gather(gradient, padded, axis=axis)
    copied = tf.constant([int(index[p]) for p in padded], dtype=tf.int32)
    shape = tf.shape(result)
    # Rows of the flattened slice that receive the padded positions: the
    # slice is fresh (a strided copy), so the rows are added in place
    # (TensorScatterAdd would copy the whole slice first).
    if axis == 1:
        outer = tf.range(shape[0])[:, None] * shape[1]
        rows = tf.reshape(outer + copied[None], [-1])
        flat_shape = [-1, shape[2] * shape[3]]
    else:
        outer = tf.range(shape[0] * shape[1])[:, None] * shape[2]
        rows = tf.reshape(outer + copied[None], [-1])
        flat_shape = [-1, shape[3]]
    flat = _add_rows(tf.reshape(result, flat_shape), rows, tf.reshape(part, flat_shape))
    return tf.reshape(flat, shape)


def _gathered_pad(x, padding, pad_type):
    """`pad_spatial` of a map of static size, as two concatenations whose
    gradient folds the padding back in place.

    The same values as TensorFlow's mirror padding, at about half its cost
    forward and backward on CPUs (and without the full-size gradient of
    every copied slice that a plain composition of slices would have).
    """
    import tensorflow as tf

    (top, bottom), (left, right) = padding
    height, width = x.shape[1], x.shape[2]
    rows = _static_indices(height, top, bottom, pad_type)
    cols = _static_indices(width, left, right, pad_type)

    @tf.custom_gradient
    def pad(x):
        y = tf.concat(
            [tf.gather(x, rows[:top], axis=1), x, tf.gather(x, rows[top + height :], axis=1)], 1
        )
        y = tf.concat(
            [tf.gather(y, cols[:left], axis=2), y, tf.gather(y, cols[left + width :], axis=2)], 2
        )

        def grad(upstream):
            return _fold(_fold(upstream, 2, cols, left, width), 1, rows, top, height)

        return y, grad

    return pad(x)


def _blur_matrix(n, filt_size, stride, pad_type):
    """The 1-D padded blur of an axis of size n as a `[ceil(n / s), n]` matrix
    (zero padding: the padded samples are dropped)."""
    taps = binomial_taps(filt_size)
    before, _ = blur_padding(filt_size)
    outputs = -(-n // stride)
    padded = np.arange(outputs)[:, None] * stride - before + np.arange(filt_size)[None]
    matrix = np.zeros((outputs, n))
    inside = (padded >= 0) & (padded < n)
    if pad_type == "zero":
        rows, taps_at = np.nonzero(inside)
        np.add.at(matrix, (rows, padded[inside]), taps[taps_at])
        return matrix
    sources = _source_indices(padded.reshape(-1), n, pad_type).reshape(padded.shape)
    np.add.at(matrix, (np.repeat(np.arange(outputs), filt_size), sources.reshape(-1)),
              np.tile(taps, outputs))
    return matrix


# Maps of at most this many samples (32 x 32) blur fastest as two matrix
# products, one per axis: the products' extra arithmetic (each output reads
# the whole axis) costs less there than the ring's dozen small operations.
_MATRIX_BLUR_MAX_SAMPLES = 32 * 32


def _matrix_blur(x, filt_size, strides, pad_type):
    """The padded blur of a small static map as two matrix products: the
    1-D blur matrices of the height and of the width (padding folded in,
    see `_blur_matrix`), which the kernel's separability allows. Any
    padding and strides; the gradient is the transposed products."""
    import tensorflow as tf

    height, width, channels = x.shape[1], x.shape[2], x.shape[3]
    down = _blur_matrix(height, filt_size, strides[0], pad_type)
    across = _blur_matrix(width, filt_size, strides[1], pad_type)
    out_h, out_w = down.shape[0], across.shape[0]
    down, down_t = tf.constant(down, x.dtype), tf.constant(down.T, x.dtype)
    across, across_t = tf.constant(across, x.dtype), tf.constant(across.T, x.dtype)

    @tf.custom_gradient
    def blur(x):
        batch = tf.shape(x)[0]
        y = tf.matmul(down, tf.reshape(x, [batch, height, width * channels]))
        y = tf.matmul(across, tf.reshape(y, [batch * out_h, width, channels]))

        def grad(upstream):
            g = tf.reshape(upstream, [batch * out_h, out_w, channels])
            g = tf.matmul(across_t, g)
            g = tf.matmul(down_t, tf.reshape(g, [batch, out_h, width * channels]))
            return tf.reshape(g, tf.shape(x))

        return tf.reshape(y, [batch, out_h, out_w, channels]), grad

    return blur(x)


def _ring_matrix(n, filt_size, stride, pad_type):
    """What the padded samples alone add to the outputs of one axis.

    Returns `(outputs, sources, matrix)`: the border outputs (whose window
    reaches beyond the map), the map samples that padded positions copy,
    and the `[len(outputs), len(sources)]` weights.
    """
    taps = binomial_taps(filt_size)
    before, _ = blur_padding(filt_size)
    padded = np.arange(-(-n // stride))[:, None] * stride - before + np.arange(filt_size)[None]
    outside = (padded < 0) | (padded >= n)
    outputs = np.nonzero(outside.any(axis=1))[0]
    padded, outside = padded[outputs], outside[outputs]
    copied = _source_indices(padded[outside], n, pad_type)
    sources = np.unique(copied)
    matrix = np.zeros((len(outputs), len(sources)))
    rows, taps_at = np.nonzero(outside)
    np.add.at(matrix, (rows, np.searchsorted(sources, copied)), taps[taps_at])
    return outputs, sources, matrix


def _ring_blur(x, kernel, filt_size, stride, pad_type):
    """The reflect- or replicate-padded blur of a static map at equal strides
    without a padded copy of the map, or None where it does not apply.

    The padded map is the zero-padded one plus a ring holding the copied
    samples, so the blur is one 'same' convolution of the map (zero padding,
    where TensorFlow pads as the blur does: even filter sizes, and odd ones
    on odd sizes) plus the blur of the ring, which only the border outputs
    see. The kernel is separable, so the ring's blur is a few small matrix
    products: its padded rows (whole width, padded across as the map is)
    are the weighted map rows they copy, blurred along the width; its
    padded columns beside the map rows are the weighted map columns,
    blurred along the height with zero padding (the corners belong to the
    rows). Both are added in place to the convolution's border rows and
    columns. The gradient is written out the same way: the convolution's
    input gradient, with the transposed products of the border gradients
    added in place to the copied rows and columns. So the only full-size
    tensors are those of the zero-padded blur.
    """
    import tensorflow as tf

    height, width, channels = x.shape[1], x.shape[2], x.shape[3]
    if not (_same_matches(height, filt_size, stride) and _same_matches(width, filt_size, stride)):
        return None
    out_h, out_w = -(-height // stride), -(-width // stride)
    strides = [1, stride, stride, 1]
    row_out, row_src, row_ring = _ring_matrix(height, filt_size, stride, pad_type)
    col_out, col_src, col_ring = _ring_matrix(width, filt_size, stride, pad_type)
    has_rows, has_cols = len(row_out) > 0, len(col_out) > 0
    dtype = x.dtype

    def constant(value, dtype=dtype):
        return tf.constant(value, dtype=dtype)

    # Each ring part is two small matrix products over a thin slab, each a
    # (broadcast) batched product whose contracted axis is the slab's middle
    # one, so no slab is ever transposed: the padded rows weight the copied
    # rows and blur them across (padded as the map is); the padded columns
    # weight the copied columns and blur them down with zero padding (the
    # corners belong to the rows).
    across = _blur_matrix(width, filt_size, stride, pad_type)
    down = _blur_matrix(height, filt_size, stride, "zero")
    row_ring_t, col_ring_t = constant(row_ring.T), constant(col_ring.T)
    row_ring, col_ring = constant(row_ring), constant(col_ring)
    across_t, down_t = constant(across.T), constant(down.T)
    across, down = constant(across), constant(down)
    num_row_out, num_row_src = row_ring.shape
    num_col_out, num_col_src = col_ring.shape

    row_out, row_src = constant(row_out, tf.int32), constant(row_src, tf.int32)
    col_out, col_src = constant(col_out, tf.int32), constant(col_src, tf.int32)

    def flat_rows(outer, inner, positions):
        # Row numbers of `positions` within each of `outer` blocks of `inner`.
        return tf.reshape(tf.range(outer)[:, None] * inner + positions[None], [-1])

    def add_rows(target, values, positions, size):
        # target[:, positions] += values, in place ([batch, size, w, C]).
        shape = tf.shape(target)
        flat = _add_rows(
            tf.reshape(target, [-1, shape[2] * channels]),
            flat_rows(shape[0], size, positions),
            tf.reshape(values, [-1, shape[2] * channels]),
        )
        return tf.reshape(flat, shape)

    def add_cols(target, values, positions, size):
        # target[:, :, positions] += values, in place.
        shape = tf.shape(target)
        flat = _add_rows(
            tf.reshape(target, [-1, channels]),
            flat_rows(shape[0] * shape[1], size, positions),
            tf.reshape(values, [-1, channels]),
        )
        return tf.reshape(flat, shape)

    @tf.custom_gradient
    def blur(x):
        batch = tf.shape(x)[0]
        y = tf.nn.depthwise_conv2d(x, kernel, strides, "SAME")
        if has_rows:
            # Padded rows: the copied rows [b, r, w, C], blurred across,
            # then weighted.
            ring = tf.reshape(tf.gather(x, row_src, axis=1), [-1, width, channels])
            ring = tf.reshape(tf.matmul(across, ring), [batch, num_row_src, -1])
            y = add_rows(y, tf.matmul(row_ring, ring), row_out, out_h)
        if has_cols:
            # Padded columns: the copied columns [b, h, c, C], blurred down,
            # then weighted.
            ring = tf.reshape(tf.gather(x, col_src, axis=2), [batch, height, -1])
            ring = tf.reshape(tf.matmul(down, ring), [-1, num_col_src, channels])
            y = add_cols(y, tf.matmul(col_ring, ring), col_out, out_w)

        def grad(upstream):
            upstream = tf.convert_to_tensor(upstream)
            gradient = tf.compat.v1.nn.depthwise_conv2d_native_backprop_input(
                tf.shape(x), kernel, upstream, strides, "SAME"
            )
            if has_rows:
                part = tf.reshape(tf.gather(upstream, row_out, axis=1), [batch, num_row_out, -1])
                part = tf.reshape(tf.matmul(row_ring_t, part), [-1, out_w, channels])
                gradient = add_rows(gradient, tf.matmul(across_t, part), row_src, height)
            if has_cols:
                part = tf.reshape(tf.gather(upstream, col_out, axis=2), [-1, num_col_out, channels])
                part = tf.reshape(tf.matmul(col_ring_t, part), [batch, out_h, -1])
                gradient = add_cols(gradient, tf.matmul(down_t, part), col_src, width)
            return gradient

        return y, grad

    return blur(x)


class BaseBlurPool(keras.layers.Layer):
    """Base of the anti-aliasing layers: a fixed binomial blur, then subsampling.

    Holds the arguments and the state shared by `BlurPool` and
    `MaxBlurPool`: the depthwise binomial kernel, created in `build` as a
    non-trainable weight (so it is saved with the model and never trained),
    and the padded, strided depthwise blur in `blur`.

    Args:
        filt_size: size of the binomial filter, 1 to 7; 1 is plain
            subsampling.
        strides: subsampling factor, an int or `(height, width)`.
        pad_type: `"reflect"`, `"replicate"` or `"zero"`.
        **kwargs: base `Layer` arguments.
    """

    def __init__(self, filt_size=4, strides=2, pad_type="reflect", **kwargs):
        super().__init__(**kwargs)
        self.filt_size = check_filt_size(filt_size)
        self.strides = check_pair(strides, "strides")
        self.pad_type = check_pad_type(pad_type)

    def build(self, input_shape):
        if len(input_shape) != 4:
            raise ValueError(
                f"{type(self).__name__} takes channels-last images [batch, height, width, "
                f"channels]. Received: input_shape={tuple(input_shape)}"
            )
        channels = input_shape[-1]
        if channels is None:
            raise ValueError(
                f"{type(self).__name__} needs a known channel count. "
                f"Received: input_shape={tuple(input_shape)}"
            )
        kernel = blur_kernel(self.filt_size)
        value = np.tile(kernel[:, :, None, None], (1, 1, int(channels), 1))
        self.kernel = self.add_weight(
            name="kernel",
            shape=value.shape,
            initializer=lambda shape, dtype=None: ops.convert_to_tensor(value, dtype=dtype),
            trainable=False,
        )

    def blur(self, x):
        """The anti-aliased subsampling of `x` (channels last)."""
        stride_h, stride_w = self.strides
        if self.filt_size == 1:
            # Plain subsampling, the same values as `x[:, ::s_h, ::s_w]`: a
            # strided 1x1 depthwise convolution with unit taps at equal
            # strides (its gradient about 25% faster than a 1x1 average
            # pool's), else that average pool (TensorFlow's depthwise
            # convolution takes equal strides only). Both gradients are
            # strided scatters, several times faster than StridedSliceGrad.
            if stride_h == stride_w:
                return ops.depthwise_conv(
                    x, ops.cast(self.kernel, x.dtype), strides=stride_h, padding="valid"
                )
            return ops.average_pool(x, 1, strides=(stride_h, stride_w), padding="valid")
        kernel = ops.cast(self.kernel, x.dtype)
        if (
            self.pad_type == "zero"
            and stride_h == stride_w
            and x.shape[1] is not None
            and x.shape[2] is not None
        ):
            # Zero padding that a 'same' convolution reproduces needs no
            # padded copy: one strided depthwise convolution.
            return _zero_padded_blur(x, kernel, self.filt_size, stride_h)
        static = x.shape[1] is not None and x.shape[2] is not None
        if static and keras.backend.backend() == "tensorflow":
            if x.shape[1] * x.shape[2] <= _MATRIX_BLUR_MAX_SAMPLES:
                return _matrix_blur(x, self.filt_size, self.strides, self.pad_type)
            if stride_h == stride_w:
                # The zero-padded convolution plus the ring of copied
                # samples at the border.
                y = _ring_blur(x, kernel, self.filt_size, stride_h, self.pad_type)
                if y is not None:
                    return y
        return padded_blur(x, kernel, self.filt_size, self.strides, self.pad_type)

    def blurred_shape(self, input_shape):
        batch, height, width, channels = input_shape
        return (
            batch,
            blurred_size(height, self.strides[0]),
            blurred_size(width, self.strides[1]),
            channels,
        )

    def get_config(self):
        config = super().get_config()
        config.update(
            {"filt_size": self.filt_size, "strides": self.strides, "pad_type": self.pad_type}
        )
        return config
