"""Where a conv filter's response is read: the conv, its BatchNorm, its activation.

Filter relevance (`keras_seltransfer.models.relevance`) and selective filter
transfer (`keras_seltransfer.models.filter_transfer`) score and mask a conv
layer's filters where their response is complete: `response_chains` follows
each conv layer through the BatchNormalization and activation that belong to
it alone, `response_points` names the layer at the end of each chain,
`response_tensors` gives the symbolic tensors there (to build one model that
reads every response at once) and `conv_layer_names` picks the conv layers to
score.

The graph is walked call by call, not layer by layer: a Keras 3 functional
graph also holds operation nodes that are not layers (`x + 3.0` and `x * y`
on symbolic tensors, as MobileNetV3 builds its hard-swish; they are in
`model.operations`, not in `model.layers`), and once nested sub-models are
inlined (`surgery.flatten`) their layers are called in the flattened graph
as well as in their own. Keras has no public accessor for a graph's calls,
so the walk reads the structure Keras documents on `keras.src.ops.node.Node`
(each symbolic tensor's `_keras_history` names the operation and the call
that produced it; `operation._inbound_nodes` holds the calls) from the
model's outputs back to its inputs, as `keras.Model` itself does. Reading
it runs no layer and adds no call, unlike re-calling every layer through
`keras.models.clone_model`.
"""

import keras

from keras_seltransfer.models import surgery


class _CallGraph:
    """The operation calls of a model's flattened graph, in topological order.

    `calls[i]` is `(operation, input tensors, output tensors)`; `consumers[i]`
    the indices of the calls that read an output of call i (each once, in
    graph order); `count[id(operation)]` how often the operation is called
    in this graph; `inputs` the graph's input tensors.
    """

    def __init__(self, model):
        self.flat = surgery.flatten(model)
        self.inputs = list(self.flat.inputs)
        sources = {id(t) for t in self.inputs}
        nodes, visited = [], set()
        # Depth-first from the outputs; a call is listed after its producers.
        stack = [(t, False) for t in reversed(self.flat.outputs)]
        while stack:
            item, expanded = stack.pop()
            if expanded:
                nodes.append(item)
                continue
            if id(item) in sources:
                continue
            operation, node_index, _ = item._keras_history
            if operation is None:
                continue
            node = operation._inbound_nodes[node_index]
            if id(node) in visited or node.is_input:
                continue
            visited.add(id(node))
            stack.append((node, True))
            stack.extend((t, False) for t in reversed(node.input_tensors))
        self.calls = [(n.operation, list(n.input_tensors), list(n.outputs)) for n in nodes]
        producer = {id(t): i for i, (_, _, outputs) in enumerate(self.calls) for t in outputs}
        self.consumers = [[] for _ in self.calls]
        self.count = {}
        self.index = {}
        for j, (operation, inputs, _) in enumerate(self.calls):
            self.count[id(operation)] = self.count.get(id(operation), 0) + 1
            self.index.setdefault(id(operation), j)
            for t in inputs:
                i = producer.get(id(t))
                if i is not None and j not in self.consumers[i]:
                    self.consumers[i].append(j)

    def called_once(self, i):
        return self.count[id(self.calls[i][0])] == 1

    def chain(self, conv):
        """Indices of the calls from `conv`'s call to its response point."""
        i = self.index[id(conv)]
        chain = [i]
        if surgery.has_fused_activation(conv):
            return chain
        following = self.consumers[i]
        if (
            len(following) == 1
            and self.called_once(following[0])
            and isinstance(self.calls[following[0]][0], keras.layers.BatchNormalization)
            and _follows_channels(self.calls[following[0]][0], conv)
        ):
            chain.append(following[0])
            following = self.consumers[following[0]]
        if (
            len(following) == 1
            and self.called_once(following[0])
            and isinstance(self.calls[following[0]][0], surgery.ACTIVATION_LAYER_TYPES)
        ):
            chain.append(following[0])
        return chain


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
        model: a functional `keras.Model` (nested sub-models are looked
            into, see `surgery.flatten`).
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
    return _conv_names(surgery.flatten(model), layers, model.name)


def _conv_names(flat, layers, model_name):
    """`conv_layer_names` of an already flattened model."""
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
        by_name = {operation.name: operation for operation in flat.operations}
        for name in names:
            if name not in by_name:
                raise ValueError(
                    f"Model {model_name!r} has no layer named {name!r}. "
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
            f"Model {model_name!r} has no Conv2D or DepthwiseConv2D layer to score"
            + (f" matching {layers!r}" if layers is not None else "")
            + f". Received: layers={layers!r}"
        )
    return names


def _walk(model, layers):
    """`(call graph, conv names)`, the conv layers checked to be called once."""
    graph = _CallGraph(model)
    names = _conv_names(graph.flat, layers, model.name)
    by_name = {operation.name: operation for operation in graph.flat.operations}
    shared = [name for name in names if graph.count.get(id(by_name[name]), 0) > 1]
    if shared:
        raise ValueError(
            f"Conv layers {shared} are called more than once in model {model.name!r}; a "
            "shared layer's filters have no single response to score. "
            f"Received: layers={layers!r}"
        )
    return graph, [by_name[name] for name in names]


def response_chains(model, layers=None):
    """The layers from each conv layer to the point its response is read at.

    A filter's response is read after what belongs to it alone [inferred]:
    the conv's output; then, if that output feeds exactly one call and it
    is a BatchNormalization over the conv's channel axis, that layer's
    output; then, if *that* feeds exactly one activation layer (`ReLU`,
    `Activation`, `LeakyReLU`, `PReLU`, `ELU`), its output. A conv with a
    fused non-linear activation (`activation="relu"`) is read at its own
    output. So conv -> BN -> ReLU (small_cnn, ResNet, MobileNet) is read
    post-activation, conv -> BN -> Add (a residual branch's last conv, a
    linear bottleneck) after the BN, a conv feeding a concatenation
    (DenseNet) at the conv itself, and conv -> BN -> hard-swish built from
    operations (MobileNetV3: the BN feeds `x + 3` and `x * ...`) after the
    BN. A BatchNormalization or activation layer called more than once
    (shared) ends the chain before it; operation nodes that are not layers
    end it too.

    Args:
        model: a functional `keras.Model` (nested sub-models are inlined
            by `surgery.flatten`).
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
    graph, convs = _walk(model, layers)
    return {
        conv.name: [graph.calls[i][0].name for i in graph.chain(conv)] for conv in convs
    }


def response_tensors(model, layers=None, *, channels_last=False):
    """The symbolic tensors at every conv layer's response point, in one graph.

    The tensors belong to a fresh call graph of the flattened model (the
    same layer objects, so the same weights; see the module docstring), so
    `keras.Model(inputs[0], list(tensors.values()))` computes every
    response in one forward pass, even when the conv layers sit inside
    nested sub-models of `model`.

    Args:
        model: a functional `keras.Model`.
        layers: which conv layers (see `conv_layer_names`).
        channels_last: whether the response of a channels-first conv is
            transposed to channels last (by a `Permute` layer named
            `"{conv_name}_nhwc_response"`).

    Returns:
        A tuple `(inputs, {conv_name: KerasTensor})`: the graph's list of
        input tensors and, in graph order, each conv's response tensor (as
        the layer computes it, channels first for a channels-first conv
        unless `channels_last`).

    Raises:
        ValueError: as `response_chains`.

    Example:

    >>> import keras
    >>> import numpy as np
    >>> from keras_seltransfer import models
    >>> from keras_seltransfer.models.response_points import response_tensors
    >>> inputs, tensors = response_tensors(models.small_cnn((16, 16, 1), widths=(4, 8)))
    >>> reader = keras.Model(inputs[0], list(tensors.values()))
    >>> [tuple(r.shape) for r in reader(np.zeros((2, 16, 16, 1), "float32"))]
    [(2, 8, 8, 4), (2, 4, 4, 8)]
    """
    graph, convs = _walk(model, layers)
    tensors = {}
    for conv in convs:
        (tensor,) = graph.calls[graph.chain(conv)[-1]][2]
        if channels_last and surgery.channel_axis(conv) == 1:
            tensor = keras.layers.Permute((2, 3, 1), name=f"{conv.name}_nhwc_response")(tensor)
        tensors[conv.name] = tensor
    return list(graph.inputs), tensors


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
    "response_tensors",
]
