"""ValidationCollapseMonitor: warns when validation accuracy falls as training accuracy rises.

A run whose training accuracy climbs while its validation accuracy drops
has stopped learning what it is scored on (statistics that do not match the
validation data, overfitting, a broken input). Early stopping then keeps an
early epoch and the run ends with a plausible-looking report; the monitor
makes it impossible to miss.
"""

import warnings

import keras
import numpy as np

from keras_seltransfer.utils.validation import is_int


def validation_collapse(train_accuracy, val_accuracy, *, window=2, min_drop=0.1):
    """Whether the last epochs show a validation collapse (a pure rule).

    Compares the last `window` epochs with the `window` epochs before them:
    a collapse is a fall of the mean validation accuracy by at least
    `min_drop` while the mean training accuracy rose.

    Args:
        train_accuracy: per-epoch training accuracy, oldest first.
        val_accuracy: per-epoch validation accuracy, same length.
        window: epochs per compared window.
        min_drop: smallest fall of the mean validation accuracy that counts.

    Returns:
        True when the rule fires at the last epoch; False otherwise,
        including when there are fewer than `2 * window` epochs.

    Raises:
        ValueError: for histories of different lengths or bad parameters.

    Example:

    ```python
    validation_collapse([0.5, 0.6, 0.7, 0.8], [0.8, 0.8, 0.6, 0.6])
    # True: validation fell by 0.2 while training rose
    validation_collapse([0.5, 0.6, 0.7, 0.8], [0.6, 0.7, 0.7, 0.8])
    # False
    ```
    """
    train = np.asarray(train_accuracy, dtype=np.float64)
    val = np.asarray(val_accuracy, dtype=np.float64)
    if train.ndim != 1 or train.shape != val.shape:
        raise ValueError(
            "Expected `train_accuracy` and `val_accuracy` to be 1-D histories of the same "
            f"length. Received: shapes {train.shape} and {val.shape}"
        )
    if not is_int(window) or window < 1:
        raise ValueError(f"Expected `window` to be a positive int. Received: window={window!r}")
    if not min_drop > 0:
        raise ValueError(f"Expected `min_drop` > 0. Received: min_drop={min_drop!r}")
    if len(train) < 2 * window:
        return False
    before, last = slice(-2 * window, -window), slice(-window, None)
    val_drop = val[before].mean() - val[last].mean()
    return bool(val_drop >= min_drop and train[last].mean() > train[before].mean())


class ValidationCollapseMonitor(keras.callbacks.Callback):
    """Warns when validation accuracy falls while training accuracy rises.

    At the end of every epoch it applies `validation_collapse` to the
    history of `logs[accuracy]` and `logs["val_" + accuracy]`; the first
    time the rule fires it warns (`warnings.warn`), and every epoch it adds
    `validation_collapse` (1 at a flagged epoch, else 0) to the logs, so the
    History, TensorBoard (when it comes later in the callback list) and the
    run's report carry it. `collapsed_epochs` lists the flagged epochs.
    Epochs without both metrics are skipped.

    Args:
        accuracy: name of the training accuracy in the logs (the joint
            model's is `"target_accuracy"`).
        window: epochs per compared window (see `validation_collapse`).
        min_drop: smallest fall of the mean validation accuracy that counts.

    Example:

    ```python
    monitor = ValidationCollapseMonitor("accuracy", window=2, min_drop=0.1)
    model.fit(x, y, validation_data=(x_val, y_val), epochs=20, callbacks=[monitor])
    monitor.collapsed_epochs  # e.g. [] when validation accuracy kept up
    ```
    """

    def __init__(self, accuracy="accuracy", *, window=2, min_drop=0.1):
        super().__init__()
        # Check the parameters now rather than at the end of an epoch.
        validation_collapse([], [], window=window, min_drop=min_drop)
        self.accuracy = accuracy
        self.window = int(window)
        self.min_drop = float(min_drop)
        self.collapsed_epochs = []
        self._train = []
        self._val = []

    def on_train_begin(self, logs=None):
        self.collapsed_epochs = []
        self._train = []
        self._val = []

    def on_epoch_end(self, epoch, logs=None):
        if logs is None:
            return
        train = logs.get(self.accuracy)
        val = logs.get("val_" + self.accuracy)
        if train is None or val is None:
            return
        self._train.append(float(train))
        self._val.append(float(val))
        collapsed = validation_collapse(
            self._train, self._val, window=self.window, min_drop=self.min_drop
        )
        logs["validation_collapse"] = float(collapsed)
        if not collapsed:
            return
        if not self.collapsed_epochs:
            w = self.window
            warnings.warn(
                f"Validation collapse at epoch {epoch + 1}: mean validation {self.accuracy} "
                f"fell from {np.mean(self._val[-2 * w:-w]):.3f} to {np.mean(self._val[-w:]):.3f} "
                f"while training {self.accuracy} rose from {np.mean(self._train[-2 * w:-w]):.3f} "
                f"to {np.mean(self._train[-w:]):.3f} (windows of {w} epochs). The model fits "
                "its training batches but not the validation data: check BatchNorm statistics "
                "(train vs frozen, statistics of mixed batches), the learning rate and the data.",
                stacklevel=2,
            )
        self.collapsed_epochs.append(int(epoch))


__all__ = ["ValidationCollapseMonitor", "validation_collapse"]
