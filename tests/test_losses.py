import keras
import numpy as np
import pytest

from keras_seltransfer.losses import GlobalLevelLoss
from keras_seltransfer.losses import PixelLevelLoss
from keras_seltransfer.losses import global_level_loss
from keras_seltransfer.losses import pixel_level_loss


def _maps(seed=0):
    rng = np.random.default_rng(seed)
    shapes = [(3, 6, 5, 4), (3, 3, 3, 8)]
    teacher = [rng.normal(size=s).astype("float32") for s in shapes]
    student = [t + rng.normal(scale=0.5, size=t.shape).astype("float32") for t in teacher]
    return teacher, student


def _numpy_pixel(teacher, student):
    per_stage = [
        ((s.astype(np.float64) - t) ** 2).reshape(len(t), -1).mean(1)
        for t, s in zip(teacher, student)
    ]
    return np.mean(per_stage, axis=0)


def _numpy_global(teacher, student):
    per_stage = []
    for t, s in zip(teacher, student):
        a, b = t.astype(np.float64).mean(axis=(1, 2)), s.astype(np.float64).mean(axis=(1, 2))
        cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
        per_stage.append(1.0 - cos)
    return np.mean(per_stage, axis=0)


def test_pixel_level_loss_matches_numpy():
    teacher, student = _maps()
    expected = _numpy_pixel(teacher, student)
    np.testing.assert_allclose(np.asarray(pixel_level_loss(teacher, student)), expected, rtol=1e-5)
    np.testing.assert_allclose(
        np.asarray(pixel_level_loss(teacher[0], student[0])),
        _numpy_pixel(teacher[:1], student[:1]),
        rtol=1e-5,
    )
    # The loss object reduces over the batch, with sample weights like any Keras loss.
    np.testing.assert_allclose(
        float(PixelLevelLoss()(teacher, student)), expected.mean(), rtol=1e-5
    )
    weights = np.array([1.0, 0.0, 2.0], "float32")
    np.testing.assert_allclose(
        float(PixelLevelLoss()(teacher, student, sample_weight=weights)),
        (expected * weights).sum() / 3,
        rtol=1e-5,
    )


def test_global_level_loss_matches_numpy_and_ignores_position_and_scale():
    teacher, student = _maps(1)
    expected = _numpy_global(teacher, student)
    np.testing.assert_allclose(
        np.asarray(global_level_loss(teacher, student)), expected, rtol=1e-4, atol=1e-6
    )
    np.testing.assert_allclose(
        float(GlobalLevelLoss()(teacher, student)), expected.mean(), rtol=1e-4
    )
    t = teacher[0]
    # Circularly shifted and rescaled maps have the same pooled direction:
    # no global-level loss, but a pixel-level one.
    moved = 3.0 * np.roll(t, (2, 1), axis=(1, 2))
    np.testing.assert_allclose(np.asarray(global_level_loss(t, moved)), 0.0, atol=1e-6)
    assert np.all(np.asarray(pixel_level_loss(t, moved)) > 0.5)
    # Opposite pooled vectors are at the maximum, 2; two silent maps agree.
    np.testing.assert_allclose(np.asarray(global_level_loss(t, -t)), 2.0, rtol=1e-5)
    zeros = np.zeros((2, 4, 4, 3), "float32")
    np.testing.assert_array_equal(np.asarray(global_level_loss(zeros, zeros)), 0.0)
    # Already pooled [batch, channels] features are taken as they are.
    pooled = t.mean(axis=(1, 2))
    np.testing.assert_allclose(
        np.asarray(global_level_loss(pooled, pooled[::-1])),
        np.asarray(global_level_loss(t, t[::-1])),
        rtol=1e-5,
    )


def test_losses_serialise_and_reject_bad_inputs():
    restored = keras.losses.deserialize(
        keras.losses.serialize(GlobalLevelLoss(epsilon=1e-8, name="g"))
    )
    assert (
        isinstance(restored, GlobalLevelLoss) and restored.epsilon == 1e-8 and restored.name == "g"
    )
    restored = keras.losses.deserialize(keras.losses.serialize(PixelLevelLoss(reduction="sum")))
    assert isinstance(restored, PixelLevelLoss) and restored.reduction == "sum"
    teacher, student = _maps()
    with pytest.raises(ValueError, match="equally long, non-empty lists"):
        pixel_level_loss(teacher, student[:1])
    with pytest.raises(ValueError, match="shape of its student map"):
        global_level_loss(teacher[0], student[1])
    with pytest.raises(ValueError, match="`epsilon` must be > 0"):
        GlobalLevelLoss(epsilon=0)
