"""ValidationCollapseMonitor and its rule."""

import warnings

import keras
import numpy as np
import pytest

from keras_seltransfer.callbacks import ValidationCollapseMonitor
from keras_seltransfer.callbacks import validation_collapse


def test_rule_flags_the_collapse_of_issue_14():
    # The shape reported for SJFT on a target unlike its source: training
    # accuracy near 1 from the second epoch on, validation accuracy at chance.
    train = [0.62, 0.93, 0.98, 0.99]
    val = [0.78, 0.31, 0.22, 0.18]
    assert not validation_collapse(train[:3], val[:3])  # fewer than 2 windows of 2
    assert validation_collapse(train, val)
    # Means of the windows: val 0.545 -> 0.20, train 0.775 -> 0.985.
    assert validation_collapse(train, val, window=2, min_drop=0.34)
    assert not validation_collapse(train, val, window=2, min_drop=0.35)
    assert validation_collapse(train[:2], val[:2], window=1)


def test_rule_ignores_healthy_and_noisy_runs():
    # Both rise: learning.
    assert not validation_collapse([0.6, 0.7, 0.8, 0.9], [0.6, 0.65, 0.7, 0.72])
    # Validation falls but training falls too (a bad step, not a collapse).
    assert not validation_collapse([0.9, 0.9, 0.7, 0.6], [0.8, 0.8, 0.6, 0.5])
    # Noise of a few images on a small validation set.
    assert not validation_collapse([0.8, 0.85, 0.88, 0.9], [0.75, 0.72, 0.70, 0.74])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"train_accuracy": [1, 2], "val_accuracy": [1]}, "same length"),
        ({"train_accuracy": [1], "val_accuracy": [1], "window": 0}, "Received: window=0"),
        ({"train_accuracy": [1], "val_accuracy": [1], "min_drop": 0}, "Received: min_drop=0"),
    ],
)
def test_rule_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        validation_collapse(**kwargs)


def _fit(val_labels_flipped, epochs=6):
    """A logistic model learning x > 0; validation labels optionally flipped,
    so validation accuracy falls exactly as training accuracy rises."""
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(256, 1)).astype("float32")
    y = (x[:, 0] > 0).astype("int32")
    x_val = rng.normal(size=(128, 1)).astype("float32")
    y_val = (x_val[:, 0] > 0).astype("int32")
    if val_labels_flipped:
        y_val = 1 - y_val
    inputs = keras.Input((1,))
    dense = keras.layers.Dense(2, activation="softmax")
    model = keras.Model(inputs, dense(inputs))
    # Start on the wrong side: training accuracy starts low and climbs.
    dense.kernel.assign([[1.0, -1.0]])
    model.compile(keras.optimizers.SGD(0.05), "sparse_categorical_crossentropy", metrics=["accuracy"])
    monitor = ValidationCollapseMonitor("accuracy", window=1, min_drop=0.1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        history = model.fit(
            x, y, validation_data=(x_val, y_val), epochs=epochs, batch_size=32,
            callbacks=[monitor], verbose=0, shuffle=False,
        )
    return monitor, history.history, [w for w in caught if "Validation collapse" in str(w.message)]


def test_callback_warns_once_and_logs_the_flag():
    monitor, history, warned = _fit(val_labels_flipped=True)
    assert history["accuracy"][-1] > history["accuracy"][0] + 0.3
    assert history["val_accuracy"][-1] < history["val_accuracy"][0] - 0.3
    assert monitor.collapsed_epochs, history
    assert len(warned) == 1
    assert "validation accuracy" in str(warned[0].message)
    flags = history["validation_collapse"]
    assert len(flags) == 6
    assert [e for e, f in enumerate(flags) if f == 1.0] == monitor.collapsed_epochs
    # The same callback on a healthy run: no flag, no warning (state reset).
    healthy, history, warned = _fit(val_labels_flipped=False)
    assert not healthy.collapsed_epochs and not warned
    assert set(history["validation_collapse"]) == {0.0}


def test_callback_rejects_bad_parameters():
    with pytest.raises(ValueError, match="window"):
        ValidationCollapseMonitor(window=0)
