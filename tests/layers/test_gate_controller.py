import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_seltransfer.layers.gate_controller import GateController
from keras_seltransfer.layers.gated_conv import GatedConv
from keras_seltransfer.layers.gates import discrete_gates
from keras_seltransfer.layers.gates import gate_entropy
from keras_seltransfer.layers.gates import hard_gates
from keras_seltransfer.layers.gates import input_dependence
from keras_seltransfer.layers.gates import straight_through_gumbel
from keras_seltransfer.layers.gates import straight_through_threshold
from tests import helpers


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def test_threshold_gates_are_exact_with_the_sigmoid_gradient():
    logits = tf.constant([-3.0, -0.1, 0.0, 0.2, 4.0, 1e-3])
    np.testing.assert_array_equal(hard_gates(logits), [0, 0, 0, 1, 1, 1])
    weights = tf.constant([1.0, 2.0, -1.0, 0.5, 3.0, 1.0])
    with tf.GradientTape() as tape:
        tape.watch(logits)
        gates = straight_through_threshold(logits)
        loss = tf.reduce_sum(gates * weights)
    np.testing.assert_array_equal(gates, hard_gates(logits))  # exact, no rounding
    s = _sigmoid(logits.numpy())
    np.testing.assert_allclose(tape.gradient(loss, logits), weights * s * (1 - s), rtol=1e-6)


def test_gumbel_gates_sample_sigmoid_probabilities_with_the_relaxed_gradient():
    logits = tf.constant(np.repeat([[-2.0, 0.0, 1.5]], 20000, axis=0).astype("float32"))
    gates = straight_through_gumbel(logits, seed=7)
    assert set(np.unique(gates)) == {0.0, 1.0}
    np.testing.assert_allclose(
        gates.numpy().mean(axis=0), _sigmoid(np.array([-2.0, 0.0, 1.5])), atol=0.015
    )
    # The same integer seed draws the same noise: rebuild it and check the
    # sample and the gradient of the relaxed sample in closed form.
    small = tf.constant([[-1.0, 0.3, 2.0], [0.5, -0.2, 0.0]])
    u = keras.random.uniform(small.shape, minval=1e-7, maxval=1 - 1e-7, seed=3).numpy()
    noisy = small.numpy() + np.log(u) - np.log(1 - u)
    temperature = 0.5
    with tf.GradientTape() as tape:
        tape.watch(small)
        sample = straight_through_gumbel(small, temperature=temperature, seed=3)
        loss = tf.reduce_sum(sample)
    np.testing.assert_array_equal(sample, (noisy > 0).astype("float32"))
    s = _sigmoid(noisy / temperature)
    np.testing.assert_allclose(tape.gradient(loss, small), s * (1 - s) / temperature, rtol=1e-4)


def test_discrete_gates_sample_only_in_gumbel_training():
    logits = tf.constant(np.random.default_rng(0).normal(0, 1, (64, 16)).astype("float32"))
    seed = keras.random.SeedGenerator(1)
    a = discrete_gates(logits, "gumbel", training=True, seed=seed)
    b = discrete_gates(logits, "gumbel", training=True, seed=seed)
    assert np.abs(a.numpy() - b.numpy()).sum() > 0  # stochastic in training
    for estimator in ("gumbel", "ste"):
        np.testing.assert_array_equal(
            discrete_gates(logits, estimator, training=False, seed=seed), hard_gates(logits)
        )
    np.testing.assert_array_equal(discrete_gates(logits, "ste", training=True), hard_gates(logits))
    with pytest.raises(ValueError, match="`estimator` must be one of"):
        discrete_gates(logits, "softmax")
    with pytest.raises(ValueError, match="`temperature` must be > 0"):
        straight_through_gumbel(logits, temperature=0.0)
    with pytest.raises(ValueError, match="floating-point tensor"):
        hard_gates(np.array([1, 2]))


def _np_lstm(z, h, c, kernel, recurrent, bias):
    i, f, g, o = np.split(z @ kernel + h @ recurrent + bias, 4, axis=-1)
    c = _sigmoid(f) * c + _sigmoid(i) * np.tanh(g)
    return _sigmoid(o) * np.tanh(c), c


def test_controller_matches_a_numpy_lstm_over_two_steps():
    rng = np.random.default_rng(1)
    controller = GateController(input_channels=[3, 5], filters=[4, 2], units=6)
    x0 = rng.normal(0, 1, (2, 4, 4, 3)).astype("float32")
    x1 = rng.normal(0, 1, (2, 5)).astype("float32")  # already pooled
    controller(x0, step=0)
    values = {}
    for w in controller.weights:
        values[w.path] = rng.normal(0, 1, w.shape).astype("float32")
        w.assign(values[w.path])
    get = {w.name: values[w.path] for w in controller.weights}
    assert np.array_equal(get["bias"], controller.bias.numpy())

    g0, states = controller(x0, step=0)
    g1, states1 = controller(x1, states, step=1)
    z = x0.mean(axis=(1, 2)) @ get["input_kernel_0"] + get["input_bias_0"]
    h, c = _np_lstm(z, 0 * z, 0 * z, get["kernel"], get["recurrent_kernel"], get["bias"])
    logits0 = h @ get["output_kernel_0"] + get["output_bias_0"]
    np.testing.assert_allclose(states[0], h, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(states[1], c, rtol=1e-5, atol=1e-6)
    z = x1 @ get["input_kernel_1"] + get["input_bias_1"]
    h, c = _np_lstm(z, h, c, get["kernel"], get["recurrent_kernel"], get["bias"])
    logits1 = h @ get["output_kernel_1"] + get["output_bias_1"]
    np.testing.assert_allclose(states1[0], h, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(states1[1], c, rtol=1e-5, atol=1e-6)
    for gates, logits in ((g0, logits0), (g1, logits1)):
        assert np.abs(logits).min() > 1e-3  # no logit on the threshold
        np.testing.assert_array_equal(gates, (logits > 0).astype("float32"))
    # The running count of open gates per example.
    np.testing.assert_array_equal(states1[2][:, 0], g0.numpy().sum(1) + g1.numpy().sum(1))


def test_lstm_forget_bias_starts_at_one_and_gate_biases_at_zero():
    controller = GateController(input_channels=[2], filters=[3], units=4)
    controller(np.ones((1, 2), "float32"), step=0)
    np.testing.assert_array_equal(controller.bias.numpy(), [0] * 4 + [1] * 4 + [0] * 8)
    np.testing.assert_array_equal(controller.output_biases[0].numpy(), np.zeros(3))


def _gated_model(**controller_kwargs):
    """Image -> two gated 1x1 convolutions threaded through one controller."""
    controller = GateController(
        input_channels=[3, 4], filters=[4, 2], units=8, step_names=["a", "b"],
        name="controller", **controller_kwargs,
    )
    inputs = keras.Input((6, 6, 3))
    gates_a, states = controller(inputs, step=0)
    x = GatedConv(4, 1, activation="relu", name="a")(inputs, gates_a)
    gates_b, states = controller(x, states, step=1)
    x = GatedConv(2, 1, name="b")(x, gates_b)
    outputs = keras.layers.Dense(2, activation="softmax")(keras.layers.Flatten()(x))
    model = keras.Model(inputs, outputs)
    probe = keras.Model(inputs, [gates_a, gates_b])
    return model, probe


def _data(n=32, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(0, 1, (n, 6, 6, 3)).astype("float32"), rng.integers(0, 2, n)


def test_usage_metrics_in_the_logs_match_the_gates():
    model, probe = _gated_model()
    x, y = _data()
    model.compile("adam", "sparse_categorical_crossentropy")
    logs = model.evaluate(x, y, batch_size=10, return_dict=True, verbose=0)
    ga, gb = (np.asarray(g) for g in probe(x))
    assert 0 < ga.mean() < 1 and 0 < gb.mean() < 1
    assert logs["gate_usage_a"] == pytest.approx(ga.mean(), abs=1e-6)
    assert logs["gate_usage_b"] == pytest.approx(gb.mean(), abs=1e-6)
    overall = (ga.sum() + gb.sum()) / (ga.size + gb.size)
    assert logs["gate_usage"] == pytest.approx(overall, abs=1e-6)
    history = model.fit(x, y, batch_size=16, epochs=1, verbose=0, validation_data=(x, y))
    for key in ("gate_usage", "gate_usage_a", "gate_usage_b", "val_gate_usage"):
        assert len(history.history[key]) == 1 and 0 <= history.history[key][-1] <= 1


def _numpy_entropy_bits(logits):
    p = _sigmoid(np.asarray(logits, "float64"))
    with np.errstate(divide="ignore", invalid="ignore"):
        h = -(p * np.log2(p) + (1 - p) * np.log2(1 - p))
    return np.nan_to_num(h)


def _numpy_input_dependence(gates):
    gates = np.asarray(gates)
    return np.mean([0 < column.sum() < len(column) for column in gates.T])


def test_entropy_and_input_dependence_match_numpy():
    logits = np.array([[0.0, 3.0, -40.0, 1.0], [0.5, -2.0, 60.0, 1.0]], "float32")
    np.testing.assert_allclose(gate_entropy(logits), _numpy_entropy_bits(logits), atol=1e-6)
    assert float(gate_entropy(np.zeros((1, 1), "float32"))[0, 0]) == pytest.approx(1.0)
    gates = np.array([[1, 0, 1, 0], [1, 1, 0, 0], [1, 0, 0, 0]], "float32")
    assert float(input_dependence(gates)) == pytest.approx(0.5)
    assert float(input_dependence(gates[:1])) == 0.0


def _logits_model(model):
    """The gate logits of `_gated_model`'s controller, recomputed in NumPy."""
    controller = model.get_layer("controller")
    w = {v.path.split("/")[-1]: v.numpy().astype("float64") for v in controller.weights}

    def run(x):
        h = c = np.zeros((len(x[0]), controller.units))
        out = []
        for step, inputs in enumerate(x):
            pooled = inputs.mean(axis=(1, 2))
            z = pooled @ w[f"input_kernel_{step}"] + w[f"input_bias_{step}"]
            fused = z @ w["kernel"] + h @ w["recurrent_kernel"] + w["bias"]
            i, f, g, o = np.split(fused, 4, axis=-1)
            c = _sigmoid(f) * c + _sigmoid(i) * np.tanh(g)
            h = _sigmoid(o) * np.tanh(c)
            out.append(h @ w[f"output_kernel_{step}"] + w[f"output_bias_{step}"])
        return out

    return run


def test_entropy_and_input_dependence_metrics_in_the_logs_match_numpy():
    model, probe = _gated_model()
    controller = model.get_layer("controller")
    rng = np.random.default_rng(4)
    for v in controller.trainable_weights:
        v.assign(rng.normal(0, 0.7, v.shape))
    x, y = _data(30)
    model.compile("adam", "sparse_categorical_crossentropy")
    logs = model.evaluate(x, y, batch_size=10, return_dict=True, verbose=0)
    first_layer = keras.Model(model.input, model.get_layer("a").output)
    hidden = np.asarray(first_layer(x), "float64")
    logits = _logits_model(model)([x.astype("float64"), hidden])
    gates = [np.asarray(g) for g in probe(x)]
    for name, lg, g in zip(("a", "b"), logits, gates):
        np.testing.assert_array_equal(g, (lg > 0).astype("float32"))
        entropy = _numpy_entropy_bits(lg).mean()
        assert logs[f"gate_entropy_{name}"] == pytest.approx(entropy, abs=1e-5)
        # Per-batch statistic, averaged over the three batches of 10.
        dependence = np.mean([_numpy_input_dependence(g[i : i + 10]) for i in (0, 10, 20)])
        assert logs[f"gate_input_dependence_{name}"] == pytest.approx(dependence, abs=1e-6)
    filters = np.array([4, 2])
    overall_entropy = sum(
        f * _numpy_entropy_bits(lg).mean() for f, lg in zip(filters, logits)
    ) / filters.sum()
    assert logs["gate_entropy"] == pytest.approx(overall_entropy, abs=1e-5)
    overall_dependence = sum(
        f * np.mean([_numpy_input_dependence(g[i : i + 10]) for i in (0, 10, 20)])
        for f, g in zip(filters, gates)
    ) / filters.sum()
    assert logs["gate_input_dependence"] == pytest.approx(overall_dependence, abs=1e-6)
    assert 0 < logs["gate_input_dependence"] < 1
    history = model.fit(x, y, batch_size=10, epochs=1, verbose=0, validation_data=(x, y))
    for key in ("gate_entropy", "gate_input_dependence_b", "val_gate_entropy_a"):
        assert len(history.history[key]) == 1


def test_normalized_inputs_match_a_numpy_batch_norm():
    controller = GateController(input_channels=[3], filters=[2], units=4, normalize_inputs=True,
                                momentum=0.8)
    rng = np.random.default_rng(6)
    x = rng.normal(5.0, 0.01, (16, 4, 4, 3)).astype("float32")  # images that look alike
    controller(x, step=0)
    plain = GateController(input_channels=[3], filters=[2], units=4)
    plain(x, step=0)
    for a, b in zip(plain.trainable_weights, controller.trainable_weights):
        b.assign(a)
    pooled = x.mean(axis=(1, 2)).astype("float64")
    mean, var = pooled.mean(0), pooled.var(0)
    standardized = (pooled - mean) / np.sqrt(var + 1e-3)
    g_train, _ = controller(x, step=0, training=True)
    g_ref, _ = plain(standardized.astype("float32"), step=0)
    np.testing.assert_array_equal(g_train, g_ref)
    np.testing.assert_allclose(controller.input_means[0].numpy(), 0.2 * mean, rtol=1e-5)
    np.testing.assert_allclose(
        controller.input_variances[0].numpy(), 0.8 + 0.2 * var, rtol=1e-5
    )
    # Inference uses the moving averages, and leaves them alone.
    moving_mean = controller.input_means[0].numpy()
    moving_var = controller.input_variances[0].numpy()
    g_infer, _ = controller(x, step=0)
    expected = (pooled - moving_mean) / np.sqrt(moving_var + 1e-3)
    np.testing.assert_array_equal(g_infer, plain(expected.astype("float32"), step=0)[0])
    np.testing.assert_array_equal(controller.input_means[0].numpy(), moving_mean)
    config = controller.get_config()
    assert config["normalize_inputs"] is True and config["momentum"] == 0.8
    with pytest.raises(ValueError, match="Received: momentum=1.0"):
        GateController(input_channels=[3], filters=[2], momentum=1.0)


def test_sparsity_loss_value_and_pull_toward_the_target():
    model, probe = _gated_model(usage_target=0.0, usage_weight=5.0)
    x, y = _data()
    model(x)
    ga, gb = (np.asarray(g) for g in probe(x))
    usage = (ga.sum() + gb.sum()) / (len(x) * 6)
    assert usage > 0.2
    [loss] = model.losses
    assert float(loss) == pytest.approx(5.0 * usage**2, rel=1e-5)
    model.compile(keras.optimizers.Adam(0.05), "sparse_categorical_crossentropy")
    model.fit(np.tile(x, (30, 1, 1, 1)), np.tile(y, 30), batch_size=32, epochs=1, verbose=0)
    ga, gb = (np.asarray(g) for g in probe(x))
    assert (ga.sum() + gb.sum()) / (len(x) * 6) < usage / 2
    without, _ = _gated_model()
    without(x)
    assert without.losses == []


def test_gumbel_controller_is_stochastic_in_training_only():
    model, probe = _gated_model(estimator="gumbel", temperature=0.5, seed=3)
    x, _ = _data(64)
    controller = model.get_layer("controller")
    state = controller.seed_generator.state.numpy().copy()
    a = [np.asarray(g) for g in probe(x, training=True)]
    b = [np.asarray(g) for g in probe(x, training=True)]
    assert any(np.abs(i - j).sum() > 0 for i, j in zip(a, b))
    assert not np.array_equal(controller.seed_generator.state.numpy(), state)
    c = [np.asarray(g) for g in probe(x)]
    d = [np.asarray(g) for g in probe(x, training=False)]
    for i, j in zip(c, d):
        np.testing.assert_array_equal(i, j)


def test_config_and_keras_round_trip(tmp_path):
    model, _ = _gated_model(estimator="gumbel", temperature=0.3, usage_target=0.4, seed=2)
    controller = model.get_layer("controller")
    rng = np.random.default_rng(3)
    for w in controller.weights:
        w.assign(rng.normal(0, 1, w.shape))
    x, _ = _data(8)
    restored = helpers.assert_layer_round_trip(
        controller, x, tmp_path, model=model, rtol=0, atol=0
    )
    assert restored.num_steps == 2
    assert [m.name for m in restored.metrics] == [
        f"gate_{kind}{step}"
        for kind in ("usage", "entropy", "input_dependence")
        for step in ("", "_a", "_b")
    ]


BAD_ARGUMENTS = [
    (dict(input_channels=[], filters=[]), "`input_channels` must be a non-empty list"),
    (dict(input_channels=[3], filters=[0]), "`filters` must be a non-empty list of positive"),
    (dict(input_channels=[3, 4], filters=[2]), "one entry per gated layer"),
    (dict(units=0), "`units` must be a positive int"),
    (dict(estimator="hard"), "`estimator` must be one of"),
    (dict(temperature=-1.0), "`temperature` must be > 0"),
    (dict(usage_target=1.5), r"`usage_target` must be in \[0, 1\]"),
    (dict(usage_weight=-0.1), "`usage_weight` must be >= 0"),
    (dict(step_names=["a", "a"]), "distinct names"),
]


def test_bad_arguments_and_calls_raise_clear_errors():
    for kwargs, message in BAD_ARGUMENTS:
        full = dict(input_channels=[3, 4], filters=[2, 2])
        full.update(kwargs)
        with pytest.raises(ValueError, match=message):
            GateController(**full)
    controller = GateController(input_channels=[3, 4], filters=[2, 2])
    x = np.ones((1, 5, 5, 3), "float32")
    with pytest.raises(ValueError, match=r"`step` must be an int in \[0, 2\)"):
        controller(x, step=2)
    with pytest.raises(ValueError, match="Step 1 .* expects inputs with 4 channels"):
        controller(x, step=1)
