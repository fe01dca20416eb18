"""Where a conv filter's response is read: the conv, its BatchNorm, its activation.

Filter relevance (`keras_seltransfer.models.relevance`) and selective filter
transfer (`keras_seltransfer.models.filter_transfer`) score and mask a conv
layer's filters where their response is complete: `response_chains` follows
each conv layer through the BatchNormalization and activation that belong to
it alone, `response_points` names the layer at the end of each chain, and
`conv_layer_names` picks the conv layers to score.
"""

import keras

from keras_seltransfer.models import surgery


def _bn_axis(layer):
    axis = layer.axis
    if isinstance(axis, (list, tuple)):
        if len(axis) != 1:
            return None
        axis = axis[0]
    return axis


def _follows_channels(layer, conv):
    """Whether a BatchNormalization `layer` normalises `conv`'s channel axis."""
    axis = _bn_axis(layer)
    if axis is None:
        return False
    rank = 4
    return axis % rank == surgery.channel_axis(conv) % rank


def conv_layer_names(model, layers=None):
    """Names of the conv layers of `model` to score, in graph order.

    Args:
        model: a functional `keras.Model` (nested functional models are
            looked into).
        layers: None (every `Conv2D` and `DepthwiseConv2D`, including
            subclasses), a regular expression matched against layer names
            (`re.search`), or a list of conv layer names.

    Returns:
        A list of layer names.

    Raises:
        ValueError: if nothing matches, a name is missing or is not a conv
            layer.

    Example:

    >>> from keras_seltransfer import models, relevance
    >>> backbone = models.small_cnn((16, 16, 1), widths=(4, 8))
    >>> relevance.conv_layer_names(backbone), relevance.conv_layer_names(backbone, "block2")
    (['block1_conv', 'block2_conv'], ['block2_conv'])
    """
    flat = surgery.flatten(model)
    all_convs = [layer.name for layer in flat.layers if isinstance(layer, surgery.CONV_TYPES)]
    if layers is None:
        names = all_convs
    elif isinstance(layers, str):
        names = surgery.matching_layers(flat, surgery.CONV_TYPES, layers)
    else:
        try:
            names = [str(name) for name in layers]
        except TypeError:
            raise ValueError(
                "`layers` must be None, a regular expression or a list of conv layer "
                f"names. Received: layers={layers!r}"
            ) from None
        by_name = {layer.name: layer for layer in flat.layers}
        for name in names:
            if name not in by_name:
                raise ValueError(
                    f"Model {model.name!r} has no layer named {name!r}. "
                    f"Received: layers={layers!r}"
                )
            if not isinstance(by_name[name], surgery.CONV_TYPES):
                raise ValueError(
                    f"Layer {name!r} is a {type(by_name[name]).__name__}, not a Conv2D or "
                    f"DepthwiseConv2D layer. Received: layers={layers!r}"
                )
        if len(set(names)) != len(names):
            raise ValueError(f"`layers` must name each layer once. Received: layers={layers!r}")
        order = {name: i for i, name in enumerate(all_convs)}
        names = sorted(names, key=order.__getitem__)
    if not names:
        raise ValueError(
            f"Model {model.name!r} has no Conv2D or DepthwiseConv2D layer to score"
            + (f" matching {layers!r}" if layers is not None else "")
            + f". Received: layers={layers!r}"
        )
    return names


def response_chains(model, layers=None):
    """The layers from each conv layer to the point its response is read at.

    A filter's response is read after what belongs to it alone [inferred]:
    the conv's output; then, if that output feeds exactly one layer and it
    is a BatchNormalization over the conv's channel axis, that layer's
    output; then, if *that* feeds exactly one activation layer (`ReLU`,
    `Activation`, `LeakyReLU`, `PReLU`, `ELU`), its output. A conv with a
    fused non-linear activation (`activation="relu"`) is read at its own
    output. So conv -> BN -> ReLU (small_cnn, ResNet, MobileNet) is read
    post-activation, conv -> BN -> Add (a residual branch's last conv, a
    linear bottleneck) after the BN, and a conv feeding a concatenation
    (DenseNet) at the conv itself. A BatchNormalization or activation layer
    called more than once (shared) ends the chain before it.

    Args:
        model: a functional `keras.Model`.
        layers: which conv layers (see `conv_layer_names`).

    Returns:
        A dict `{conv_name: [conv_name, (bn_name), (activation_name)]}` in
        graph order; the last name of each chain is its response point.

    Raises:
        ValueError: as `conv_layer_names`, or for a conv layer called more
            than once (a shared layer).

    Example:

    >>> from keras_seltransfer import models, relevance
    >>> chains = relevance.response_chains(models.small_cnn((16, 16, 1), widths=(4, 8)))
    >>> list(chains), chains["block1_conv"]
    (['block1_conv', 'block2_conv'], ['block1_conv', 'block1_bn', 'block1_relu'])
    """
    flat = surgery.flatten(model)
    names = conv_layer_names(flat, layers)
    consumers = surgery.consumers(flat)
    by_name = {layer.name: layer for layer in flat.layers}
    calls = {
        spec["name"]: len(spec.get("inbound_nodes", [])) for spec in flat.get_config()["layers"]
    }
    shared = [name for name in names if calls.get(name, 0) > 1]
    if shared:
        raise ValueError(
            f"Conv layers {shared} are called more than once in model {model.name!r}; a "
            "shared layer's filters have no single response to score. "
            f"Received: layers={layers!r}"
        )
    chains = {}
    for name in names:
        conv = by_name[name]
        chain = [name]
        if not surgery.has_fused_activation(conv):
            following = consumers[name]
            if (
                len(following) == 1
                and calls.get(following[0], 0) == 1
                and isinstance(by_name[following[0]], keras.layers.BatchNormalization)
                and _follows_channels(by_name[following[0]], conv)
            ):
                chain.append(following[0])
                following = consumers[following[0]]
            if (
                len(following) == 1
                and calls.get(following[0], 0) == 1
                and isinstance(by_name[following[0]], surgery.ACTIVATION_LAYER_TYPES)
            ):
                chain.append(following[0])
        chains[name] = chain
    return chains


def response_points(model, layers=None):
    """`{conv_name: name of the layer whose output is its filters' response}`
    (see `response_chains` for the rule).

    Example:

    >>> from keras_seltransfer import models, relevance
    >>> relevance.response_points(models.small_cnn((16, 16, 1), widths=(4, 8)))
    {'block1_conv': 'block1_relu', 'block2_conv': 'block2_relu'}
    """
    return {conv: chain[-1] for conv, chain in response_chains(model, layers).items()}


__all__ = [
    "conv_layer_names",
    "response_chains",
    "response_points",
]
