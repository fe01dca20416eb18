"""MaxBlurPool: max pooling at stride 1, then BlurPool (Zhang, ICML 2019)."""

import keras
from keras import ops

from keras_seltransfer.layers.base_blur_pool import BaseBlurPool
from keras_seltransfer.utils.validation import check_pair


@keras.saving.register_keras_serializable(package="keras_seltransfer")
class MaxBlurPool(BaseBlurPool):
    """Anti-aliased max pooling: dense max pooling, then a blurred subsampling.

    Zhang splits `MaxPooling2D(pool_size, strides=s)` into its two parts: the
    max over each window, evaluated densely (stride 1), which does not alias,
    and the subsampling, which is done by `BlurPool` (binomial low-pass,
    then every s-th sample). With `padding="valid"` the output has the size
    of `MaxPooling2D(pool_size, strides, "valid")`, floor((n - k) / s) + 1;
    with `"same"`, ceil(n / s). With `filt_size=1` and `"valid"` padding it
    equals `MaxPooling2D(pool_size, strides)` exactly.

    Args:
        pool_size: max-pooling window, an int or `(height, width)`. Default 2.
        filt_size: size of the binomial filter, 1 to 7. Default 4.
        strides: subsampling factor, an int or `(height, width)`. Default 2.
        pad_type: padding of the blur: `"reflect"`, `"replicate"` or
            `"zero"` (see `BlurPool`).
        padding: padding of the max pooling, `"valid"` or `"same"`.
        **kwargs: base `Layer` arguments.

    Call arguments:
        inputs: channels-last tensor `[batch, height, width, channels]`.

    Returns:
        The pooled tensor, channels unchanged.

    Raises:
        ValueError: for an argument out of range, or (in `build`) an input
            that is not a 4-D tensor with a known channel count.

    Example:

    ```python
    y = MaxBlurPool(pool_size=2, filt_size=4)(keras.Input((32, 32, 8)))  # 16x16
    ```

    Reference:
        Zhang. Making Convolutional Networks Shift-Invariant Again. ICML 2019.
    """

    def __init__(
        self, pool_size=2, filt_size=4, strides=2, pad_type="reflect", padding="valid", **kwargs
    ):
        super().__init__(filt_size=filt_size, strides=strides, pad_type=pad_type, **kwargs)
        self.pool_size = check_pair(pool_size, "pool_size")
        if padding not in ("valid", "same"):
            raise ValueError(f"`padding` must be 'valid' or 'same'. Received: padding={padding!r}")
        self.padding = padding

    def build(self, input_shape):
        if self.padding == "valid" and len(input_shape) == 4:
            for size, window in zip(input_shape[1:3], self.pool_size):
                if size is not None and size < window:
                    raise ValueError(
                        f"MaxBlurPool with pool_size={self.pool_size} and 'valid' padding needs "
                        f"inputs at least that large. Received: input_shape={tuple(input_shape)}"
                    )
        super().build(input_shape)

    def call(self, inputs):
        pooled = ops.max_pool(inputs, self.pool_size, strides=1, padding=self.padding)
        return self.blur(pooled)

    def compute_output_shape(self, input_shape):
        batch, height, width, channels = input_shape
        if self.padding == "valid":
            height = None if height is None else height - self.pool_size[0] + 1
            width = None if width is None else width - self.pool_size[1] + 1
        return self.blurred_shape((batch, height, width, channels))

    def get_config(self):
        config = super().get_config()
        config.update({"pool_size": self.pool_size, "padding": self.padding})
        return config


__all__ = [
    "MaxBlurPool",
]
