"""Launcher of `keras_seltransfer.apps.data_service` (`python -m apps.data_service`)."""

import os

# Quiet TensorFlow's start-up logging and keep its default float32 kernels,
# before anything imports TensorFlow.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

from keras_seltransfer.apps import data_service as _app  # noqa: E402
from keras_seltransfer.apps.data_service import FLAGS  # noqa: E402,F401
from keras_seltransfer.apps.data_service import main  # noqa: E402,F401
from keras_seltransfer.apps.data_service import run  # noqa: E402

# absl prints the __main__ module's docstring as the usage of --help.
__doc__ = _app.__doc__

if __name__ == "__main__":
    run()
