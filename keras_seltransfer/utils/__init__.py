"""Small shared helpers: atomic file writes, untrusting archive reads,
argument checks (`validation`), and the equal-mass histograms and symmetric
KL divergence of the retrieval descriptors (`histograms`, `divergence`)."""

from keras_seltransfer.utils.io import atomic_directory
from keras_seltransfer.utils.io import atomic_write_bytes
from keras_seltransfer.utils.io import atomic_write_text
from keras_seltransfer.utils.io import load_json_object
from keras_seltransfer.utils.io import load_npz
from keras_seltransfer.utils.io import npz_bytes
from keras_seltransfer.utils.io import save_model_atomic

__all__ = [
    "atomic_directory",
    "atomic_write_bytes",
    "atomic_write_text",
    "load_json_object",
    "load_npz",
    "npz_bytes",
    "save_model_atomic",
]
