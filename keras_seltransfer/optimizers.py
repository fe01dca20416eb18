"""Optimizers that give chosen variables a multiple of the learning rate.

AdaFilter trains a small gate network beside the fine-tuned filters; with one
shared learning rate the gates barely move in a short low-data run (the gate
network's gradient is a difference of two nearly equal paths). These
optimizers scale the learning rate of the variables whose path matches a
pattern, inside the optimizer's own update rule, so every other part of the
rule (Adam's moments and bias correction, SGD's momentum, the learning-rate
schedule, loss scaling, distribution) is unchanged.
"""

import numbers
import re

import keras


def _check_multipliers(lr_multipliers):
    if lr_multipliers is None:
        return {}
    if not isinstance(lr_multipliers, dict):
        raise ValueError(
            "`lr_multipliers` must be a dict from a regular expression (matched against "
            f"variable paths) to a positive number. Received: lr_multipliers={lr_multipliers!r}"
        )
    checked = {}
    for pattern, multiplier in lr_multipliers.items():
        try:
            re.compile(pattern)
        except (re.error, TypeError) as e:
            raise ValueError(
                f"`lr_multipliers` keys must be regular expressions ({e}). "
                f"Received: lr_multipliers={lr_multipliers!r}"
            ) from e
        if (
            isinstance(multiplier, bool)
            or not isinstance(multiplier, numbers.Real)
            or not float(multiplier) > 0
        ):
            raise ValueError(
                "`lr_multipliers` values must be positive numbers. "
                f"Received: lr_multipliers={lr_multipliers!r}"
            )
        checked[str(pattern)] = float(multiplier)
    return checked


class _LearningRateMultipliers:
    """Mixin over a Keras optimizer: per-variable learning-rate multipliers.

    A variable's multiplier is that of the first pattern (in dict order) that
    `re.search` finds in its `path` (e.g. `"gate_controller/kernel"`), and 1
    if none does. `update_step` receives the current learning rate (after the
    schedule) and passes `learning_rate * multiplier` to the base optimizer's
    rule, so the variable moves exactly as under the base optimizer with that
    learning rate. Decoupled weight decay (`weight_decay`) keeps the base
    learning rate.
    """

    def __init__(self, *args, lr_multipliers=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.lr_multipliers = _check_multipliers(lr_multipliers)
        self._multiplier_of_index = []

    def multiplier_of(self, variable):
        """The learning-rate multiplier of `variable` (matched by its path)."""
        path = getattr(variable, "path", None) or getattr(variable, "name", "")
        for pattern, multiplier in self.lr_multipliers.items():
            if re.search(pattern, path):
                return multiplier
        return 1.0

    def build(self, variables):
        super().build(variables)
        self._multiplier_of_index = [self.multiplier_of(v) for v in variables]

    def update_step(self, gradient, variable, learning_rate):
        if self._multiplier_of_index:
            multiplier = self._multiplier_of_index[self._get_variable_index(variable)]
            if multiplier != 1.0:
                learning_rate = learning_rate * multiplier
        return super().update_step(gradient, variable, learning_rate)

    def get_config(self):
        config = super().get_config()
        config["lr_multipliers"] = dict(self.lr_multipliers)
        return config


@keras.saving.register_keras_serializable(package="keras_seltransfer")
class MultiplierAdam(_LearningRateMultipliers, keras.optimizers.Adam):
    """`keras.optimizers.Adam` with learning-rate multipliers for chosen variables.

    Args:
        *args: `keras.optimizers.Adam` arguments.
        lr_multipliers: dict from a regular expression, searched in each
            variable's `path`, to the factor its learning rate is multiplied
            by (first match wins; unmatched variables keep the learning rate).
        **kwargs: `keras.optimizers.Adam` arguments.

    Example:

    ```python
    optimizer = MultiplierAdam(3e-4, lr_multipliers={"^gate_controller/": 30.0})
    ```
    """


@keras.saving.register_keras_serializable(package="keras_seltransfer")
class MultiplierSGD(_LearningRateMultipliers, keras.optimizers.SGD):
    """`keras.optimizers.SGD` with learning-rate multipliers for chosen variables.

    With momentum, the multiplier scales each step's contribution
    `learning_rate * gradient` to the velocity of the matched variables
    (Keras' form of momentum), so it scales their whole trajectory.

    Args:
        *args: `keras.optimizers.SGD` arguments.
        lr_multipliers: as in `MultiplierAdam`.
        **kwargs: `keras.optimizers.SGD` arguments.

    Example:

    ```python
    optimizer = MultiplierSGD(0.01, momentum=0.9, lr_multipliers={"^gate_controller/": 10.0})
    ```
    """


def make_optimizer(name, learning_rate, lr_multipliers=None, **kwargs):
    """The optimizer `name` (`"adam"` or `"sgd"`), with multipliers if any.

    Args:
        name: `"adam"` or `"sgd"`.
        learning_rate: float or `LearningRateSchedule`.
        lr_multipliers: as in `MultiplierAdam`; None or empty gives the plain
            Keras optimizer.
        **kwargs: further optimizer arguments (`momentum`, `weight_decay`...).

    Returns:
        A `keras.optimizers.Optimizer`.

    Example:

    ```python
    make_optimizer("sgd", 0.01, momentum=0.9)  # a plain keras.optimizers.SGD
    make_optimizer("adam", 3e-4, lr_multipliers={"^gate_controller/": 30.0})  # MultiplierAdam
    ```
    """
    classes = {
        "adam": (keras.optimizers.Adam, MultiplierAdam),
        "sgd": (keras.optimizers.SGD, MultiplierSGD),
    }
    if name not in classes:
        raise ValueError(f"`name` must be one of {tuple(classes)}. Received: name={name!r}")
    plain, scaled = classes[name]
    lr_multipliers = _check_multipliers(lr_multipliers)
    if not lr_multipliers:
        return plain(learning_rate, **kwargs)
    return scaled(learning_rate, lr_multipliers=lr_multipliers, **kwargs)


__all__ = ["MultiplierAdam", "MultiplierSGD", "make_optimizer"]
