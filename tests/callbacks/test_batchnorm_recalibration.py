"""BatchNormRecalibration: validation and the final model use the statistics of given data."""

import keras
import numpy as np
import pytest

from keras_seltransfer.callbacks import BatchNormRecalibration


class _Probe(keras.callbacks.Callback):
    """Records the BatchNorm moving mean each validation pass sees."""

    def __init__(self, norm):
        super().__init__()
        self.norm = norm
        self.seen = []

    def on_test_begin(self, logs=None):
        self.seen.append(np.asarray(self.norm.moving_mean).copy())


def _data():
    rng = np.random.default_rng(0)
    # "Source" and "target" halves with very different statistics, as the
    # mixed batches of joint fine-tuning.
    target = rng.normal(0.0, 1.0, size=(64, 4, 4, 2)).astype("float32")
    source = rng.normal(6.0, 3.0, size=(64, 4, 4, 2)).astype("float32")
    x = np.concatenate([target, source])
    y = np.concatenate([target[:, 0, 0, 0] > 0, source[:, 0, 0, 0] > 6]).astype("int32")
    return target, x, y


def _fit(callbacks_for):
    keras.utils.set_random_seed(0)
    target, x, y = _data()
    inputs = keras.Input((4, 4, 2))
    norm = keras.layers.BatchNormalization()
    features = keras.layers.Flatten()(norm(inputs))
    model = keras.Model(inputs, keras.layers.Dense(2, activation="softmax")(features))
    model.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"])
    probe = _Probe(norm)
    extra = callbacks_for(target)
    history = model.fit(
        x, y, validation_data=(target, y[:64]), epochs=3, batch_size=32,
        callbacks=[*extra, probe], verbose=0,
    )
    return model, norm, probe, extra, target, history


def test_validation_and_final_model_use_the_target_statistics():
    model, norm, probe, (recalibration,), target, _ = _fit(lambda t: [BatchNormRecalibration(t)])
    # Every validation pass and the end of training.
    assert recalibration.recalibrations == 4
    pixels = target.astype(np.float64).reshape(-1, 2)
    mean, var = pixels.mean(axis=0), pixels.var(axis=0)
    for seen in probe.seen:
        np.testing.assert_allclose(seen, mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(norm.moving_mean, mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(norm.moving_variance, var, rtol=1e-4, atol=1e-6)
    assert norm.trainable and norm.momentum == 0.99  # flags put back


def test_without_it_the_moving_statistics_describe_the_mixture():
    _, norm, probe, _, target, _ = _fit(lambda t: [])
    # Moving averages of mixed batches (mean 3) drift away from the target's 0.
    target_mean = target.reshape(-1, 2).mean(axis=0)
    assert np.abs(np.asarray(norm.moving_mean) - target_mean).min() > 0.1


def test_training_is_the_same_with_and_without_it():
    a = _fit(lambda t: [BatchNormRecalibration(t)])
    b = _fit(lambda t: [])
    # Training batches normalise with their own statistics: the training
    # losses and the learned kernels match; only the moving statistics differ.
    np.testing.assert_allclose(a[5].history["loss"], b[5].history["loss"], rtol=1e-5)
    np.testing.assert_allclose(a[0].layers[-1].get_weights()[0], b[0].layers[-1].get_weights()[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"batch_size": 0}, "batch_size` must be a positive int. Received: batch_size=0"),
        ({"max_images": -1}, "max_images` must be a positive int or None. Received: max_images=-1"),
        ({"batch_size": True}, "Received: batch_size=True"),
    ],
)
def test_bad_arguments_fail_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        BatchNormRecalibration(np.zeros((2, 8, 8, 1), "float32"), **kwargs)
