"""AdaFilter: turn a pretrained functional model into one that fine-tunes
filters per example (Guo, Li, Wang, Rosing, AAAI 2020).

`adafilter(model)` replaces every selected `Conv2D` / `DepthwiseConv2D` by a
`GatedConv` (a `SeparableConv2D` by a `GatedSeparableConv`) holding the
frozen pretrained kernel and a trainable copy, folds
a `BatchNormalization` that directly follows the convolution into it as the
two separate batch norms of gated batch normalisation, and threads one
shared `GateController` through the gated layers in the network's order.
"""

import re
import warnings

import keras
import numpy as np

from keras_seltransfer.layers.gate_controller import GateController
from keras_seltransfer.layers.gated_conv import GatedConv
from keras_seltransfer.layers.gated_separable_conv import GatedSeparableConv
from keras_seltransfer.layers.gates import ESTIMATORS
from keras_seltransfer.models import surgery
from keras_seltransfer.models.graph import inner_layers
from keras_seltransfer.models.gated_conversion import CONVOLUTIONS
from keras_seltransfer.models.gated_conversion import SUPPORTED_LAYERS
from keras_seltransfer.models.gated_conversion import absorbable_batchnorm
from keras_seltransfer.models.gated_conversion import gated_conv_config
from keras_seltransfer.models.gated_conversion import is_supported
from keras_seltransfer.models.gated_conversion import pretrained_probe
from keras_seltransfer.utils.validation import check_choice

CONTROLLER_NAME = "gate_controller"
# What the first gate reads (see `adafilter`).
FIRST_GATE_INPUTS = ("features", "input")


def _select(model, pattern):
    """Names of the layers to gate, and of the convolutions left alone."""
    convolutions = surgery.matching_layers(model, CONVOLUTIONS, pattern)
    selected = [n for n in convolutions if is_supported(model.get_layer(n))]
    unsupported = [
        f"{n} ({type(model.get_layer(n)).__name__})"
        for n in convolutions
        if not is_supported(model.get_layer(n))
    ]
    for name in selected:
        layer = model.get_layer(name)
        if layer.data_format != "channels_last":
            raise ValueError(
                f"adafilter gates channels-last convolutions only; layer {name!r} has "
                f"data_format={layer.data_format!r}."
            )
    supported = ", ".join(t.__name__ for t in SUPPORTED_LAYERS)
    if unsupported and pattern is not None:
        raise ValueError(
            f"`layers` matched convolutions adafilter cannot gate: {', '.join(unsupported)}. "
            f"Supported layer types: {supported}. Received: layers={pattern!r}"
        )
    if unsupported:
        warnings.warn(
            f"adafilter leaves these convolutions ungated (supported types: {supported}): "
            f"{', '.join(unsupported)}",
            stacklevel=3,
        )
    hidden = [
        f"{layer.name} ({type(layer).__name__})"
        for layer in model.layers
        if not isinstance(layer, CONVOLUTIONS)
        and any(isinstance(inner, CONVOLUTIONS) for inner in inner_layers(layer))
    ]
    if hidden:
        warnings.warn(
            "adafilter leaves ungated the convolutions inside these custom layers, which "
            f"graph surgery cannot reach: {', '.join(hidden)}",
            stacklevel=3,
        )
    if not selected:
        raise ValueError(
            f"`layers` matched no {supported} layer of model {model.name!r}. "
            f"Received: layers={pattern!r}"
        )
    return selected


def _call_order(model, names):
    """`names` in the order `surgery.rebuild` will call their layers.

    A symbolic pass through the existing layers (the same traversal as
    `rebuild`'s): it creates no weights, and the nodes it adds to those
    layers belong to no model, so `model` computes and saves as before.
    """
    order = []

    def call(layer, *args, **kwargs):
        if layer.name in names:
            order.append(layer.name)
        return layer(*args, **kwargs)

    keras.models.clone_model(model, clone_function=lambda layer: layer, call_function=call)
    return order


def adafilter(
    model,
    layers=None,
    estimator="ste",
    temperature=1.0,
    units=32,
    usage_target=None,
    usage_weight=0.1,
    train_batchnorm=True,
    first_gate_input="features",
    normalize_gate_inputs=False,
    seed=None,
    name=None,
):
    """Rebuilds a pretrained model for AdaFilter's per-example filter fine-tuning.

    Every selected convolution becomes a `GatedConv` (same name) holding the
    pretrained kernel frozen and a trainable copy of it; a `SeparableConv2D`
    (Xception, NASNet) becomes a `GatedSeparableConv`, whose gate chooses per
    output channel between the pretrained and the fine-tuned (depthwise,
    pointwise) filter pair (see there for why the pair is the gated unit). A
    `BatchNormalization` that is the convolution's only consumer (and has no
    other input) is absorbed into it as gated batch norm: the pretrained
    batch norm, frozen, on the pretrained path and a copy on the fine-tuned
    path. One `GateController` (layer `"gate_controller"`) is called before
    every gated layer, on that layer's input (the previous layer's
    activations), with its recurrent state carried from gated layer to gated
    layer in the network's topological order. Every other layer, the
    classification head included, is kept with its weights.

    Both paths start from the same weights, so the new model computes
    exactly what `model` does at inference, whatever the gates.

    Gated batch normalisation [paper: "gated batch normalization", separate
    BN layers for the outputs of the pretrained and the fine-tuned filters,
    whose statistics differ]: the fine-tuned path's batch norm trains by
    default (`train_batchnorm=True`: batch statistics in training, moving
    averages and affine parameters updated) whatever the mode of the rest of
    the network, which the caller sets beforehand (`set_batchnorm_mode`)
    and which the pretrained path's batch norm never leaves (it always uses
    the stored statistics). Besides being the paper's design, this is what
    lets the gates learn from the first step: the gradient reaching a gate
    is the difference between the two paths' outputs, exactly zero while
    both paths compute the same function (equal kernels and the same frozen
    batch norm); with batch statistics on the fine-tuned path the paths
    differ from the first training step. `train_batchnorm=False` freezes it
    (what earlier versions did in a frozen-BatchNorm run).

    The first gate [paper: every gate reads "the activations of the previous
    layer", globally average pooled; the paper's backbones are ImageNet
    ResNets, whose first gated layer already reads a 64-channel feature
    map]: when the first gated layer reads raw images, pooling its input
    leaves one brightness value per channel (one per image for grayscale),
    which cannot tell images apart. With `first_gate_input="features"`
    (default) the first gate reads instead the globally pooled output of
    that layer's frozen pretrained path (a frozen copy of the pretrained
    convolution and its absorbed batch norm, then ReLU when the convolution
    has no activation of its own) [inferred: the nearest per-image
    descriptor to "the previous layer's activations" that the network
    computes anyway]; `"input"` pools the layer's input as the later gates
    do. The probe adds one frozen convolution over the first layer's input.

    Where the paper is silent [inferred]: a batch norm is absorbed only when
    it normalises the channel axis, with no renormalisation, synchronisation,
    regularizers or constraints, called without arguments (a call with
    `training=False` pins its mode), and only after a convolution without an
    activation; otherwise it stays a separate layer shared by the two paths
    and keeps its setting.

    Args:
        model: a functional `keras.Model` (nested functional and Sequential
            models, such as a keras.applications backbone or ConvNeXt's
            blocks, are inlined; plain operations are kept).
        layers: regular expression selecting the layers to gate by name
            (`re.search`); None gates every Conv2D, DepthwiseConv2D and
            SeparableConv2D (other convolutions, such as transposed ones,
            are left alone, with a warning).
        estimator: gate estimator, `"ste"` or `"gumbel"` (see
            `GateController`).
        temperature: Gumbel-softmax temperature.
        units: width of the shared recurrent cell.
        usage_target: target overall gate usage in [0, 1] for the sparsity
            loss, or None for none.
        usage_weight: weight of the sparsity loss.
        train_batchnorm: whether the fine-tuned path's batch norms train
            (default True, as in the paper); False freezes them at the
            pretrained statistics; None follows each absorbed batch norm's
            `trainable` (so the run's BatchNorm mode).
        first_gate_input: what the first gate reads: `"features"` (the
            pooled output of the first gated layer's frozen pretrained path)
            or `"input"` (the pooled input of that layer).
        normalize_gate_inputs: standardise the gates' pooled inputs over the
            batch (see `GateController`'s `normalize_inputs`).
        seed: seed of the Gumbel noise.
        name: name of the new model (default: the original's).

    Returns:
        The new functional `keras.Model`, with the same inputs and outputs.
        Its gate usage is reported by the metrics `"gate_usage"` and
        `"gate_usage_<layer>"` during `fit` and `evaluate`.

    Raises:
        ValueError: if `layers` is not a regular expression, matches no
            supported layer or matches a convolution of another type, a
            selected layer is applied more than once, or an argument is out
            of range.

    Example:

    ```python
    backbone = keras_seltransfer.models.load_backbone("pretrained.keras", (64, 64, 1))
    classifier = keras_seltransfer.models.build_classifier(backbone, 2)
    model = adafilter(classifier, usage_target=0.5)
    model.compile("adam", "sparse_categorical_crossentropy")
    model.fit(images, labels)  # logs gate_usage, gate_usage_block1_conv, ...
    ```

    Reference:
    - [Guo, Li, Wang, Rosing, "AdaFilter: Adaptive Filter Fine-tuning for
      Deep Transfer Learning", AAAI 2020](https://arxiv.org/abs/1911.09659)
    """
    if layers is not None and not isinstance(layers, str):
        raise ValueError(
            "`layers` must be a regular expression (str) or None. "
            f"Received: layers={layers!r}"
        )
    if layers is not None:
        try:
            re.compile(layers)
        except re.error as e:
            raise ValueError(
                f"`layers` is not a regular expression ({e}). Received: layers={layers!r}"
            ) from e
    check_choice(estimator, "estimator", ESTIMATORS)
    if first_gate_input not in FIRST_GATE_INPUTS:
        raise ValueError(
            f"`first_gate_input` must be one of {FIRST_GATE_INPUTS}. "
            f"Received: first_gate_input={first_gate_input!r}"
        )
    if train_batchnorm not in (None, True, False):
        raise ValueError(
            "`train_batchnorm` must be True, False or None. "
            f"Received: train_batchnorm={train_batchnorm!r}"
        )
    graph = surgery.model_graph(model)
    flat = graph.model
    selected = _select(flat, layers)
    reused = [n for n in selected if graph.calls[n] != 1]
    if reused:
        pattern = "|".join(f"^{n}$" for n in reused)
        raise ValueError(
            f"adafilter cannot gate layers applied more than once (shared layers): "
            f"{', '.join(f'{n} ({type(graph.nodes[n]).__name__})' for n in reused)}. Leave them "
            f"ungated with a `layers` pattern that does not match them, e.g. "
            f"layers='^(?!{pattern})'. Received: layers={layers!r}"
        )
    absorbed = {}
    for conv_name in selected:
        after = graph.consumers[conv_name]
        if len(after) == 1 and graph.producers[after[0]] == [conv_name]:
            candidate = graph.nodes[after[0]]
            nodes = graph.specs[after[0]].get("inbound_nodes", [])
            # A batch norm called with arguments (`training=False` to pin its
            # mode) keeps them as a layer of its own.
            plain_call = len(nodes) == 1 and all(
                value is None for value in nodes[0].get("kwargs", {}).values()
            )
            if plain_call and absorbable_batchnorm(flat.get_layer(conv_name), candidate):
                absorbed[conv_name] = candidate.name
    order = _call_order(flat, set(selected))
    taken = {layer.name for layer in flat.layers}
    controller_name = CONTROLLER_NAME
    while controller_name in taken:
        controller_name += "_"
    controller = GateController(
        input_channels=[
            int(flat.get_layer(n).output.shape[-1])
            if i == 0 and first_gate_input == "features"
            else int(flat.get_layer(n).input.shape[-1])
            for i, n in enumerate(order)
        ],
        filters=[int(flat.get_layer(n).output.shape[-1]) for n in order],
        units=units,
        estimator=estimator,
        temperature=temperature,
        usage_target=usage_target,
        usage_weight=usage_weight,
        step_names=order,
        seed=seed,
        normalize_inputs=normalize_gate_inputs,
        # The gate network is small; float32 keeps its logits and the
        # Gumbel noise exact under mixed precision.
        dtype="float32",
        name=controller_name,
    )
    steps = {n: i for i, n in enumerate(order)}
    absorbed_bns = set(absorbed.values())
    states = [None]

    def call(layer, original, *args, **kwargs):
        if original.name in absorbed_bns:
            # Already applied inside the GatedConv before it.
            return args[0]
        if original.name not in steps:
            return layer(*args, **kwargs)
        if len(args) != 1 or kwargs:
            raise ValueError(
                f"adafilter gates convolutions called on one tensor; {original.name!r} was called "
                f"with {len(args)} positional and {sorted(kwargs)} keyword arguments."
            )
        inputs = args[0]
        bn = flat.get_layer(absorbed[original.name]) if original.name in absorbed else None
        step = steps[original.name]
        gate_input = inputs
        if step == 0 and first_gate_input == "features":
            gate_input = pretrained_probe(original, bn, inputs, f"{controller_name}_probe")
        gates, states[0] = controller(gate_input, states[0], step=step)
        separable = isinstance(original, keras.layers.SeparableConv2D)
        gated_class = GatedSeparableConv if separable else GatedConv
        gated = gated_class.from_config(gated_conv_config(original, bn, train_batchnorm))
        outputs = gated(inputs, gates)
        if separable:
            values = {
                "kernel": original.depthwise_kernel,
                "pointwise_kernel": original.pointwise_kernel,
            }
        else:
            values = {"kernel": original.kernel}
        if original.use_bias:
            values["bias"] = original.bias
        if bn is not None:
            values.update(moving_mean=bn.moving_mean, moving_variance=bn.moving_variance)
            if bn.scale:
                values["gamma"] = bn.gamma
            if bn.center:
                values["beta"] = bn.beta
        gated.load_pretrained(**values)
        return outputs

    return surgery.rebuild(flat, call, name=name)


def gated_layers(model):
    """The `GatedConv` layers of `model`, in model order.

    Example:

    >>> from keras_seltransfer import models
    >>> classifier = models.build_classifier(models.small_cnn((16, 16, 1), widths=(4, 8)), 3)
    >>> [layer.name for layer in models.gated_layers(models.adafilter(classifier))]
    ['block1_conv', 'block2_conv']
    """
    return [layer for layer in model.layers if isinstance(layer, GatedConv)]


def gate_controller(model):
    """The `GateController` of a model made by `adafilter`.

    Raises:
        ValueError: if `model` has none, or several.

    Example:

    >>> from keras_seltransfer import models
    >>> from keras_seltransfer.models.gating import gate_controller
    >>> classifier = models.build_classifier(models.small_cnn((16, 16, 1), widths=(4, 8)), 3)
    >>> type(gate_controller(models.adafilter(classifier))).__name__
    'GateController'
    """
    found = [layer for layer in model.layers if isinstance(layer, GateController)]
    if len(found) != 1:
        raise ValueError(
            f"Expected one GateController in model {model.name!r}; found {len(found)}. "
            "Build the model with keras_seltransfer.models.gating."
        )
    return found[0]


def gate_usage(model, data, batch_size=32):
    """Gate usage of an AdaFilter model at inference (deterministic gates).

    The fraction of gates that choose the fine-tuned filter, over every
    example of `data` and every filter, per gated layer and over all of them
    (each filter of each example counted once).

    Args:
        model: a model made by `adafilter`.
        data: images (array) or a `tf.data.Dataset` of images or `(images,
            labels)` batches, as `model.predict` takes them.
        batch_size: batch size for arrays.

    Returns:
        `{"overall": float, "layers": {layer name: float}}`.

    Example:

    >>> import numpy as np
    >>> from keras_seltransfer import models
    >>> classifier = models.build_classifier(models.small_cnn((16, 16, 1), widths=(4, 8)), 3)
    >>> gated = models.adafilter(classifier)
    >>> usage = models.gate_usage(gated, np.zeros((4, 16, 16, 1), "float32"))
    >>> sorted(usage["layers"]), 0.0 <= usage["overall"] <= 1.0
    (['block1_conv', 'block2_conv'], True)
    """
    layers = gated_layers(model)
    if not layers:
        raise ValueError(
            f"Model {model.name!r} has no GatedConv layers; build it with adafilter."
        )
    probe = keras.Model(model.input, [layer.input[1] for layer in layers])
    gates = probe.predict(data, batch_size=batch_size, verbose=0)
    if len(layers) == 1:
        gates = [gates]
    sums = [float(np.sum(g, dtype=np.float64)) for g in gates]
    sizes = [int(np.size(g)) for g in gates]
    return {
        "overall": sum(sums) / sum(sizes),
        "layers": {layer.name: s / n for layer, s, n in zip(layers, sums, sizes)},
    }


__all__ = [
    "CONTROLLER_NAME",
    "FIRST_GATE_INPUTS",
    "SUPPORTED_LAYERS",
    "adafilter",
    "gate_controller",
    "gate_usage",
    "gated_layers",
]
