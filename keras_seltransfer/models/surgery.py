"""Model surgery: rebuild a functional Keras model with layers swapped or inserted.

The method transformations of keras_seltransfer (AdaFilter's gated
convolutions, anti-aliasing with BlurPool, selective filter transfer's
filter masks) all take a pretrained functional model and return a new one
in which some layers are replaced by others, or followed by new ones, with
every pretrained weight copied over. This module is the one place that
walks the graph: it builds on `keras.models.clone_model`'s public
`call_function` hook, which calls each (freshly cloned) layer on its new
inputs in topological order, so a transformation only has to say what to do
with one layer call at a time.

Layers keep their names through a rebuild. Every clone gets its original's
weights (same class and weight shapes), and so does a layer a transformation
creates under an original's name; other new layers are the transformation's
own to initialise (it sees the original layer and can copy from it). Graph
nodes that are not layers (plain operations such as `x + 3.0`) are rebuilt
like layers; `models.graph.ModelGraph` indexes both for the graph walkers.
"""

import contextlib
import sys

import keras

from keras_seltransfer.models.graph import ModelGraph


CONV_TYPES = (keras.layers.Conv2D, keras.layers.DepthwiseConv2D)
# The layers that apply an activation after a conv: a filter's response is
# read after one of these (`models.response_points`), and `ConvBank` taps
# its conv layers' responses before them.
ACTIVATION_LAYER_TYPES = (
    keras.layers.ReLU,
    keras.layers.Activation,
    keras.layers.LeakyReLU,
    keras.layers.PReLU,
    keras.layers.ELU,
)


def has_fused_activation(layer):
    """Whether a conv `layer` applies its own non-linear activation.

    Example:

    >>> has_fused_activation(keras.layers.Conv2D(4, 3, activation="relu"))
    True
    """
    return layer.activation is not None and layer.activation is not keras.activations.linear


def channel_axis(layer):
    """The channel axis of a conv `layer`'s output: -1 for channels_last,
    1 for channels_first.

    Example:

    >>> channel_axis(keras.layers.Conv2D(4, 3))
    -1
    """
    return -1 if getattr(layer, "data_format", "channels_last") == "channels_last" else 1


def _is_graph_model(model):
    """Whether `model` is a keras.Model built from a graph of symbolic tensors
    (functional, Sequential once built, or a subclass of either whose
    constructor builds a graph, such as a KerasHub `Backbone`)."""
    try:
        inputs, outputs = model.inputs, model.outputs
    except (AttributeError, ValueError):
        return False
    tensors = list(inputs or []) + list(outputs or [])
    return bool(inputs) and bool(outputs) and all(isinstance(t, keras.KerasTensor) for t in tensors)


def _has_layer_config(model):
    """Whether `model`'s config is its layer graph: a plain functional model,
    or a subclass that keeps the functional `get_config` (as
    `keras.models.clone_model` decides). Read from the class, since
    serialising a large graph takes a second."""
    for cls in type(model).__mro__:
        if cls.__name__ == "Functional" and cls.__module__.startswith("keras."):
            return type(model).get_config is cls.get_config
    return False


def _plain_graph(model):
    """`model` itself when its config is a layer graph, otherwise a plain
    functional model over the same symbolic tensors (same layer objects,
    weights shared)."""
    if _has_layer_config(model):
        return model
    if isinstance(model, keras.Sequential):
        inputs, outputs = model.inputs, model.outputs
        return keras.Model(
            inputs[0] if len(inputs) == 1 else inputs,
            outputs[0] if len(outputs) == 1 else outputs,
            name=model.name,
        )
    # A functional subclass keeps its input and output structure.
    return keras.Model(model.input, model.output, name=model.name)


def _check_functional(model, what="model"):
    if not isinstance(model, keras.Model):
        raise ValueError(
            f"`{what}` must be a keras.Model. Received: {what} of type {type(model).__name__}"
        )
    if not _is_graph_model(model):
        hint = (
            " Call it once on data (or pass an `input_shape`) to build it."
            if isinstance(model, keras.Sequential)
            else ""
        )
        raise ValueError(
            f"`{what}` must be a functional model (a graph of layers); {model.name!r} is a "
            f"{type(model).__name__} whose layer graph is unknown.{hint} "
            f"Received: {what}={model.name!r}"
        )


def operations(model):
    """Maps every operation name of a model's flattened graph to the operation.

    Keras 3 functional graphs hold layers and plain operations: an
    expression such as `x + 3.0` or `x * y` on symbolic tensors (the
    hard-swish of MobileNetV3) becomes an operation node (`keras.ops`) that
    is in `model.operations` but not in `model.layers`, and that
    `model.get_layer` cannot find. Graph walkers look nodes up here.

    Example:

    >>> import keras
    >>> from keras_seltransfer.models.surgery import operations
    >>> inputs = keras.Input((4,), name="x")
    >>> model = keras.Model(inputs, keras.layers.Dense(2, name="dense")(inputs) + 3.0)
    >>> sorted(operations(model))
    ['add', 'dense', 'x']
    """
    _check_functional(model)
    return {op.name: op for op in flatten(model).operations}


def is_layer(operation):
    """Whether a graph node is a `keras.layers.Layer` (not a plain operation).

    Example:

    >>> import keras
    >>> is_layer(keras.layers.ReLU())
    True
    """
    return isinstance(operation, keras.layers.Layer)


def model_graph(model):
    """The `ModelGraph` of `model` flattened (see `flatten`): every layer and
    plain operation by name, with consumers, producers and call counts.

    Example:

    >>> from keras_seltransfer import models
    >>> from keras_seltransfer.models.surgery import model_graph
    >>> graph = model_graph(models.small_cnn((16, 16, 1), widths=(4, 8)))
    >>> graph.consumers["block1_conv"], graph.activation_after("block1_bn")
    (['block1_bn'], 'block1_relu')
    """
    return ModelGraph(flatten(model))


def consumers(model):
    """Maps every node name (layer or plain operation) of a functional model,
    flattened, to the nodes fed by it.

    Returns:
        A dict `{name: [consumer names, in graph order]}`; a node producing
        a model output and feeding nothing maps to `[]`. Read from the
        model's serialised graph (`get_config`), so it sees exactly the
        connections saving and loading would. Look the names up with
        `operations`: plain operations are not in `model.layers`.

    Example:

    >>> from keras_seltransfer import models
    >>> from keras_seltransfer.models.surgery import consumers
    >>> graph = consumers(models.small_cnn((16, 16, 1), widths=(4, 8)))
    >>> graph["block1_conv"], graph["features"]
    (['block1_bn'], [])
    """
    return model_graph(model).consumers


def producers(model):
    """Maps every node name (layer or plain operation) of a functional model,
    flattened, to the nodes feeding it.

    Example:

    >>> from keras_seltransfer import models
    >>> from keras_seltransfer.models.surgery import producers
    >>> graph = producers(models.small_cnn((16, 16, 1), widths=(4, 8)))
    >>> graph["block2_conv"], graph["image"]
    (['block1_pool'], [])
    """
    return model_graph(model).producers


def _fresh_inputs(model):
    """New `keras.Input`s in `model.input`'s structure, named like its input
    layers (`clone_model` would name them after the input tensors)."""
    names = {
        id(op.output): op.name for op in model.operations if isinstance(op, keras.layers.InputLayer)
    }
    return keras.tree.map_structure(
        lambda x: keras.Input(
            batch_shape=x.shape, dtype=x.dtype, sparse=x.sparse, name=names.get(id(x), x.name)
        ),
        model.input,
    )


def _inline(model, args, kwargs):
    """Calls the layers of sub-model `model` (flattened) on `args`, in place
    of calling `model` itself; returns its outputs in its structure."""
    graph = flatten(model)
    inputs = keras.tree.pack_sequence_as(graph.input, keras.tree.flatten(args))
    if kwargs.get("training") is not None or kwargs.get("mask") is not None:
        raise ValueError(
            f"Cannot inline sub-model {model.name!r}: it is called with "
            f"{sorted(k for k, v in kwargs.items() if v is not None)}, which its layers "
            "would not see. Call it without `training`/`mask` arguments."
        )
    # `Function.call` runs the sub-model's graph, calling each of its layers
    # on the given tensors, and returns their outputs as they are (calling
    # the Function would add one node for the whole graph, and a functional
    # model built on non-input tensors would re-root a copy of the graph).
    return keras.Function(graph.input, graph.output).call(inputs)


def flatten(model):
    """Inlines nested sub-models, so every layer is a top-level layer.

    A backbone built as `keras.Model(inputs, app(inputs))` hides the
    application's layers inside one nested model, and ConvNeXt builds its
    stem and downsampling blocks as nested `keras.Sequential` models;
    surgery needs every layer at the top. Nested functional models,
    `Sequential` models and subclasses of either that build a graph
    (KerasHub backbones) are inlined, recursively; a sub-model called
    several times is inlined at every call, its layers becoming shared
    layers. When something was inlined, the result is made of fresh copies
    of every layer and operation, with the same names, configs and weights
    (a layer called inside a sub-model first would otherwise report that
    call's tensors as its `input` and `output`, which are not those of the
    flattened graph); weights are copied, not shared with `model`. A
    top-level Sequential or subclassed graph model (a KerasHub `Backbone`)
    without sub-models becomes a plain functional model over the *same*
    layers, and a plain functional model without sub-models is returned as
    is.

    Raises:
        ValueError: if `model` (or a sub-model) is not built from a graph of
            symbolic tensors (a subclassed model with its own `call`, or an
            unbuilt Sequential model), or a sub-model is called with
            `training` or `mask` arguments.

    Example:

    >>> import keras
    >>> from keras_seltransfer import models
    >>> from keras_seltransfer.models.surgery import flatten
    >>> inputs = keras.Input((16, 16, 1))
    >>> wrapped = keras.Model(inputs, models.small_cnn((16, 16, 1), widths=(4, 8))(inputs))
    >>> len(wrapped.layers), len(flatten(wrapped).layers)
    (2, 10)
    """
    _check_functional(model)
    plain = _plain_graph(model)
    nested = [layer for layer in plain.layers if isinstance(layer, keras.Model)]
    for layer in nested:
        _check_functional(layer, what=f"sub-model {layer.name!r}")
    if not nested:
        return plain

    def call(layer, *args, **kwargs):
        if isinstance(layer, keras.Model):
            return _inline(layer, args, kwargs)
        return layer(*args, **kwargs)

    inlined = keras.models.clone_model(
        plain,
        input_tensors=_fresh_inputs(plain),
        clone_function=lambda layer: layer,
        call_function=call,
    )
    # The inlined layers were first called inside their sub-model, so their
    # `output` (that of their first call) would belong to the sub-model's
    # graph. Fresh copies, called only here, make `layer.output` and
    # `layer.input` the tensors of the flattened graph.
    pairs = []

    def copy(operation):
        fresh = operation.__class__.from_config(operation.get_config())
        pairs.append((operation, fresh))
        return fresh

    flat = keras.models.clone_model(
        inlined, input_tensors=_fresh_inputs(inlined), clone_function=copy
    )
    for operation, fresh in pairs:
        if is_layer(fresh):
            _copy_weights(operation, fresh)
    return flat


def copy_matching_weights(source, target, skip=()):
    """Copies weights between same-named layers with matching weight shapes.

    Args:
        source: the model weights are read from.
        target: the model weights are written to.
        skip: names of target layers to leave alone.

    Returns:
        The names of the target layers whose weights were copied.

    Example:

    >>> from keras_seltransfer import models
    >>> from keras_seltransfer.models.surgery import copy_matching_weights
    >>> source = models.small_cnn((16, 16, 1), widths=(4, 8))
    >>> target = models.small_cnn((16, 16, 1), widths=(4, 8))
    >>> copy_matching_weights(source, target, skip=("block2_conv",))
    ['block1_conv', 'block1_bn', 'block2_bn']
    """
    by_name = {layer.name: layer for layer in source.layers}
    copied = []
    for layer in target.layers:
        if layer.name not in skip and _copy_weights(by_name.get(layer.name), layer):
            copied.append(layer.name)
    return copied


def _copy_weights(original, layer):
    """Copies `original`'s weights into `layer` when both are of one class
    with the same weight shapes; returns whether it did."""
    if original is None or not layer.weights or type(original) is not type(layer):
        return False
    shapes = [tuple(w.shape) for w in original.weights]
    if shapes != [tuple(w.shape) for w in layer.weights]:
        return False
    layer.set_weights(original.get_weights())
    return True


@contextlib.contextmanager
def recursion_allowance(nodes, per_node=4):
    """Raises Python's recursion limit while Keras maps a graph of `nodes` nodes.

    Keras walks a functional graph recursively (building, cloning and
    loading a saved model alike), one or more frames per node on the longest
    path; a deep network (EfficientNetV2L, more so after a transformation
    inserts a `FilterMask` after every conv) can pass the default limit of
    1000. The limit is raised for the duration only, by `per_node` frames
    per node, and restored afterwards.

    Example:

    >>> import sys
    >>> limit = sys.getrecursionlimit()
    >>> with recursion_allowance(2000):
    ...     sys.getrecursionlimit() == limit + 8000
    True
    >>> sys.getrecursionlimit() == limit
    True
    """
    previous = sys.getrecursionlimit()
    sys.setrecursionlimit(max(previous, previous + per_node * int(nodes)))
    try:
        yield
    finally:
        sys.setrecursionlimit(previous)


def _graph_depth_allowance(model, per_node=4):
    """`recursion_allowance` for the operations of `model` (room for the
    layers a transformation adds)."""
    return recursion_allowance(len(model.operations), per_node)


def rebuild(model, call_function=None, *, name=None):
    """Rebuilds a functional model with fresh layers and its weights copied.

    Every layer is cloned from its config and called on the new inputs in
    the original graph's topological order through `call_function(layer,
    original, *args, **kwargs)`, where `layer` is the fresh clone (same name
    and config as `original`, not yet built) and `original` is the layer of
    `model`. It returns what the call should produce: usually
    `layer(*args, **kwargs)`, possibly followed by new layers, or the output
    of replacement layers instead. After the graph is built, every layer
    whose name, class and weight shapes match a layer of `model` receives
    that layer's weights; replacements must set their own (they are built
    once called, so `call_function` can copy from `original` right away).

    Nested sub-models are inlined first (see `flatten`). Plain operations
    of the graph (`x + 3.0`, `x * y` on symbolic tensors) are rebuilt as
    they were and pass through `call_function` too, with `original` the
    operation (see `is_layer`); shared layers stay shared, `call_function`
    running once per call.

    Args:
        model: a functional `keras.Model`.
        call_function: the per-layer hook; None rebuilds an identical copy.
        name: name of the new model (default: the original's).

    Returns:
        The new functional `keras.Model` (inputs and outputs in the original
        structure).

    Example:

    >>> import keras
    >>> from keras_seltransfer import models
    >>> from keras_seltransfer.models.surgery import rebuild
    >>> def add_dropout(layer, original, *args, **kwargs):
    ...     outputs = layer(*args, **kwargs)
    ...     if original.name == "block1_relu":
    ...         outputs = keras.layers.Dropout(0.1, name="block1_dropout")(outputs)
    ...     return outputs
    >>> backbone = models.small_cnn((16, 16, 1), widths=(4, 8))
    >>> model = rebuild(backbone, add_dropout, name="with_dropout")
    >>> [layer.name for layer in model.layers[4:7]]
    ['block1_relu', 'block1_dropout', 'block1_pool']
    """
    _check_functional(model)
    flat = flatten(model)
    originals = {}

    def clone(operation):
        # Layers and plain operations alike are rebuilt from their config;
        # a shared layer is cloned once and called at each of its nodes.
        fresh = operation.__class__.from_config(operation.get_config())
        originals[id(fresh)] = operation
        return fresh

    def call(layer, *args, **kwargs):
        if call_function is None:
            return layer(*args, **kwargs)
        return call_function(layer, originals[id(layer)], *args, **kwargs)

    with _graph_depth_allowance(flat):
        new = keras.models.clone_model(
            flat, input_tensors=_fresh_inputs(flat), clone_function=clone, call_function=call
        )
    # A clone gets its original's weights even when its config renamed it (a
    # custom layer whose config does not keep its name); layers that a
    # transformation created with an original's name get them by name.
    done = {id(layer) for layer in new.layers if _copy_weights(originals.get(id(layer)), layer)}
    by_name = {layer.name: layer for layer in flat.layers}
    for layer in new.layers:
        if id(layer) not in done and id(layer) not in originals:
            _copy_weights(by_name.get(layer.name), layer)
    if name is not None and name != new.name:
        with _graph_depth_allowance(new):
            new = keras.Model(new.input, new.output, name=name)
    return new


def matching_layers(model, layer_types, pattern=None):
    """Names of the layers of `model` that are instances of `layer_types`
    and, when `pattern` (a regular expression) is given, whose name matches
    it (`re.search`).

    Example:

    >>> import keras
    >>> from keras_seltransfer import models
    >>> from keras_seltransfer.models.surgery import matching_layers
    >>> backbone = models.small_cnn((16, 16, 1), widths=(4, 8))
    >>> matching_layers(backbone, (keras.layers.Conv2D,))
    ['block1_conv', 'block2_conv']
    >>> matching_layers(backbone, (keras.layers.ReLU,), "^block2")
    ['block2_relu']
    """
    import re

    if pattern is not None:
        try:
            regex = re.compile(pattern)
        except re.error as e:
            raise ValueError(f"`pattern` is not a regular expression ({e}). Received: {pattern!r}")
    names = []
    for layer in flatten(model).layers:
        if isinstance(layer, layer_types) and (pattern is None or regex.search(layer.name)):
            names.append(layer.name)
    return names


__all__ = [
    "consumers",
    "copy_matching_weights",
    "flatten",
    "is_layer",
    "matching_layers",
    "model_graph",
    "operations",
    "producers",
    "rebuild",
]
