"""ConvBank: the first conv layers of a pretrained network as a filter bank.

Selective joint fine-tuning (Ge & Yu, CVPR 2017) also describes images by
the responses of the pretrained network's first and second conv layers (the
authors' code taps them before ReLU; both are offered). A bank follows the
protocol of `keras_seltransfer.retrieval.filter_banks`.
"""

import dataclasses

import keras
import numpy as np
import tensorflow as tf

from keras_seltransfer.models.classifier import iter_layers
from keras_seltransfer.models.surgery import ACTIVATION_LAYER_TYPES
from keras_seltransfer.models.surgery import CONV_TYPES
from keras_seltransfer.models.surgery import has_fused_activation
from keras_seltransfer.utils.histograms import image_tensor


class _LinearConvOutput(keras.layers.Layer):
    """The output of a convolution layer before its fused activation.

    Reuses the layer's own kernel and bias (no copies) through the public
    `convolution_op` (Conv2D) or `ops.depthwise_conv` with the layer's
    settings (DepthwiseConv2D), so it stays in step with the backbone. It
    lives only inside a bank's tap model, which is never saved, so it is not
    registered for serialisation.
    """

    def __init__(self, conv, **kwargs):
        super().__init__(**kwargs)
        self.conv = conv

    def call(self, inputs):
        conv = self.conv
        if isinstance(conv, keras.layers.DepthwiseConv2D):
            outputs = keras.ops.depthwise_conv(
                inputs,
                conv.kernel,
                strides=conv.strides,
                padding=conv.padding,
                dilation_rate=conv.dilation_rate,
                data_format=conv.data_format,
            )
        else:
            outputs = conv.convolution_op(inputs, conv.kernel)
        if conv.use_bias:
            shape = (1, 1, 1, -1) if conv.data_format == "channels_last" else (1, -1, 1, 1)
            outputs = outputs + keras.ops.reshape(conv.bias, shape)
        return outputs


@dataclasses.dataclass
class _Call:
    """One call of a layer or operation in a traced graph."""

    operation: object
    inputs: list
    outputs: list


def _describe(operation):
    kind = type(operation).__name__
    if not isinstance(operation, keras.layers.Layer):
        kind += " operation"
    return f"{operation.name} ({kind})"


def _trace(backbone):
    """Calls the backbone's graph again on a new input, nested models inlined.

    A nested functional model is run operation by operation and a nested
    `Sequential` layer by layer, so every layer call and every operation
    node that is not a layer (`x + 3` in MobileNetV3's hard sigmoid) appears
    once in one flat graph, in topological order. The layers are the
    backbone's own (weights shared); each gains one more inbound node.

    Returns:
        `(inputs, calls)`: the new input tensor and the list of `_Call`s.
    """
    calls = []

    def run(operation, *args, **kwargs):
        # A model's inputs may come by keyword (KerasHub backbones).
        tensors = [
            t for t in keras.tree.flatten((args, kwargs)) if isinstance(t, keras.KerasTensor)
        ]
        if isinstance(operation, keras.Sequential):
            (x,) = tensors
            for layer in operation.layers:
                x = run(layer, x)
            return x
        if isinstance(operation, keras.Model):
            start = len(calls)
            keras.models.clone_model(
                operation,
                input_tensors=tensors[0] if len(tensors) == 1 else tensors,
                clone_function=lambda inner: inner,
                call_function=run,
            )
            # The model `clone_model` returns holds copies of the traced
            # tensors when its inputs are not `keras.Input` tensors (a
            # KerasHub backbone after its image converter). A graph with one
            # output has one node of depth 0, run last: its output is the
            # nested model's.
            if len(operation.outputs) != 1 or len(calls) == start or len(calls[-1].outputs) != 1:
                raise ValueError(
                    f"ConvBank inlines nested models with one output computed by their own "
                    f"layers; {operation.name!r} ({type(operation).__name__}) has "
                    f"{len(operation.outputs)} outputs. Received: backbone={backbone.name!r}"
                )
            return calls[-1].outputs[0]
        outputs = operation(*args, **kwargs)
        calls.append(_Call(operation, tensors, keras.tree.flatten(outputs)))
        return outputs

    inputs = keras.Input(batch_shape=backbone.inputs[0].shape, dtype=backbone.inputs[0].dtype)
    run(backbone, inputs)
    return inputs, calls


def _all_conv_layers(backbone):
    """Every conv layer of `backbone`, nested models included, in the order
    of `layers` (a nested model's layers at its place)."""
    found, seen = [], set()
    for layer in iter_layers(backbone):
        if isinstance(layer, CONV_TYPES) and id(layer) not in seen:
            seen.add(id(layer))
            found.append(layer)
    return found


def _conv_layers(backbone, num_layers):
    """The first `num_layers` conv layers of `backbone`."""
    found = _all_conv_layers(backbone)
    if len(found) < num_layers:
        raise ValueError(
            f"Expected `layers` to be at most the number of Conv2D/DepthwiseConv2D "
            f"layers in backbone {backbone.name!r} ({len(found)}). "
            f"Received: layers={num_layers}"
        )
    return found[:num_layers]


def _named_conv_layers(backbone, names):
    if isinstance(names, str) or not names:
        raise ValueError(
            "Expected `layers` to be a positive int or a non-empty list of layer "
            f"names. Received: layers={names!r}"
        )
    names = list(names)
    if len(set(names)) != len(names):
        raise ValueError(f"Expected `layers` to name each layer once. Received: layers={names!r}")
    by_name = {}
    for layer in iter_layers(backbone):
        by_name.setdefault(layer.name, []).append(layer)
    conv_names = [layer.name for layer in _all_conv_layers(backbone)]
    found = []
    for name in names:
        layers = by_name.get(name, [])
        if not layers:
            shown = ", ".join(conv_names[:12]) + (", ..." if len(conv_names) > 12 else "")
            raise ValueError(
                f"Backbone {backbone.name!r} has no layer named {name!r}. "
                f"Its conv layers are: {shown}. Received: layers={names!r}"
            )
        if len({id(layer) for layer in layers}) > 1:
            raise ValueError(
                f"Backbone {backbone.name!r} has {len(layers)} layers named {name!r} (in "
                "different nested models), so the name does not say which to tap. "
                f"Received: layers={names!r}"
            )
        layer = layers[0]
        if not isinstance(layer, CONV_TYPES):
            raise ValueError(
                f"Layer {name!r} is a {type(layer).__name__}, not a Conv2D or "
                f"DepthwiseConv2D layer. Received: layers={names!r}"
            )
        found.append(layer)
    return found


def _post_activation_output(call, consumers):
    """The tensor after the activation that follows the conv `call` (see
    ConvBank); `consumers` maps a tensor's id to the calls that read it."""
    conv = call.operation
    if has_fused_activation(conv):
        return call.outputs[0]
    tensor, path = call.outputs[0], [conv.name]
    readers = []
    for _ in range(2):
        readers = consumers.get(id(tensor), [])
        if len(readers) == 1 and isinstance(readers[0].operation, ACTIVATION_LAYER_TYPES):
            return readers[0].outputs[0]
        if (
            len(readers) == 1
            and isinstance(readers[0].operation, keras.layers.BatchNormalization)
            and len(path) == 1
        ):
            path.append(readers[0].operation.name)
            tensor = readers[0].outputs[0]
            continue
        break
    found = ", ".join(_describe(r.operation) for r in readers) or "no layer"
    raise ValueError(
        f"Conv layer {conv.name!r} has no fused activation, and the output of "
        f"{' -> '.join(path)} feeds {found} rather than exactly one activation "
        "layer (ReLU, Activation, LeakyReLU, PReLU, ELU), optionally after one "
        "BatchNormalization. Use `pre_activation=True` or tap another "
        "layer. Received: pre_activation=False"
    )


class ConvBank:
    """Responses of a backbone's convolution layers, as the paper's conv bank.

    The paper's descriptor uses the first and second conv layers of the
    pretrained network [paper, code]. One `keras.Model` from the backbone's
    input to all tapped tensors computes every group in one pass, sharing
    the backbone's weights; the backbone runs in inference mode, so
    BatchNormalization uses its moving statistics.

    What is tapped for each conv layer:

    - `pre_activation=True` (default; the authors' code taps responses
      before the ReLU): the conv layer's linear output, kernel and bias
      applied, nothing else. A conv with a fused activation (e.g. VGG16's
      `activation="relu"`) is recomputed without it from the layer's own
      kernel and bias. A following BatchNormalization is not applied.
    - `pre_activation=False`: the fused activation's output if the conv
      has one; otherwise the output of the activation layer (ReLU,
      Activation, LeakyReLU, PReLU or ELU) that consumes the conv's output,
      directly or through exactly one BatchNormalization (conv -> BN ->
      ReLU as in ResNet and `small_cnn`). The conv's (or BN's) output must
      feed only that layer; anything else (an Add of a residual branch, a
      linear bottleneck, an operation node such as `x + 3`) raises a
      ValueError.

    Conv layers inside nested models (a backbone wrapping a
    `keras.applications` model, ConvNeXt's `Sequential` stem and
    downsampling blocks) are found and tapped: the tap model is built on the
    backbone's graph with every nested model inlined, operation nodes that
    are not layers included (the layers and weights stay the backbone's
    own). Layers `Conv2D` (and subclasses, `SeparableConv2D` excluded) and
    `DepthwiseConv2D` count as conv layers; a layer called more than once is
    tapped at its first call.

    Args:
        backbone: a functional `keras.Model` with one input taking raw
            pixels in [0, 255].
        layers: an int N (the first N conv layers in the order of
            `backbone.layers`, a nested model's layers at its place) or a
            list of conv layer names, in the order the groups should have.
        pre_activation: whether to tap before (True) or after (False) the
            activation, as detailed above.

    Call arguments:
        images: float `[batch, height, width, channels]` raw pixels in
            [0, 255], with the backbone's channel count.

    Returns:
        A list of float32 tensors `[batch, height_g, width_g, channels_g]`,
        one per tapped layer (channels last even for `channels_first`
        layers); group names are the conv layer names.

    Raises:
        ValueError: for a backbone with several inputs, an int beyond the
            number of conv layers, a missing, ambiguous or non-conv layer
            name, or an activation that cannot be found with
            `pre_activation=False`.

    Example:

    ```python
    bank = ConvBank(small_cnn((64, 64, 1)), layers=2)
    conv1, conv2 = bank(images)
    ```

    Reference:
        Ge & Yu, "Borrowing Treasures from the Wealthy: Deep Transfer
        Learning through Selective Joint Fine-Tuning", CVPR 2017.
    """

    def __init__(self, backbone, layers=2, pre_activation=True):
        if not isinstance(backbone, keras.Model) or not hasattr(backbone, "inputs"):
            raise ValueError(
                "Expected `backbone` to be a functional keras.Model. "
                f"Received: backbone={backbone!r}"
            )
        if len(backbone.inputs) != 1:
            raise ValueError(
                "Expected `backbone` to have exactly one (image) input. "
                f"Received: backbone.inputs={backbone.inputs}"
            )
        if not isinstance(pre_activation, bool):
            raise ValueError(
                "Expected `pre_activation` to be a bool. "
                f"Received: pre_activation={pre_activation!r}"
            )
        if isinstance(layers, (int, np.integer)) and not isinstance(layers, bool):
            if layers < 1:
                raise ValueError(
                    f"Expected `layers` to be a positive int. Received: layers={layers}"
                )
            convs = _conv_layers(backbone, int(layers))
        else:
            convs = _named_conv_layers(backbone, layers)
        inputs, calls = _trace(backbone)
        first_call, consumers = {}, {}
        for call in calls:
            first_call.setdefault(id(call.operation), call)
            for tensor in call.inputs:
                consumers.setdefault(id(tensor), []).append(call)
        taps = []
        for conv in convs:
            call = first_call.get(id(conv))
            if call is None:
                raise ValueError(
                    f"Conv layer {conv.name!r} is not on the path from the input of "
                    f"backbone {backbone.name!r} to its outputs, so it has no response to "
                    f"tap. Received: layers={layers!r}"
                )
            if not pre_activation:
                tap = _post_activation_output(call, consumers)
            elif has_fused_activation(conv):
                tap = _LinearConvOutput(
                    conv, dtype=conv.dtype_policy, name=f"{conv.name}_linear_tap"
                )(call.inputs[0])
            else:
                tap = call.outputs[0]
            if conv.data_format == "channels_first":
                tap = keras.layers.Permute((2, 3, 1), name=f"{conv.name}_nhwc_tap")(tap)
            taps.append(tap)
        self.backbone = backbone
        self.layers = [conv.name for conv in convs]
        self.pre_activation = pre_activation
        self._groups = [(conv.name, int(tap.shape[-1])) for conv, tap in zip(convs, taps)]
        self._model = keras.Model(inputs, taps, name=f"{backbone.name}_conv_bank")

    @property
    def groups(self):
        return list(self._groups)

    @property
    def num_channels(self):
        return sum(channels for _, channels in self._groups)

    def __call__(self, images):
        images = image_tensor(images)
        expected = self.backbone.inputs[0].shape[-1]
        if expected is not None and images.shape[-1] is not None and images.shape[-1] != expected:
            raise ValueError(
                f"Backbone {self.backbone.name!r} takes {expected}-channel images. "
                f"Received: images.shape={images.shape}"
            )
        outputs = self._model(images, training=False)
        if not isinstance(outputs, (list, tuple)):
            outputs = [outputs]
        return [tf.cast(o, tf.float32) for o in outputs]

    def get_config(self):
        return {
            "type": "conv",
            "layers": list(self.layers),
            "pre_activation": self.pre_activation,
            "backbone": self.backbone.name,
        }

    def __repr__(self):
        return (
            f"ConvBank(backbone={self.backbone.name!r}, layers={self.layers}, "
            f"pre_activation={self.pre_activation})"
        )


__all__ = ["ConvBank"]
