import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_seltransfer.models import build_classifier
from keras_seltransfer.models import small_cnn
from keras_seltransfer.regularizers import L2SP
from keras_seltransfer.regularizers import apply_l2sp
from keras_seltransfer.regularizers import l2sp_penalty


def _model():
    return build_classifier(small_cnn((8, 8, 1), widths=(3, 4)), 2)


def test_penalty_is_zero_at_start_and_matches_numpy_after_a_change():
    model = _model()
    start = {v.path: v.numpy().copy() for v in model.trainable_weights}
    apply_l2sp(model, alpha=0.3, beta=0.02)
    head = {v.path for v in model.get_layer("target_head").trainable_weights}
    head_start = sum(0.5 * 0.02 * np.sum(start[p] ** 2) for p in head)
    np.testing.assert_allclose(float(l2sp_penalty(model)), head_start, rtol=1e-5)

    rng = np.random.default_rng(0)
    for v in model.trainable_weights:
        v.assign(v.numpy() + rng.normal(size=v.shape).astype("float32"))
    expected = 0.0
    for v in model.trainable_weights:
        if v.path in head:
            expected += 0.5 * 0.02 * np.sum(v.numpy().astype(np.float64) ** 2)
        else:
            expected += 0.5 * 0.3 * np.sum((v.numpy() - start[v.path]).astype(np.float64) ** 2)
    np.testing.assert_allclose(float(l2sp_penalty(model)), expected, rtol=1e-4)


def test_gradient_pulls_toward_reference():
    v = keras.Variable(np.array([1.0, -2.0], "float32"))
    reg = L2SP(0.5, np.array([0.0, 0.0], "float32"))
    with tf.GradientTape() as tape:
        loss = reg(v)
    grad = tape.gradient(loss, v.value)
    np.testing.assert_allclose(grad, 0.5 * np.array([1.0, -2.0]))


def test_fit_includes_penalty_in_loss():
    model = _model()
    apply_l2sp(model, alpha=1.0, beta=0.0)
    model.compile(optimizer=keras.optimizers.SGD(0.0), loss="sparse_categorical_crossentropy")
    x = np.random.default_rng(0).uniform(0, 255, (4, 8, 8, 1)).astype("float32")
    y = np.array([0, 1, 0, 1])
    for v in model.trainable_weights:
        v.assign(v.numpy() + 1.0)
    penalty = float(l2sp_penalty(model))
    assert penalty > 0
    ce = float(keras.losses.sparse_categorical_crossentropy(y, model(x)).numpy().mean())
    loss = model.evaluate(x, y, batch_size=4, verbose=0)
    np.testing.assert_allclose(loss, ce + penalty, rtol=1e-4)


def test_saved_model_does_not_carry_the_penalty(tmp_path):
    model = _model()
    apply_l2sp(model)
    path = str(tmp_path / "m.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert all(v.regularizer is None for v in loaded.trainable_weights)


def test_argument_errors():
    with pytest.raises(ValueError, match="alpha"):
        L2SP(-1.0, np.zeros(2))
    with pytest.raises(ValueError, match="beta"):
        apply_l2sp(_model(), beta=-0.1)
    with pytest.raises(ValueError, match="head_layers"):
        apply_l2sp(_model(), head_layers=("no_such_head",))
