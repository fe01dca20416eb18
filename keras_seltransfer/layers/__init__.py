"""Custom Keras layers of keras_seltransfer (all registered for saving)."""

from keras_seltransfer.layers.blur_pool import BlurPool
from keras_seltransfer.layers.filter_mask import FilterMask
from keras_seltransfer.layers.gate_controller import GateController
from keras_seltransfer.layers.gated_conv import GatedConv
from keras_seltransfer.layers.gated_separable_conv import GatedSeparableConv
from keras_seltransfer.layers.image_preprocessing import ImagePreprocessing
from keras_seltransfer.layers.max_blur_pool import MaxBlurPool
from keras_seltransfer.layers.partially_frozen_batch_normalization import (
    PartiallyFrozenBatchNormalization,
)

__all__ = [
    "BlurPool",
    "FilterMask",
    "GateController",
    "GatedConv",
    "GatedSeparableConv",
    "ImagePreprocessing",
    "MaxBlurPool",
    "PartiallyFrozenBatchNormalization",
]
