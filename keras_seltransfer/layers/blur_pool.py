"""BlurPool: anti-aliased subsampling (Zhang, ICML 2019)."""

import keras

from keras_seltransfer.layers.base_blur_pool import BaseBlurPool


@keras.saving.register_keras_serializable(package="keras_seltransfer")
class BlurPool(BaseBlurPool):
    """Low-pass filters a feature map with a binomial kernel, then subsamples it.

    Subsampling a feature map (a strided convolution or pooling) aliases:
    detail above the new Nyquist frequency folds into false low-frequency
    content, so a one-pixel shift of the input can change the output a lot.
    Zhang's remedy blurs before subsampling. Each channel is convolved
    (depthwise) with the normalised outer product of the binomial taps of
    size `filt_size` ([1], [1, 1], [1, 2, 1], [1, 3, 3, 1], ...), after
    padding floor((f-1)/2) rows and columns before and ceil((f-1)/2) after,
    and every `strides`-th output is kept, so the output size is
    ceil(size / strides). With `filt_size=1` this is plain subsampling,
    `x[:, ::s, ::s]`.

    The kernel is fixed by the arguments: it is created in `build` as a
    non-trainable weight, so a model keeps the same parameter count for
    training and the kernel travels with `.keras` files and SavedModels.

    Args:
        filt_size: size of the binomial filter, 1 to 7. Default 4, the
            default of Zhang's released code.
        strides: subsampling factor, an int or `(height, width)`. Default 2.
        pad_type: `"reflect"` (mirror about the edge pixels, as PyTorch's
            `ReflectionPad2d`; TensorFlow's `SYMMETRIC` would repeat the edge
            pixel), `"replicate"` (repeat the edge pixels) or `"zero"`.
            Default `"reflect"`, as in Zhang's code.
        **kwargs: base `Layer` arguments (`name`, `dtype`, ...).

    Call arguments:
        inputs: channels-last tensor `[batch, height, width, channels]`,
            any channel count.

    Returns:
        `[batch, ceil(height / s_h), ceil(width / s_w), channels]`.

    Raises:
        ValueError: for an argument out of range, or (in `build`) an input
            that is not a 4-D tensor with a known channel count.

    Example:

    ```python
    x = keras.Input((32, 32, 16))
    y = keras.layers.Conv2D(32, 3, padding="same", activation="relu")(x)
    y = BlurPool(filt_size=4, strides=2)(y)  # [None, 16, 16, 32]
    ```

    Reference:
        Zhang. Making Convolutional Networks Shift-Invariant Again. ICML 2019.
    """

    def __init__(self, filt_size=4, strides=2, pad_type="reflect", **kwargs):
        super().__init__(filt_size=filt_size, strides=strides, pad_type=pad_type, **kwargs)

    def call(self, inputs):
        return self.blur(inputs)

    def compute_output_shape(self, input_shape):
        return self.blurred_shape(input_shape)


__all__ = [
    "BlurPool",
]
