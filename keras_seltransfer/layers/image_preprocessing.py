"""ImagePreprocessing: the input normalisation of a backbone, as a layer."""

import keras
from keras import ops

from keras_seltransfer.utils.validation import check_choice

# Per-channel constants of the ImageNet preprocessing conventions used by
# `keras.applications` (RGB order).
_IMAGENET_MEAN_RGB = (0.485, 0.456, 0.406)
_IMAGENET_STD_RGB = (0.229, 0.224, 0.225)
_CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)

MODES = ("none", "rescale", "tf", "torch", "caffe")


@keras.saving.register_keras_serializable(package="keras_seltransfer")
class ImagePreprocessing(keras.layers.Layer):
    """Maps raw pixel values in [0, 255] to what a backbone expects.

    Models built by keras_seltransfer take raw images, so the same pixels
    flow from the tf.data pipeline, through training, into the exported
    SavedModel. This layer puts each backbone's own normalisation inside the
    model.

    Modes:
    - `"none"`: identity (backbones that normalise internally).
    - `"rescale"`: `x / 255`, to [0, 1] (the built-in backbones).
    - `"tf"`: `x / 127.5 - 1`, to [-1, 1] (MobileNet, Inception, Xception).
    - `"torch"`: `(x / 255 - mean) / std` with ImageNet statistics (DenseNet).
    - `"caffe"`: RGB to BGR, then minus the ImageNet BGR mean (ResNet50, VGG).

    Args:
        mode: one of `"none"`, `"rescale"`, `"tf"`, `"torch"`, `"caffe"`.
        **kwargs: base `Layer` arguments.

    Call arguments:
        inputs: float tensor `[batch, height, width, channels]` in [0, 255].
            `"torch"` and `"caffe"` need 3 channels.

    Returns:
        The normalised tensor, same shape.

    Example:

    ```python
    inputs = keras.Input((224, 224, 3))  # raw pixels in [0, 255]
    x = ImagePreprocessing("caffe")(inputs)
    features = keras.applications.ResNet50(include_top=False, weights=None)(x)
    ImagePreprocessing("tf")(np.full((1, 2, 2, 3), 255.0))  # all ones
    ```
    """

    def __init__(self, mode="rescale", **kwargs):
        super().__init__(**kwargs)
        check_choice(mode, "mode", MODES)
        self.mode = mode

    def build(self, input_shape):
        if self.mode in ("torch", "caffe") and input_shape[-1] != 3:
            raise ValueError(
                f"ImagePreprocessing(mode={self.mode!r}) needs RGB inputs with "
                f"3 channels. Received: input_shape={tuple(input_shape)}"
            )

    def call(self, inputs):
        x = ops.cast(inputs, self.compute_dtype)
        if self.mode == "rescale":
            return x / 255.0
        if self.mode == "tf":
            return x / 127.5 - 1.0
        if self.mode == "torch":
            mean = ops.convert_to_tensor(_IMAGENET_MEAN_RGB, dtype=x.dtype)
            std = ops.convert_to_tensor(_IMAGENET_STD_RGB, dtype=x.dtype)
            return (x / 255.0 - mean) / std
        if self.mode == "caffe":
            mean = ops.convert_to_tensor(_CAFFE_MEAN_BGR, dtype=x.dtype)
            return ops.flip(x, axis=-1) - mean
        return x

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update({"mode": self.mode})
        return config


__all__ = [
    "MODES",
    "ImagePreprocessing",
]
