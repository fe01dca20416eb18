"""Defaults shared by the training workflows, the apps and the tools."""

# Where `pretrain` writes the built-in backbone, and the backbone every
# fine-tuning run (and the conv filter bank of an index) reads by default.
from keras_seltransfer.models.backbones import DEFAULT_BACKBONE
from keras_seltransfer.models.backbones import DEFAULT_PRETRAIN_DIR

# Largest image size: a 4096x4096 RGB float32 image is already 200 MB, and a
# mistyped size (100000) would otherwise fail deep inside TensorFlow with an
# out-of-memory error after the data has been loaded.
MAX_IMAGE_SIZE = 4096

# NumPy and TensorFlow seeds are unsigned 32-bit integers.
MAX_SEED = 2**32 - 1

OPTIMIZERS = ("adam", "sgd")
PRECISIONS = ("float32", "mixed_float16", "mixed_bfloat16")
BATCHNORM_MODES = ("frozen", "train")
CLASS_WEIGHTS = ("none", "balanced")

__all__ = [
    "BATCHNORM_MODES",
    "CLASS_WEIGHTS",
    "DEFAULT_BACKBONE",
    "DEFAULT_PRETRAIN_DIR",
    "MAX_IMAGE_SIZE",
    "MAX_SEED",
    "OPTIMIZERS",
    "PRECISIONS",
]
