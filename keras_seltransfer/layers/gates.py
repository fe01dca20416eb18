"""Discrete gates: AdaFilter's binary per-filter gates and their estimators.

AdaFilter (Guo et al., AAAI 2020) gates each filter per example with a gate
in {0, 1}, discretised from a logit. The hard threshold has no gradient, so
training uses an estimator [inferred, as in the authors' earlier SpotTune
code]: the straight-through threshold (hard forward, sigmoid gradient
backward) or straight-through Gumbel-softmax. These functions are the one
implementation of the estimators that `GateController` uses, with the gate
statistics it reports (`gate_entropy`, `input_dependence`).
"""

import keras
import numpy as np
from keras import ops

from keras_seltransfer.utils.validation import check_choice


# The gate estimators: "ste" (hard threshold, sigmoid gradient) and
# "gumbel" (straight-through Gumbel-softmax). The one list of estimator
# choices: models, training options and flags import it.
ESTIMATORS = ("ste", "gumbel")


# Keeps log(u) finite when the uniform noise hits 0 or 1.
_NOISE_EPS = 1e-7


def _check_logits(logits):
    if not hasattr(logits, "dtype") or "float" not in str(logits.dtype):
        raise ValueError(
            "`logits` must be a floating-point tensor. "
            f"Received: logits of type {type(logits).__name__}"
        )


def hard_gates(logits):
    """The deterministic gates of `logits`: 1 where `logits > 0`, else 0.

    This is the mode of both estimators' gate distributions (sigmoid of the
    logit above one half), used at inference and in exports.

    Args:
        logits: float tensor of gate logits.

    Returns:
        A tensor of the same shape and dtype holding exact zeros and ones.

    Example:

    ```python
    hard_gates(keras.ops.convert_to_tensor([-0.5, 0.0, 0.5]))  # [0., 0., 1.]
    ```
    """
    _check_logits(logits)
    return ops.cast(ops.greater(logits, 0), logits.dtype)


def _straight_through(hard, soft):
    # `hard + (soft - stop_gradient(soft))` is exactly `hard` in the forward
    # pass (x - x == 0 in floating point), unlike `soft + stop_gradient(hard -
    # soft)`, which can round a gate of 1 to 0.99999994; the gradient is that
    # of `soft`.
    return hard + (soft - ops.stop_gradient(soft))


def straight_through_threshold(logits):
    """Hard threshold gates with the sigmoid's gradient (straight-through).

    Forward: `hard_gates(logits)`. Backward: the gradient of
    `sigmoid(logits)`, so the gate network learns as if the gate were the
    probability of fine-tuning.

    Args:
        logits: float tensor of gate logits.

    Returns:
        Gates in {0, 1} (exactly), differentiable with respect to `logits`.

    Example:

    ```python
    logits = tf.Variable([[2.0, -2.0, 0.0]])
    with tf.GradientTape() as tape:
        gates = straight_through_threshold(logits)  # [[1., 0., 0.]]
        total = keras.ops.sum(gates)
    tape.gradient(total, logits)  # sigmoid'(logits): [[0.105, 0.105, 0.25]]
    ```
    """
    _check_logits(logits)
    return _straight_through(hard_gates(logits), ops.sigmoid(logits))


def straight_through_gumbel(logits, temperature=1.0, seed=None):
    """Straight-through Gumbel-softmax gates (a sampled binary concrete).

    Each gate is a two-way choice (fine-tuned, frozen) with logits
    `(logits, 0)`, so `P(gate = 1) = sigmoid(logits)`. The difference of two
    Gumbel variables is logistic, so a sample is `logits + log(u) - log(1 -
    u) > 0` with `u` uniform; the backward pass uses the gradient of the
    relaxed sample `sigmoid((logits + log(u) - log(1 - u)) / temperature)`.

    Args:
        logits: float tensor of gate logits.
        temperature: positive relaxation temperature of the gradient; lower
            is closer to the hard sample, with higher-variance gradients.
        seed: a `keras.random.SeedGenerator`, an int or None.

    Returns:
        Sampled gates in {0, 1} (exactly), differentiable with respect to
        `logits`.

    Example:

    ```python
    logits = tf.Variable([[2.0, -2.0, 0.0]])
    with tf.GradientTape() as tape:
        gates = straight_through_gumbel(logits, temperature=0.5, seed=0)
        total = keras.ops.sum(gates)
    tape.gradient(total, logits)  # the relaxed sample's gradient, non-zero
    ```

    Reference:
    - [Jang, Gu, Poole, "Categorical Reparameterization with
      Gumbel-Softmax", ICLR 2017](https://arxiv.org/abs/1611.01144)
    """
    _check_logits(logits)
    if not temperature > 0:
        raise ValueError(f"`temperature` must be > 0. Received: temperature={temperature}")
    # Noise in float32: in half precision 1 - 1e-7 rounds to 1 and log(1 - u)
    # becomes -inf.
    noisy = ops.cast(logits, "float32")
    u = keras.random.uniform(
        ops.shape(noisy), minval=_NOISE_EPS, maxval=1.0 - _NOISE_EPS, dtype="float32", seed=seed
    )
    noisy = noisy + ops.log(u) - ops.log(1.0 - u)
    gates = _straight_through(hard_gates(noisy), ops.sigmoid(noisy / temperature))
    return ops.cast(gates, logits.dtype)


def discrete_gates(logits, estimator="ste", temperature=1.0, training=False, seed=None):
    """The gates of `logits` under `estimator`, in training or at inference.

    Args:
        logits: float tensor of gate logits.
        estimator: `"ste"` (`straight_through_threshold`) or `"gumbel"`
            (`straight_through_gumbel`).
        temperature: Gumbel-softmax temperature (`"gumbel"` only).
        training: whether to sample (`"gumbel"`); outside training both
            estimators give the deterministic `hard_gates`.
        seed: seed of the Gumbel noise.

    Returns:
        Gates in {0, 1}, with the estimator's straight-through gradient.

    Example:

    ```python
    logits = keras.ops.convert_to_tensor([[-1.0, 0.5, 2.0]])
    discrete_gates(logits)  # [[0., 1., 1.]]: at inference, `hard_gates`
    discrete_gates(logits, estimator="gumbel", training=True, seed=1)  # sampled
    ```
    """
    check_choice(estimator, "estimator", ESTIMATORS)
    if estimator == "gumbel" and training:
        return straight_through_gumbel(logits, temperature, seed=seed)
    # The threshold estimator is deterministic in training as well; at
    # inference its straight-through form equals `hard_gates`.
    return straight_through_threshold(logits)


def gate_entropy(logits):
    """The binary entropy, in bits, of the gate probabilities `sigmoid(logits)`.

    Computed from the logits (`H = (log(1 + e^z) - z * sigmoid(z)) / log 2`,
    with a stable softplus), so it stays finite for saturated gates.

    Args:
        logits: float tensor of gate logits.

    Returns:
        A float32 tensor of the same shape, in [0, 1].

    Example:

    ```python
    gate_entropy(keras.ops.convert_to_tensor([0.0, 20.0]))
    # [1.0, ~0.0]: an undecided gate carries one bit, a saturated one none
    ```
    """
    _check_logits(logits)
    z = ops.cast(logits, "float32")
    nats = ops.softplus(z) - z * ops.sigmoid(z)
    return ops.maximum(nats, 0.0) / float(np.log(2.0))


def input_dependence(gates):
    """The fraction of filters whose gate differs across a batch's examples.

    A filter's gate is input-dependent on the batch when it is open (1) for
    some examples and closed (0) for others.

    Args:
        gates: `[batch, filters]` gates in {0, 1}.

    Returns:
        A float32 scalar in [0, 1] (0 for a batch of one example).

    Example:

    ```python
    gates = keras.ops.convert_to_tensor([[1.0, 0.0, 1.0], [1.0, 1.0, 0.0]])
    input_dependence(gates)  # 0.667: two of the three filters change with the input
    ```
    """
    gates = ops.cast(gates, "float32")
    opened = ops.max(gates, axis=0)
    closed = 1.0 - ops.min(gates, axis=0)
    return ops.mean(opened * closed)


__all__ = [
    "ESTIMATORS",
    "discrete_gates",
    "gate_entropy",
    "hard_gates",
    "input_dependence",
    "straight_through_gumbel",
    "straight_through_threshold",
]
