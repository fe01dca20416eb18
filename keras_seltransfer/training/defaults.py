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

# The candidates of `method="auto"`, simplest first: the baselines that the
# measured comparisons (docs/results/RESULTS.md) found strongest (the linear
# probe, LP-FT, fine-tuning with either BatchNorm mode), then one method of
# each paper.
AUTO_CANDIDATES = (
    "linear_probe",
    "lp_ft",
    "baseline",
    "baseline:batchnorm=train",
    "sjft",
    "adafilter",
    "filter_transfer",
    "ktft",
)
AUTO_METRICS = ("balanced_accuracy", "accuracy")
AUTO_RULES = ("one_se", "best")

__all__ = [
    "AUTO_CANDIDATES",
    "AUTO_METRICS",
    "AUTO_RULES",
    "BATCHNORM_MODES",
    "CLASS_WEIGHTS",
    "DEFAULT_BACKBONE",
    "DEFAULT_PRETRAIN_DIR",
    "MAX_IMAGE_SIZE",
    "MAX_SEED",
    "OPTIMIZERS",
    "PRECISIONS",
]
