import keras
import numpy as np
import pytest

from keras_seltransfer.optimizers import MultiplierAdam
from keras_seltransfer.optimizers import MultiplierSGD
from keras_seltransfer.optimizers import make_optimizer


def _variables():
    rng = np.random.default_rng(0)
    layer = keras.layers.Dense(3, name="gates")
    layer.build((None, 2))
    other = keras.layers.Dense(3, name="other")
    other.build((None, 2))
    for v in layer.weights + other.weights:
        v.assign(rng.normal(size=v.shape).astype("float32"))
    return layer, other


def _numpy_adam(w, grads, lr, beta1=0.9, beta2=0.999, eps=1e-7):
    m = np.zeros_like(w)
    v = np.zeros_like(w)
    for t, g in enumerate(grads, start=1):
        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * g * g
        alpha = lr * np.sqrt(1 - beta2**t) / (1 - beta1**t)
        w = w - alpha * m / (np.sqrt(v) + eps)
    return w


def _numpy_sgd(w, grads, lr, momentum):
    velocity = np.zeros_like(w)
    for g in grads:
        velocity = momentum * velocity - lr * g
        w = w + velocity
    return w


@pytest.mark.parametrize("name", ["adam", "sgd"])
def test_matched_variables_step_with_multiplied_learning_rate(name):
    layer, other = _variables()
    variables = layer.weights + other.weights
    start = [v.numpy().copy() for v in variables]
    rng = np.random.default_rng(1)
    steps = [[rng.normal(size=v.shape).astype("float32") for v in variables] for _ in range(3)]
    lr, mult = 0.01, 7.0
    kwargs = {"momentum": 0.9} if name == "sgd" else {}
    optimizer = make_optimizer(name, lr, lr_multipliers={"^gates/": mult}, **kwargs)
    for grads in steps:
        optimizer.apply_gradients(zip(grads, variables))
    for i, v in enumerate(variables):
        grads = [s[i] for s in steps]
        rate = lr * mult if v.path.startswith("gates/") else lr
        if name == "adam":
            expected = _numpy_adam(start[i], grads, rate)
        else:
            expected = _numpy_sgd(start[i], grads, rate, 0.9)
        np.testing.assert_allclose(v.numpy(), expected, rtol=1e-5, atol=1e-6, err_msg=v.path)
    assert optimizer.multiplier_of(layer.kernel) == mult
    assert optimizer.multiplier_of(other.kernel) == 1.0


def test_schedule_is_multiplied_too():
    layer, _ = _variables()
    schedule = keras.optimizers.schedules.CosineDecay(0.1, decay_steps=4)
    optimizer = MultiplierSGD(schedule, lr_multipliers={"gates": 3.0})
    start = layer.kernel.numpy().copy()
    grads = [np.ones(layer.kernel.shape, "float32")]
    for _ in range(2):
        optimizer.apply_gradients(zip(grads, [layer.kernel]))
    rates = [0.1 * 0.5 * (1 + np.cos(np.pi * t / 4)) for t in range(2)]
    np.testing.assert_allclose(layer.kernel.numpy(), start - 3.0 * sum(rates), rtol=1e-6)


def test_config_round_trip_and_plain_fallback():
    optimizer = MultiplierAdam(1e-3, lr_multipliers={"^gate_controller/": 30.0})
    clone = keras.optimizers.deserialize(keras.optimizers.serialize(optimizer))
    assert isinstance(clone, MultiplierAdam)
    assert clone.lr_multipliers == {"^gate_controller/": 30.0}
    assert type(make_optimizer("adam", 1e-3)) is keras.optimizers.Adam
    assert type(make_optimizer("sgd", 1e-3, lr_multipliers={})) is keras.optimizers.SGD


@pytest.mark.parametrize(
    "multipliers, match",
    [
        ({"(": 2.0}, "regular expressions"),
        ({"x": 0.0}, "positive numbers"),
        ({"x": True}, "positive numbers"),
        (["x"], "must be a dict"),
    ],
)
def test_bad_multipliers(multipliers, match):
    with pytest.raises(ValueError, match=match):
        MultiplierAdam(1e-3, lr_multipliers=multipliers)


def test_bad_name():
    with pytest.raises(ValueError, match="Received: name='rmsprop'"):
        make_optimizer("rmsprop", 1e-3)
