"""The node graph of a functional Keras model, read once for graph walkers.

A Keras 3 functional model is a graph of nodes, each the call of an
*operation*: a layer (`model.layers`) or a plain operation that is not a
layer, such as `x + 3.0` or `x * y` on symbolic tensors (MobileNetV3 builds
its hard-swish that way). Plain operations are in `model.operations` but not
in `model.layers`, and `model.get_layer` cannot find them; `ModelGraph`
indexes both, by name, with their connections read from the model's
serialised graph (`get_config`), so it sees exactly the connections saving
and loading would.
"""

import keras

# Plain operations (`keras.ops`, by class name) that act on each element on
# its own: a chain of them between a layer and the next one is part of that
# layer's activation (see `ModelGraph.activation_after`).
ELEMENTWISE_OPERATIONS = frozenset(
    {
        "Abs",
        "Add",
        "Celu",
        "Clip",
        "Divide",
        "Elu",
        "Exp",
        "Gelu",
        "Glu",
        "HardShrink",
        "HardSigmoid",
        "HardSilu",
        "HardTanh",
        "LeakyRelu",
        "LogSigmoid",
        "Maximum",
        "Minimum",
        "Mish",
        "Multiply",
        "Negative",
        "Power",
        "Relu",
        "Relu6",
        "Selu",
        "Sigmoid",
        "Silu",
        "Softplus",
        "Softsign",
        "Sqrt",
        "Square",
        "Subtract",
        "Tanh",
        "TrueDivide",
    }
)
# The elementwise operations that are linear (affine) in their tensor input.
_AFFINE_OPERATIONS = frozenset({"Add", "Subtract", "Multiply", "Divide", "TrueDivide", "Negative"})
_ACTIVATION_LAYERS = (
    keras.layers.ReLU,
    keras.layers.LeakyReLU,
    keras.layers.PReLU,
    keras.layers.ELU,
    keras.layers.Softmax,
)


def _histories(structure):
    """Node names of every Keras tensor referenced in a serialised call."""
    if isinstance(structure, dict):
        if structure.get("class_name") == "__keras_tensor__":
            return [structure["config"]["keras_history"][0]]
        found = []
        for value in structure.values():
            found.extend(_histories(value))
        return found
    if isinstance(structure, (list, tuple)):
        found = []
        for value in structure:
            found.extend(_histories(value))
        return found
    return []


def is_nonlinear_activation(operation):
    """Whether a graph node applies a non-linear elementwise activation: an
    activation layer, an `Activation` layer other than linear, or a plain
    non-affine elementwise operation (`keras.ops.relu`, `keras.ops.sigmoid`...).

    Example:

    >>> import keras
    >>> is_nonlinear_activation(keras.layers.Activation("swish"))
    True
    >>> is_nonlinear_activation(keras.layers.Activation("linear"))
    False
    """
    if isinstance(operation, keras.layers.Activation):
        return operation.activation is not keras.activations.linear
    if isinstance(operation, _ACTIVATION_LAYERS):
        return True
    if isinstance(operation, keras.layers.Layer):
        return False
    name = type(operation).__name__
    return name in ELEMENTWISE_OPERATIONS and name not in _AFFINE_OPERATIONS


def is_elementwise(operation):
    """Whether a graph node acts on each element of its input on its own:
    an activation (see `is_nonlinear_activation`), a linear `Activation`, an
    `Identity`, or a plain elementwise operation (`ELEMENTWISE_OPERATIONS`).

    Example:

    >>> import keras
    >>> is_elementwise(keras.layers.ReLU()), is_elementwise(keras.layers.Dense(2))
    (True, False)
    """
    if is_nonlinear_activation(operation):
        return True
    if isinstance(operation, (keras.layers.Activation, keras.layers.Identity)):
        return True
    if isinstance(operation, keras.layers.Layer):
        return False
    return type(operation).__name__ in ELEMENTWISE_OPERATIONS


def inner_layers(layer):
    """The layers a custom layer holds as attributes (e.g. the convolutions
    of a KerasHub block layer), recursively, without `layer` itself.

    Graph surgery sees a model's layers, not what a custom layer computes
    inside its `call`: transforms use this to name the layers they cannot
    reach.

    Example:

    >>> import keras
    >>> class Block(keras.layers.Layer):
    ...     def __init__(self, **kwargs):
    ...         super().__init__(**kwargs)
    ...         self.conv = keras.layers.Conv2D(4, 3, strides=2, name="inner_conv")
    >>> from keras_seltransfer.models.graph import inner_layers
    >>> [inner.name for inner in inner_layers(Block())]
    ['inner_conv']
    """
    found, seen = [], {id(layer)}

    def visit(value):
        if isinstance(value, keras.layers.Layer):
            if id(value) not in seen:
                seen.add(id(value))
                found.append(value)
                for attribute in vars(value).values():
                    visit(attribute)
        elif isinstance(value, (list, tuple)):
            for item in value:
                visit(item)

    for attribute in vars(layer).values():
        visit(attribute)
    return found


class ModelGraph:
    """Every node of a functional model's graph, by name, with its connections.

    Args:
        model: a functional `keras.Model` without nested sub-models (see
            `surgery.flatten`, and `surgery.model_graph`, which flattens
            first).

    Attributes:
        model: `model`.
        nodes: `{name: operation}` for every layer and plain operation, in
            graph order.
        consumers: `{name: names of the nodes reading its output}` (each
            once, in graph order); `[]` for a model output feeding nothing.
        producers: `{name: names of the nodes it reads}`.
        calls: `{name: number of times it is called}` (more than 1 for a
            shared layer).
        order: `{name: position in graph order}`.
        specs: `{name: the node's serialised config}`, with its
            `inbound_nodes` (the arguments of each call).

    Example:

    >>> import keras
    >>> from keras_seltransfer.models.graph import ModelGraph
    >>> inputs = keras.Input((8,), name="x")
    >>> y = keras.layers.Dense(4, name="dense")(inputs)
    >>> graph = ModelGraph(keras.Model(inputs, y * keras.ops.sigmoid(y)))
    >>> graph.consumers["dense"], graph.activation_after("dense")
    (['sigmoid', 'multiply'], 'multiply')
    """

    def __init__(self, model):
        self.model = model
        specs = model.get_config()["layers"]
        self.specs = {spec["name"]: spec for spec in specs}
        by_name = {op.name: op for op in model.operations}
        self.nodes = {spec["name"]: by_name[spec["name"]] for spec in specs}
        self.order = {name: i for i, name in enumerate(self.nodes)}
        self.consumers = {name: [] for name in self.nodes}
        self.producers, self.calls = {}, {}
        for spec in specs:
            nodes = spec.get("inbound_nodes", [])
            self.calls[spec["name"]] = len(nodes)
            names = []
            for node in nodes:
                for producer in _histories(node):
                    if producer not in names:
                        names.append(producer)
            self.producers[spec["name"]] = names
            for producer in names:
                if producer in self.consumers and spec["name"] not in self.consumers[producer]:
                    self.consumers[producer].append(spec["name"])

    def activation_after(self, name, max_nodes=8):
        """The node that ends the elementwise activation applied to `name`'s output.

        Follows `name`'s consumers through elementwise nodes (see
        `is_elementwise`) that read nothing but `name` and each other,
        until they join into one node: for `y -> ReLU` that is the ReLU,
        and for MobileNetV3's hard-swish `y * relu6(y + 3) / 6`, built from
        plain operations, the last multiply. There must be at least one
        non-linear node on the way (an affine chain is no activation).

        Args:
            name: the node whose output the activation reads.
            max_nodes: how many nodes the activation may have at most.

        Returns:
            The name of the activation's last node, or None when `name`'s
            output is not only read by such an activation.
        """
        region, pending = set(), set(self.consumers[name])
        while pending and len(region) < max_nodes:
            inside = region | {name}
            candidate = min(pending, key=self.order.__getitem__)
            operation = self.nodes[candidate]
            if (
                not is_elementwise(operation)
                or self.calls[candidate] != 1
                or not set(self.producers[candidate]) <= inside
            ):
                return None
            if len(pending) == 1 and any(
                is_nonlinear_activation(self.nodes[n]) for n in region | {candidate}
            ):
                return candidate
            pending.discard(candidate)
            region.add(candidate)
            pending.update(self.consumers[candidate])
        return None


__all__ = [
    "ELEMENTWISE_OPERATIONS",
    "ModelGraph",
    "inner_layers",
    "is_elementwise",
    "is_nonlinear_activation",
]
