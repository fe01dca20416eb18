"""GateController: AdaFilter's shared recurrent gate.

AdaFilter (Guo et al., AAAI 2020) decides, per example and per filter of
every gated convolution, whether the frozen pretrained filter or its
fine-tuned copy is used. The decisions come from one recurrent network
shared by all gated layers: before gated layer `l`, the activations entering
it are globally average-pooled, projected to the recurrent cell's width and
fed to one LSTM cell whose state is carried from layer to layer; a per-layer
projection of the cell's output gives one logit per filter of layer `l`,
which is discretised to a gate in {0, 1}.

The logits are discretised by `keras_seltransfer.layers.gates`, the one
implementation of the gate estimators.
"""

import keras
from keras import ops

from keras_seltransfer.layers.gates import discrete_gates
from keras_seltransfer.layers.gates import ESTIMATORS
from keras_seltransfer.layers.gates import gate_entropy
from keras_seltransfer.layers.gates import input_dependence
from keras_seltransfer.utils.validation import check_choice
from keras_seltransfer.utils.validation import is_int


def _positive_ints(name, values):
    values = list(values) if isinstance(values, (list, tuple)) else None
    if not values or any(not is_int(v) or v < 1 for v in values):
        raise ValueError(
            f"`{name}` must be a non-empty list of positive ints. Received: {name}={values}"
        )
    return [int(v) for v in values]


@keras.saving.register_keras_serializable(package="keras_seltransfer")
class GateController(keras.layers.Layer):
    """The recurrent gate network shared by all gated layers of AdaFilter.

    Called once per gated layer ("step"), in the network's order, on the
    activations entering that layer:
    `pooled = mean over height and width of inputs`,
    `z = pooled @ W_in[step] + b_in[step]` (one projection per step, since
    layers differ in width), one LSTM cell shared by all steps,
    `(h, c) = LSTM(z, (h, c))`, and
    `logits = h @ W_out[step] + b_out[step]`, one per filter of the gated
    layer; the gates are `discrete_gates(logits, estimator, ...)`. The first
    step starts from a zero state.

    Gate usage, the fraction of gates that choose the fine-tuned filter, is
    tracked by metrics of this layer: `"gate_usage"` over all steps (every
    filter of every example counted once) and `"gate_usage_<name>"` per step.
    Two diagnostics of whether the gates learn are tracked the same way:
    - `"gate_entropy"` (and `"gate_entropy_<name>"`): the mean binary
      entropy, in bits, of the soft gate probabilities `sigmoid(logits)`
      over the batch's examples and filters. 1 is a coin flip (where the
      gates start, with zero output biases); 0 a confident choice.
    - `"gate_input_dependence"` (and `"gate_input_dependence_<name>"`): the
      fraction of filters whose gate is input-dependent on the batch, that
      is open for some of its examples and closed for others. 0 means every
      filter takes the same path for every image of the batch (a static
      choice). It is a per-batch statistic, averaged over the epoch's
      batches (per replica under a distribution strategy), so it depends on
      the batch size; Gumbel noise makes training gates vary by chance, so
      read it on the validation logs (`val_...`), which use the hard gates.
    Keras reports the metrics tracked by any layer of a model (a model's
    `metrics` gather its layers'), resets them with the model's at every
    epoch and evaluation and aggregates them across replicas, so the usage
    appears in the `fit` and `evaluate` logs, hence in TensorBoard, with no
    Model subclass and no extra pass over the data. In training the usage
    is that of the sampled gates; in evaluation that of the hard gates.

    With `usage_target`, the last step adds the loss
    `usage_weight * (usage - usage_target) ** 2` (`add_loss`), where `usage`
    is the batch's overall usage through the straight-through gates. It
    constrains the total, so the gate network can still spend its budget
    unevenly across layers [inferred: the AdaFilter paper has no sparsity
    term].

    The LSTM follows Keras' `LSTMCell` (gate order i, f, c, o; forget-gate
    bias initialised to 1). Output biases start at 0, so about half of the
    gates start open.

    Sources. [paper] One recurrent gate network shared by all layers decides
    each layer's filters from the activations of the previous layer
    ("layerwise recurrent gated network"); the choice is discrete, trained
    end to end. [code] The authors' earlier SpotTune code (Guo et al., CVPR
    2019, github.com/gyhui14/spottune) discretises with a straight-through
    Gumbel-softmax (hard one-hot forward, relaxed gradient) and trains its
    policy network with its own SGD optimizer and learning rate, on the
    same step schedule as the network; hence `estimator="gumbel"` and the
    gate network's learning-rate multiplier of the `finetune` app
    (`gate_lr_multiplier`). [inferred] The default `"ste"` (threshold at
    probability 1/2, sigmoid gradient), the pooling, the per-layer
    projections and the cell width. The AdaFilter paper's text beyond its
    abstract and method overview could not be consulted for this
    implementation; where it fixes these details, they take precedence.

    Args:
        input_channels: channels of the activations entering each step's
            gated layer.
        filters: filters (gates) of each step's gated layer.
        units: width of the recurrent cell.
        estimator: `"ste"` (hard threshold, sigmoid gradient) or `"gumbel"`
            (straight-through Gumbel-softmax; sampled only in training).
        temperature: Gumbel-softmax temperature.
        usage_target: target overall gate usage in [0, 1], or None for no
            sparsity loss.
        usage_weight: weight of the sparsity loss.
        step_names: names of the steps in the usage metrics (default
            `"step<i>"`), usually the gated layers' names.
        normalize_inputs: standardise each step's pooled inputs per channel
            over the batch (batch statistics in training, moving averages at
            inference, no affine parameters) before the projection, so the
            gates see how an image differs from the others rather than the
            features all images share [inferred: not in the paper].
        momentum: momentum of those moving averages.
        seed: seed of the Gumbel noise (int or None). Its generator's
            position is layer state outside the weights (like a Dropout
            layer's); as in Keras' own random layers, every replica of a
            `MirroredStrategy` draws from the same position.
        **kwargs: base `Layer` arguments.

    Call arguments:
        inputs: the activations entering the gated layer, `[batch, height,
            width, input_channels[step]]` (or already pooled, `[batch,
            input_channels[step]]`).
        states: the states returned by the previous step, or None at the
            first step.
        step: index of the gated layer (a Python int).
        training: whether to sample the Gumbel noise.

    Returns:
        `(gates, states)`: gates `[batch, filters[step]]` in {0, 1} (exact,
        with the estimator's straight-through gradient) and the list of
        state tensors to pass to the next step (`h`, `c` and the running
        count of chosen fine-tuned filters per example).

    Example:

    ```python
    controller = GateController(input_channels=[3, 16], filters=[16, 32])
    gates, states = controller(x, step=0)
    x = GatedConv(16, 3, padding="same")(x, gates)
    gates, states = controller(x, states, step=1)
    x = GatedConv(32, 3, padding="same")(x, gates)
    ```

    Reference:
    - [Guo, Li, Wang, Rosing, "AdaFilter: Adaptive Filter Fine-tuning for
      Deep Transfer Learning", AAAI 2020](https://arxiv.org/abs/1911.09659)
    - [Wang et al., "SkipNet: Learning Dynamic Routing in Convolutional
      Networks", ECCV 2018](https://arxiv.org/abs/1711.09485) (the
      recurrent gate design)
    """

    def __init__(
        self,
        input_channels,
        filters,
        units=32,
        estimator="ste",
        temperature=1.0,
        usage_target=None,
        usage_weight=0.1,
        step_names=None,
        seed=None,
        normalize_inputs=False,
        momentum=0.9,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.input_channels = _positive_ints("input_channels", input_channels)
        self.filters = _positive_ints("filters", filters)
        if len(self.input_channels) != len(self.filters):
            raise ValueError(
                "`input_channels` and `filters` must have one entry per gated layer. Received: "
                f"input_channels={self.input_channels}, filters={self.filters}"
            )
        if not is_int(units) or units < 1:
            raise ValueError(f"`units` must be a positive int. Received: units={units!r}")
        check_choice(estimator, "estimator", ESTIMATORS)
        if isinstance(temperature, bool) or not float(temperature) > 0:
            raise ValueError(f"`temperature` must be > 0. Received: temperature={temperature!r}")
        if usage_target is not None and not 0.0 <= float(usage_target) <= 1.0:
            raise ValueError(
                f"`usage_target` must be in [0, 1] or None. Received: usage_target={usage_target!r}"
            )
        if not float(usage_weight) >= 0:
            raise ValueError(
                f"`usage_weight` must be >= 0. Received: usage_weight={usage_weight!r}"
            )
        if step_names is None:
            step_names = [f"step{i}" for i in range(len(self.filters))]
        step_names = [str(n) for n in step_names]
        if len(step_names) != len(self.filters) or len(set(step_names)) != len(step_names):
            raise ValueError(
                f"`step_names` must be {len(self.filters)} distinct names, one per gated layer. "
                f"Received: step_names={step_names}"
            )
        self.units = int(units)
        self.estimator = estimator
        self.temperature = float(temperature)
        self.usage_target = None if usage_target is None else float(usage_target)
        self.usage_weight = float(usage_weight)
        self.step_names = step_names
        self.seed = seed
        if isinstance(momentum, bool) or not 0.0 <= float(momentum) < 1.0:
            raise ValueError(f"`momentum` must be in [0, 1). Received: momentum={momentum!r}")
        self.normalize_inputs = bool(normalize_inputs)
        self.momentum = float(momentum)
        self.seed_generator = keras.random.SeedGenerator(seed)

    @property
    def num_steps(self):
        """The number of gated layers this controller serves."""
        return len(self.filters)

    def build(self, input_shape):
        units = self.units
        self.input_kernels, self.input_biases = [], []
        self.output_kernels, self.output_biases = [], []
        for i, (channels, filters) in enumerate(zip(self.input_channels, self.filters)):
            self.input_kernels.append(
                self.add_weight(
                    shape=(channels, units), initializer="glorot_uniform", name=f"input_kernel_{i}"
                )
            )
            self.input_biases.append(
                self.add_weight(shape=(units,), initializer="zeros", name=f"input_bias_{i}")
            )
            self.output_kernels.append(
                self.add_weight(
                    shape=(units, filters), initializer="glorot_uniform", name=f"output_kernel_{i}"
                )
            )
            self.output_biases.append(
                self.add_weight(shape=(filters,), initializer="zeros", name=f"output_bias_{i}")
            )

        def lstm_bias(shape, dtype=None):
            return ops.concatenate(
                [
                    ops.zeros((units,), dtype=dtype),
                    ops.ones((units,), dtype=dtype),
                    ops.zeros((2 * units,), dtype=dtype),
                ]
            )

        self.kernel = self.add_weight(
            shape=(units, 4 * units), initializer="glorot_uniform", name="kernel"
        )
        self.recurrent_kernel = self.add_weight(
            shape=(units, 4 * units), initializer="orthogonal", name="recurrent_kernel"
        )
        self.bias = self.add_weight(shape=(4 * units,), initializer=lstm_bias, name="bias")
        self.input_means, self.input_variances = [], []
        if self.normalize_inputs:
            for i, channels in enumerate(self.input_channels):
                stats = dict(shape=(channels,), trainable=False, autocast=False)
                self.input_means.append(
                    self.add_weight(initializer="zeros", name=f"input_moving_mean_{i}", **stats)
                )
                self.input_variances.append(
                    self.add_weight(initializer="ones", name=f"input_moving_variance_{i}", **stats)
                )
        self.usage = keras.metrics.Mean(name="gate_usage")
        self.step_usage = [keras.metrics.Mean(name=f"gate_usage_{n}") for n in self.step_names]
        self.entropy = keras.metrics.Mean(name="gate_entropy")
        self.step_entropy = [
            keras.metrics.Mean(name=f"gate_entropy_{n}") for n in self.step_names
        ]
        self.input_dependence = keras.metrics.Mean(name="gate_input_dependence")
        self.step_input_dependence = [
            keras.metrics.Mean(name=f"gate_input_dependence_{n}") for n in self.step_names
        ]

    def _check_call(self, inputs, step):
        if not is_int(step) or not 0 <= step < self.num_steps:
            raise ValueError(
                f"`step` must be an int in [0, {self.num_steps}). Received: step={step!r}"
            )
        if inputs.shape[-1] != self.input_channels[step]:
            raise ValueError(
                f"Step {step} ({self.step_names[step]!r}) expects inputs with "
                f"{self.input_channels[step]} channels. Received: inputs.shape={inputs.shape}"
            )

    def call(self, inputs, states=None, step=0, training=None):
        self._check_call(inputs, step)
        x = inputs
        if len(x.shape) > 2:
            x = ops.mean(x, axis=tuple(range(1, len(x.shape) - 1)))
        if self.normalize_inputs:
            x = self._standardize(x, step, training)
        z = ops.matmul(x, self.input_kernels[step]) + self.input_biases[step]
        if states is None:
            zeros = ops.zeros_like(z)
            h, c, used = zeros, zeros, ops.zeros_like(z[:, :1])
        else:
            h, c, used = states
        fused = ops.matmul(z, self.kernel) + ops.matmul(h, self.recurrent_kernel) + self.bias
        i, f, g, o = ops.split(fused, 4, axis=-1)
        c = ops.sigmoid(f) * c + ops.sigmoid(i) * ops.tanh(g)
        h = ops.sigmoid(o) * ops.tanh(c)
        logits = ops.matmul(h, self.output_kernels[step]) + self.output_biases[step]
        gates = discrete_gates(
            logits,
            self.estimator,
            temperature=self.temperature,
            training=bool(training),
            seed=self.seed_generator,
        )
        used = used + ops.sum(gates, axis=-1, keepdims=True)

        # Per-example means, so batches of different sizes weigh right; the
        # overall metric weighs each layer by its filter count.
        per_example = ops.mean(ops.stop_gradient(gates), axis=-1)
        weight = ops.full_like(per_example, self.filters[step])
        self.step_usage[step].update_state(per_example)
        self.usage.update_state(per_example, sample_weight=weight)
        entropy = ops.mean(gate_entropy(ops.stop_gradient(logits)), axis=-1)
        self.step_entropy[step].update_state(entropy)
        self.entropy.update_state(entropy, sample_weight=weight)
        dependence = input_dependence(ops.stop_gradient(gates))
        self.step_input_dependence[step].update_state(dependence)
        self.input_dependence.update_state(dependence, sample_weight=float(self.filters[step]))
        if self.usage_target is not None and step == self.num_steps - 1 and self.usage_weight:
            usage = ops.mean(used) / float(sum(self.filters))
            self.add_loss(self.usage_weight * ops.square(usage - self.usage_target))
        return gates, [h, c, used]

    def _standardize(self, x, step, training):
        # Batch normalisation without affine parameters (the projection that
        # follows has its own): batch statistics in training, moving averages
        # at inference.
        x = ops.cast(x, "float32")
        mean_var, var_var = self.input_means[step], self.input_variances[step]
        if training:
            mean, variance = ops.moments(x, axes=[0])
            mean_var.assign(mean_var * self.momentum + ops.stop_gradient(mean) * (1 - self.momentum))
            var_var.assign(
                var_var * self.momentum + ops.stop_gradient(variance) * (1 - self.momentum)
            )
        else:
            mean, variance = mean_var, var_var
        return (x - mean) * ops.rsqrt(variance + 1e-3)

    def compute_output_spec(self, inputs, states=None, step=0, training=None):
        # Spelled out rather than traced: a model calls this layer once per
        # gated layer, and tracing the cell each time dominates the cost of
        # building a large gated model.
        self._check_call(inputs, step)
        batch = inputs.shape[0]
        dtype = self.compute_dtype
        state = keras.KerasTensor((batch, self.units), dtype=dtype)
        return keras.KerasTensor((batch, self.filters[step]), dtype=dtype), [
            state,
            keras.KerasTensor((batch, self.units), dtype=dtype),
            keras.KerasTensor((batch, 1), dtype=dtype),
        ]

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "input_channels": list(self.input_channels),
                "filters": list(self.filters),
                "units": self.units,
                "estimator": self.estimator,
                "temperature": self.temperature,
                "usage_target": self.usage_target,
                "usage_weight": self.usage_weight,
                "step_names": list(self.step_names),
                "seed": self.seed,
                "normalize_inputs": self.normalize_inputs,
                "momentum": self.momentum,
            }
        )
        return config


__all__ = ["GateController"]
