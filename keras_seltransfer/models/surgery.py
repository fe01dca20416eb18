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

Layers keep their names through a rebuild, so weights are matched by name:
every layer of the new model whose name, class and weight shapes match a
layer of the original gets the original's weights; layers a transformation
creates are its own to initialise (it sees the original layer and can copy
from it).
"""

import keras


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


def _check_functional(model, what="model"):
    if not isinstance(model, keras.Model):
        raise ValueError(
            f"`{what}` must be a keras.Model. Received: {what} of type {type(model).__name__}"
        )
    if isinstance(model, keras.Sequential):
        raise ValueError(
            f"`{what}` must be a functional model; Sequential model {model.name!r} can be "
            "made functional with keras.Model(model.inputs, model.outputs)."
        )
    if not hasattr(model, "operations") or not getattr(model, "_is_graph_network", True):
        raise ValueError(
            f"`{what}` must be a functional model; {model.name!r} is a subclassed "
            f"{type(model).__name__} whose layer graph is unknown."
        )
    try:
        model.get_config()["layers"]
    except (NotImplementedError, KeyError, TypeError) as e:
        raise ValueError(
            f"`{what}` must be a functional model; {model.name!r} "
            f"({type(model).__name__}) has no layer graph: {e}"
        ) from e


def _histories(structure):
    """Layer names of every Keras tensor referenced in a serialised call."""
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


def consumers(model):
    """Maps every layer name of a functional model to the layers fed by it.

    Returns:
        A dict `{layer_name: [consumer layer names, in graph order]}`; a
        layer producing a model output and feeding nothing maps to `[]`.
        Read from the model's serialised graph (`get_config`), so it sees
        exactly the connections saving and loading would.

    Example:

    >>> from keras_seltransfer import models
    >>> from keras_seltransfer.models.surgery import consumers
    >>> graph = consumers(models.small_cnn((16, 16, 1), widths=(4, 8)))
    >>> graph["block1_conv"], graph["features"]
    (['block1_bn'], [])
    """
    _check_functional(model)
    layers = model.get_config()["layers"]
    result = {spec["name"]: [] for spec in layers}
    for spec in layers:
        for node in spec.get("inbound_nodes", []):
            for producer in _histories(node):
                if producer in result and spec["name"] not in result[producer]:
                    result[producer].append(spec["name"])
    return result


def producers(model):
    """Maps every layer name of a functional model to the layers feeding it.

    Example:

    >>> from keras_seltransfer import models
    >>> from keras_seltransfer.models.surgery import producers
    >>> graph = producers(models.small_cnn((16, 16, 1), widths=(4, 8)))
    >>> graph["block2_conv"], graph["image"]
    (['block1_pool'], [])
    """
    _check_functional(model)
    result = {}
    for spec in model.get_config()["layers"]:
        names = []
        for node in spec.get("inbound_nodes", []):
            for producer in _histories(node):
                if producer not in names:
                    names.append(producer)
        result[spec["name"]] = names
    return result


def flatten(model):
    """Inlines nested functional models, so every layer is a top-level layer.

    A backbone built as `keras.Model(inputs, app(inputs))` hides the
    application's layers inside one nested model; surgery needs them at the
    top. Returns a new model whose layers are the *same* layer objects
    (weights shared with `model`); a model without nested functional models
    is returned as is.

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
    nested = [
        layer
        for layer in model.layers
        if isinstance(layer, keras.Model) and not isinstance(layer, keras.Sequential)
    ]
    if any(isinstance(layer, keras.Sequential) for layer in model.layers):
        names = [layer.name for layer in model.layers if isinstance(layer, keras.Sequential)]
        raise ValueError(
            f"Model {model.name!r} contains Sequential sub-models {names}; rebuild them as "
            "functional models before surgery."
        )
    if not nested:
        return model

    def call(layer, *args, **kwargs):
        if isinstance(layer, keras.Model) and not isinstance(layer, keras.Sequential):
            inlined = keras.models.clone_model(
                flatten(layer),
                input_tensors=list(args) if len(args) > 1 else args[0],
                clone_function=lambda inner: inner,
            )
            outputs = inlined.outputs
            return outputs[0] if len(outputs) == 1 else outputs
        return layer(*args, **kwargs)

    return keras.models.clone_model(
        model, clone_function=lambda layer: layer, call_function=call
    )


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
        original = by_name.get(layer.name)
        if original is None or layer.name in skip or not layer.weights:
            continue
        if type(original) is not type(layer):
            continue
        shapes = [tuple(w.shape) for w in original.weights]
        if shapes != [tuple(w.shape) for w in layer.weights]:
            continue
        layer.set_weights(original.get_weights())
        copied.append(layer.name)
    return copied


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

    Nested functional models are inlined first (see `flatten`).

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
    originals = {layer.name: layer for layer in flat.layers}

    def call(layer, *args, **kwargs):
        if call_function is None:
            return layer(*args, **kwargs)
        return call_function(layer, originals[layer.name], *args, **kwargs)

    new = keras.models.clone_model(flat, call_function=call)
    copy_matching_weights(flat, new)
    if name is not None and name != new.name:
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
    "matching_layers",
    "producers",
    "rebuild",
]
