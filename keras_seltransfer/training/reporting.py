"""Facts recorded with every result."""

import os
import platform

import keras
import numpy as np
import tensorflow as tf


def mean_std(values):
    """`(mean, population std)` of a list of numbers, as the result tables report.

    Example:

    >>> mean_std([1.0, 3.0])
    (2.0, 1.0)
    """
    values = np.asarray(values, dtype=np.float64)
    return float(values.mean()), float(values.std())


def run_environment():
    """Versions and machine facts recorded with every result.

    Example:

    ```python
    run_environment()["tensorflow"]  # '2.21.0'
    ```
    """
    return {
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "python": platform.python_version(),
        "machine": f"{platform.machine()} {platform.system()}, {os.cpu_count()} CPUs",
        "gpus": len(tf.config.list_physical_devices("GPU")),
    }


__all__ = ["mean_std", "run_environment"]
