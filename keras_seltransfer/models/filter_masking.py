"""FilterMask layers after conv responses: add them, find them, fold them away.

Selective filter transfer (`keras_seltransfer.models.filter_transfer`) and
`RelevancePruning` mark and prune filters through a `FilterMask` placed after
each scored conv layer's response (see `models.response_points`):
`add_filter_masks` rebuilds a model with them, `filter_masks` finds them,
`fold_filter_masks` multiplies them into the weights for export, and
`next_layers` / `ChannelGraph` say which layers read a conv's channels.
"""

import keras
import numpy as np

from keras_seltransfer.layers.filter_mask import FilterMask
from keras_seltransfer.layers.partially_frozen_batch_normalization import (
    PartiallyFrozenBatchNormalization,
)
from keras_seltransfer.models import surgery
from keras_seltransfer.models.graph import is_elementwise
from keras_seltransfer.models.response_points import response_chains
from keras_seltransfer.models.response_points import response_points


MASK_SUFFIX = "_filter_mask"


# Layers that act on every channel separately without mixing them, so the
# filters of a masked or re-initialised channel reach the next
# channel-mixing layer at the same channel index.
_CHANNELWISE_TYPES = (
    FilterMask,
    keras.layers.BatchNormalization,
    keras.layers.ReLU,
    keras.layers.Activation,
    keras.layers.LeakyReLU,
    keras.layers.PReLU,
    keras.layers.ELU,
    keras.layers.Dropout,
    keras.layers.SpatialDropout2D,
    keras.layers.GaussianNoise,
    keras.layers.GaussianDropout,
    keras.layers.MaxPooling2D,
    keras.layers.AveragePooling2D,
    keras.layers.GlobalAveragePooling2D,
    keras.layers.GlobalMaxPooling2D,
    keras.layers.ZeroPadding2D,
    keras.layers.Cropping2D,
    keras.layers.UpSampling2D,
    keras.layers.Identity,
    keras.layers.ActivityRegularization,
)


# Layers whose input slices `reinit_next` re-initialises.
_NEXT_TYPES = (
    keras.layers.Conv2D,
    keras.layers.DepthwiseConv2D,
    keras.layers.SeparableConv2D,
    keras.layers.Dense,
)


def _flat_layers(model):
    """The flattened model and `{name: node}` over its layers and plain
    operations (see `surgery.operations`)."""
    flat = surgery.flatten(model)
    return flat, {op.name: op for op in flat.operations}


def _is_channelwise(node, producers):
    """Whether a graph node keeps every channel on its own: a channel-wise
    layer, or a plain elementwise operation on a single tensor (`x + 3.0`)."""
    if isinstance(node, _CHANNELWISE_TYPES):
        return True
    return not surgery.is_layer(node) and is_elementwise(node) and len(producers) == 1


class ChannelGraph:
    """A model's flattened graph with the lookups that filter surgery needs.

    Read once per operation (serialising a large model's graph for every
    query would cost more than the surgery itself).

    Args:
        model: a functional `keras.Model` (nested functional and Sequential
            models are flattened, see `surgery.flatten`).

    Attributes:
        flat: the flattened model.
        by_name: `{name: node}` of `flat`: its layers and plain operations
            (`x + 3.0` in MobileNetV3's hard-swish, see `surgery.operations`).
        consumers: `{node name: names of the nodes reading its output}`.
        producers: `{node name: names of the nodes it reads}`.
        order: `{node name: position in graph order}`.

    Example:

    >>> from keras_seltransfer import models
    >>> from keras_seltransfer.models.filter_masking import ChannelGraph
    >>> graph = ChannelGraph(models.small_cnn((16, 16, 1), widths=(4, 8)))
    >>> graph.channels("block1_conv"), graph.next_layers(["block1_conv", "block1_bn"])
    (4, (['block2_conv'], []))
    """

    def __init__(self, model):
        graph = surgery.model_graph(model)
        self.flat, self.by_name = graph.model, graph.nodes
        self.consumers, self.producers = graph.consumers, graph.producers
        self.order = graph.order

    def channels(self, conv_name):
        """The number of filters (output channels) of conv layer `conv_name`."""
        conv = self.by_name[conv_name]
        if isinstance(conv, keras.layers.DepthwiseConv2D):
            return int(conv.kernel.shape[2]) * int(conv.kernel.shape[3])
        return int(conv.kernel.shape[-1])

    def next_layers(self, chain):
        """`(found, stopped)` downstream of a response chain's last layer.

        Walks through channel-wise layers (BatchNormalization, activations,
        pooling, `FilterMask`...) to the first channel-mixing layers:
        `found` are the Conv2D, DepthwiseConv2D, SeparableConv2D and Dense
        layers reached, `stopped` the other layers that end the walk, both
        in graph order.
        """
        found, stopped, seen = set(), set(), set()
        frontier = list(self.consumers[chain[-1]])
        while frontier:
            name = frontier.pop()
            if name in seen:
                continue
            seen.add(name)
            layer = self.by_name[name]
            if isinstance(layer, _NEXT_TYPES):
                found.add(name)
            elif _is_channelwise(layer, self.producers[name]):
                frontier.extend(self.consumers[name])
            else:
                stopped.add(name)
        position = self.order.__getitem__
        return sorted(found, key=position), sorted(stopped, key=position)

    def ancestors(self, name):
        """Names of every layer upstream of `name`."""
        found, frontier = set(), list(self.producers[name])
        while frontier:
            current = frontier.pop()
            if current not in found:
                found.add(current)
                frontier.extend(self.producers[current])
        return found


def filter_masks(model):
    """The `FilterMask` of every conv layer that has one.

    A conv layer's mask is the `FilterMask` that alone consumes its
    response point (see `relevance.response_points`), as
    `add_filter_masks` places it.

    Args:
        model: a functional `keras.Model`.

    Returns:
        A dict `{conv_layer_name: FilterMask layer}` in graph order (empty
        when the model has none).

    Example:

    >>> from keras_seltransfer import models
    >>> classifier = models.build_classifier(models.small_cnn((16, 16, 1), widths=(4, 8)), 3)
    >>> models.filter_masks(classifier)
    {}
    >>> list(models.filter_masks(models.add_filter_masks(classifier)))
    ['block1_conv', 'block2_conv']
    """
    flat, by_name = _flat_layers(model)
    if not any(isinstance(layer, surgery.CONV_TYPES) for layer in flat.layers):
        return {}
    consumers = surgery.consumers(flat)
    found = {}
    for conv, point in response_points(flat).items():
        following = consumers[point]
        if len(following) == 1 and isinstance(by_name[following[0]], FilterMask):
            found[conv] = by_name[following[0]]
    return found


def add_filter_masks(model, layers=None, name=None):
    """Rebuilds `model` with a `FilterMask` after every scored conv's response.

    Each mask is named `<conv name>_filter_mask`, computes in the dtype
    policy of the layer it follows, and starts as the identity (mask and
    `transferred` all ones). The `BatchNormalization` in each such conv's
    response chain becomes a `PartiallyFrozenBatchNormalization` of the
    same name, config and weights, with no channel frozen (so it is the
    same computation; `set_reinitialized_batchnorm` later lets the
    channels of re-initialised filters train while the others stay
    frozen). So the new model computes exactly what `model` does, with
    copies of all its weights. Conv layers that already have a mask keep
    it (with its values).

    Args:
        model: a functional `keras.Model` (nested functional models are
            inlined, see `surgery.rebuild`).
        layers: which conv layers (see `relevance.conv_layer_names`).
        name: name of the new model (default: the original's).

    Returns:
        The new functional `keras.Model`.

    Raises:
        ValueError: if a mask's name is already taken by another layer.

    Example:

    >>> from keras_seltransfer import models
    >>> classifier = models.build_classifier(models.small_cnn((16, 16, 1), widths=(4, 8)), 3)
    >>> masked = models.add_filter_masks(classifier)
    >>> [layer.name for layer in models.filter_masks(masked).values()]
    ['block1_conv_filter_mask', 'block2_conv_filter_mask']
    >>> type(masked.get_layer("block1_bn")).__name__
    'PartiallyFrozenBatchNormalization'
    """
    flat, by_name = _flat_layers(model)
    chains = response_chains(flat, layers)
    existing = filter_masks(flat)
    channel_axes = {}
    swap = set()
    for conv, chain in chains.items():
        swap.update(
            name
            for name in chain[1:]
            if type(by_name[name]) is keras.layers.BatchNormalization
            and isinstance(by_name[name].axis, int)
            and not by_name[name].renorm
        )
        if conv in existing:
            continue
        mask_name = conv + MASK_SUFFIX
        if mask_name in by_name:
            raise ValueError(
                f"Cannot add a FilterMask named {mask_name!r}: model {model.name!r} already "
                "has a layer of that name that is not this conv's mask."
            )
        channel_axes[chain[-1]] = (mask_name, surgery.channel_axis(by_name[conv]))

    def call(layer, original, *args, **kwargs):
        if original.name in swap:
            layer = PartiallyFrozenBatchNormalization.from_config(original.get_config())
            outputs = layer(*args, **kwargs)
            # A different class, so `surgery.rebuild` does not copy these.
            for name in ("gamma", "beta", "moving_mean", "moving_variance"):
                if getattr(original, name, None) is not None:
                    getattr(layer, name).assign(getattr(original, name))
        else:
            outputs = layer(*args, **kwargs)
        if original.name in channel_axes:
            mask_name, axis = channel_axes[original.name]
            outputs = FilterMask(axis=axis, dtype=layer.dtype_policy, name=mask_name)(outputs)
        return outputs

    return surgery.rebuild(flat, call, name=name)


def next_layers(model, conv_name):
    """The layers that read the channels of a conv layer's filters directly.

    Follows the conv's response (see `relevance.response_points`) through
    layers that treat each channel on its own (FilterMask,
    BatchNormalization, activations, dropout, pooling, padding, cropping,
    upsampling) to the layers that mix channels. Those that are `Conv2D`,
    `DepthwiseConv2D`, `SeparableConv2D` or `Dense` are the next layers;
    any other (a merge such as Add or Concatenate, Flatten, Reshape) stops
    the walk, as its output channels no longer correspond one to one.

    Args:
        model: a functional `keras.Model`.
        conv_name: a conv layer name of `model`.

    Returns:
        `(next_names, stopped_at)`: names of the next layers and of the
        layers where the walk stopped, each in graph order.

    Example:

    >>> from keras_seltransfer import models
    >>> from keras_seltransfer.models.filter_masking import next_layers
    >>> classifier = models.build_classifier(models.small_cnn((16, 16, 1), widths=(4, 8)), 3)
    >>> next_layers(classifier, "block1_conv"), next_layers(classifier, "block2_conv")
    ((['block2_conv'], []), (['target_head'], []))
    """
    graph = ChannelGraph(model)
    chain = response_chains(graph.flat, [conv_name])[conv_name]
    return graph.next_layers(chain)


def _activation_of(conv, chain, by_name):
    """`(description, callable on a float32 array, positively homogeneous)`
    of the activation at the end of a response chain (identity when none)."""
    if surgery.has_fused_activation(conv):
        function = conv.activation
        return f"{conv.name}'s activation", function, function in (
            keras.activations.relu,
            keras.activations.leaky_relu,
        )
    last = by_name[chain[-1]]
    if not isinstance(last, surgery.ACTIVATION_LAYER_TYPES):
        return None, None, True
    if isinstance(last, keras.layers.ReLU):
        homogeneous = last.max_value is None and float(last.threshold) == 0.0
    elif isinstance(last, keras.layers.Activation):
        homogeneous = last.activation in (
            keras.activations.relu,
            keras.activations.leaky_relu,
            keras.activations.linear,
        )
    else:
        homogeneous = isinstance(last, (keras.layers.LeakyReLU, keras.layers.PReLU))
    return f"layer {last.name!r}", last, homogeneous


def fold_filter_masks(model, name=None):
    """The same network with every `FilterMask` multiplied into the weights.

    A mask m sits after act(affine(x)), where affine is the conv's
    BatchNormalization when its response chain has one, else the conv
    itself, and act the chain's activation (identity when none). The fold
    multiplies the affine part's per-channel output by m (BatchNormalization
    `gamma` and `beta`; or the conv's kernel slice and bias) and drops the
    mask, which is exact when act(m * y) = m * act(y): for masks of zeros
    and ones when act(0) = 0 (ReLU, ReLU6, swish, tanh, ELU, ...), and for
    any m >= 0 when act is positively homogeneous (ReLU, LeakyReLU, PReLU,
    linear). It is exact in training mode too (BatchNormalization's batch
    statistics do not depend on gamma and beta). With binary masks the
    folded network's outputs equal the masked one's.

    The `transferred` records are not kept (the folded model has no
    masks), and every `PartiallyFrozenBatchNormalization` becomes a plain
    `BatchNormalization` with the same weights (they compute the same in
    inference mode); keep the model itself to keep them.

    Args:
        model: a functional `keras.Model` whose `FilterMask` layers each
            follow a conv's response (as `add_filter_masks` puts them).
        name: name of the new model (default: the original's).

    Returns:
        A new functional `keras.Model` without `FilterMask` layers (the
        model itself when it has none).

    Raises:
        ValueError: for a FilterMask that follows no conv, negative mask
            values, a mask the activation does not let through exactly
            (e.g. zeros before a sigmoid), or a BatchNormalization without
            scale.

    Example:

    >>> import numpy as np
    >>> from keras_seltransfer import models
    >>> classifier = models.build_classifier(models.small_cnn((16, 16, 1), widths=(4, 8)), 3)
    >>> masked = models.add_filter_masks(classifier)
    >>> _ = models.filter_masks(masked)["block2_conv"].mask.assign([1, 1, 0, 1, 0, 1, 1, 1])
    >>> folded = models.fold_filter_masks(masked)
    >>> models.filter_masks(folded)
    {}
    >>> images = np.random.default_rng(0).uniform(0, 255, (4, 16, 16, 1))
    >>> outputs = masked.predict(images, verbose=0)
    >>> np.allclose(folded.predict(images, verbose=0), outputs, atol=1e-5)
    True
    """
    flat, by_name = _flat_layers(model)
    masks = filter_masks(flat)
    placed = {mask.name for mask in masks.values()}
    stray = [
        layer.name
        for layer in flat.layers
        if isinstance(layer, FilterMask) and layer.name not in placed
    ]
    if stray:
        raise ValueError(
            f"FilterMask layers {stray} do not follow a conv layer's response, so they "
            "cannot be folded into weights; export the model with its masks instead."
        )
    if not masks:
        return model
    chains = response_chains(flat, list(masks))
    plans = {}
    for conv_name, mask in masks.items():
        values = np.asarray(mask.mask.numpy(), np.float64)
        if (values < 0).any():
            raise ValueError(
                f"Mask {mask.name!r} has negative values; only masks >= 0 fold into the "
                f"weights. Received: min={values.min()}"
            )
        conv = by_name[conv_name]
        chain = chains[conv_name]
        what, activation, homogeneous = _activation_of(conv, chain, by_name)
        binary = np.isin(values, (0.0, 1.0)).all()
        if activation is not None and not homogeneous:
            if not binary:
                raise ValueError(
                    f"Mask {mask.name!r} has values other than 0 and 1, which fold exactly "
                    f"only through positively homogeneous activations (ReLU, LeakyReLU, "
                    f"PReLU, linear), not {what}; export the model with its masks instead."
                )
            if (values == 0).any():
                at_zero = np.asarray(
                    keras.ops.convert_to_numpy(activation(keras.ops.zeros((1, 1, 1, values.size))))
                )
                if np.abs(at_zero).max() != 0:
                    raise ValueError(
                        f"Mask {mask.name!r} zeroes channels after {what}, whose value at 0 "
                        f"is {float(np.abs(at_zero).max())}, not 0, so the zeros cannot be "
                        "folded into the weights; export the model with its masks instead."
                    )
        bn = [
            by_name[n]
            for n in chain[1:]
            if isinstance(by_name[n], keras.layers.BatchNormalization)
        ]
        if bn and not bn[0].scale:
            raise ValueError(
                f"The mask of {conv_name!r} cannot be folded into BatchNormalization "
                f"{bn[0].name!r}, which has no scale (gamma); export the model with its masks."
            )
        plans[conv_name] = (bn[0].name if bn else None, values)

    def call(layer, original, *args, **kwargs):
        if isinstance(original, FilterMask):
            return args[0]
        if isinstance(original, PartiallyFrozenBatchNormalization):
            # Per-channel freezing only matters while training: serve plain
            # BatchNormalization.
            layer = keras.layers.BatchNormalization.from_config(original.get_config())
            outputs = layer(*args, **kwargs)
            for weight in ("gamma", "beta", "moving_mean", "moving_variance"):
                if getattr(original, weight, None) is not None:
                    getattr(layer, weight).assign(getattr(original, weight))
            return outputs
        return layer(*args, **kwargs)

    folded = surgery.rebuild(flat, call, name=name)
    for conv_name, (bn_name, values) in plans.items():
        if bn_name is not None:
            bn = folded.get_layer(bn_name)
            variables = [bn.gamma] + ([bn.beta] if bn.center else [])
            for variable in variables:
                variable.assign(np.asarray(variable.numpy()) * values.astype(np.float32))
            continue
        conv = folded.get_layer(conv_name)
        kernel = np.array(conv.kernel.numpy())
        if isinstance(conv, keras.layers.DepthwiseConv2D):
            shape = kernel.shape
            kernel = (kernel.reshape(shape[:2] + (-1,)) * values.astype(np.float32)).reshape(shape)
        else:
            kernel = kernel * values.astype(np.float32)
        conv.kernel.assign(kernel)
        if conv.use_bias:
            conv.bias.assign(np.asarray(conv.bias.numpy()) * values.astype(np.float32))
    return folded


__all__ = [
    "MASK_SUFFIX",
    "ChannelGraph",
    "add_filter_masks",
    "filter_masks",
    "fold_filter_masks",
    "next_layers",
]
