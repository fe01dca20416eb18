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
    index = np.arange(-before, n + after)
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


def _fold(gradient, axis, index, start, size):
    """The adjoint of gathering `index` along `axis` when positions
    `[start, start + size)` of `index` are the map itself: the map's slice
    of `gradient`, plus every padded position's gradient added (in place,
    one scatter) to the sample it copied."""
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
    if axis == 1:
        grid = (tf.range(shape[0]), copied)
    else:
        grid = (tf.range(shape[0]), tf.range(shape[1]), copied)
    indices = tf.stack(tf.meshgrid(*grid, indexing="ij"), axis=-1)
    return tf.tensor_scatter_nd_add(result, indices, part)


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
            return x[:, ::stride_h, ::stride_w, :]
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
