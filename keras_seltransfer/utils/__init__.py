"""Small shared helpers: atomic file writes, untrusting archive reads, the
lock that gives a run directory to one run at a time (`run_lock`),
argument checks (`validation`), and the equal-mass histograms and symmetric
KL divergence of the retrieval descriptors (`histograms`, `divergence`)."""

from keras_seltransfer.utils.io import atomic_create_bytes
from keras_seltransfer.utils.io import atomic_create_text
from keras_seltransfer.utils.io import atomic_directory
from keras_seltransfer.utils.io import atomic_write_bytes
from keras_seltransfer.utils.io import atomic_write_text
from keras_seltransfer.utils.io import load_json_object
from keras_seltransfer.utils.io import load_npz
from keras_seltransfer.utils.io import npz_bytes
from keras_seltransfer.utils.io import save_model_atomic
from keras_seltransfer.utils.run_lock import RunLock
from keras_seltransfer.utils.run_lock import RunLockedError

__all__ = [
    "RunLock",
    "RunLockedError",
    "atomic_create_bytes",
    "atomic_create_text",
    "atomic_directory",
    "atomic_write_bytes",
    "atomic_write_text",
    "load_json_object",
    "load_npz",
    "npz_bytes",
    "save_model_atomic",
]
