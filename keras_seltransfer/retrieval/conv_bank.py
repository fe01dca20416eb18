"""ConvBank: the first conv layers of a pretrained network as a filter bank.

Selective joint fine-tuning (Ge & Yu, CVPR 2017) also describes images by
the responses of the pretrained network's first and second conv layers (the
authors' code taps them before ReLU; both are offered). A bank follows the
protocol of `keras_seltransfer.retrieval.filter_banks`.
"""

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


def _conv_layers(backbone, num_layers):
    """The first `num_layers` conv layers of `backbone`, in graph order."""
    found = []
    for layer in backbone.layers:
        if len(found) == num_layers:
            break
        if isinstance(layer, CONV_TYPES):
            found.append(layer)
        elif isinstance(layer, keras.Model) and any(
            isinstance(inner, CONV_TYPES) for inner in iter_layers(layer)
        ):
            raise ValueError(
                f"ConvBank taps the backbone's top-level layers, but conv layers "
                f"sit inside the nested model {layer.name!r} before {num_layers} "
                "top-level conv layers were found. Build the backbone as one flat "
                "graph (for keras.applications, pass `input_tensor=`). "
                f"Received: layers={num_layers}"
            )
    if len(found) < num_layers:
        raise ValueError(
            f"Expected `layers` to be at most the number of Conv2D/DepthwiseConv2D "
            f"layers in backbone {backbone.name!r} ({len(found)}). "
            f"Received: layers={num_layers}"
        )
    return found


def _named_conv_layers(backbone, names):
    if isinstance(names, str) or not names:
        raise ValueError(
            "Expected `layers` to be a positive int or a non-empty list of layer "
            f"names. Received: layers={names!r}"
        )
    names = list(names)
    if len(set(names)) != len(names):
        raise ValueError(f"Expected `layers` to name each layer once. Received: layers={names!r}")
    top = {layer.name: layer for layer in backbone.layers}
    conv_names = [layer.name for layer in backbone.layers if isinstance(layer, CONV_TYPES)]
    found = []
    for name in names:
        layer = top.get(name)
        if layer is None:
            nested = [
                inner.name
                for inner in iter_layers(backbone)
                if inner.name == name and inner.name not in top
            ]
            where = (
                " It is inside a nested model; ConvBank taps top-level layers only."
                if nested
                else ""
            )
            shown = ", ".join(conv_names[:12]) + (", ..." if len(conv_names) > 12 else "")
            raise ValueError(
                f"Backbone {backbone.name!r} has no layer named {name!r}.{where} "
                f"Its conv layers are: {shown}. Received: layers={names!r}"
            )
        if not isinstance(layer, CONV_TYPES):
            raise ValueError(
                f"Layer {name!r} is a {type(layer).__name__}, not a Conv2D or "
                f"DepthwiseConv2D layer. Received: layers={names!r}"
            )
        found.append(layer)
    return found


def _consumers(backbone, tensor):
    """Top-level layers whose (single) call takes `tensor` as an input."""
    consumers, unreadable = [], []
    for layer in backbone.layers:
        if isinstance(layer, keras.layers.InputLayer):
            continue
        try:
            inputs = keras.tree.flatten(layer.input)
        except (AttributeError, ValueError):
            # A layer called more than once has no single `input`; it is
            # reported if the activation cannot be found.
            unreadable.append(layer.name)
            continue
        if any(t is tensor for t in inputs):
            consumers.append(layer)
    return consumers, unreadable


def _post_activation_output(backbone, conv):
    """The tensor after the activation that follows `conv` (see ConvBank)."""
    if has_fused_activation(conv):
        return conv.output
    tensor, path = conv.output, [conv.name]
    for _ in range(2):
        consumers, unreadable = _consumers(backbone, tensor)
        if len(consumers) == 1 and isinstance(consumers[0], ACTIVATION_LAYER_TYPES):
            return consumers[0].output
        if (
            len(consumers) == 1
            and isinstance(consumers[0], keras.layers.BatchNormalization)
            and len(path) == 1
        ):
            path.append(consumers[0].name)
            tensor = consumers[0].output
            continue
        break
    found = ", ".join(f"{c.name} ({type(c).__name__})" for c in consumers) or "no layer"
    extra = f" Layers called more than once were not followed: {unreadable}." if unreadable else ""
    raise ValueError(
        f"Conv layer {conv.name!r} has no fused activation, and the output of "
        f"{' -> '.join(path)} feeds {found} rather than exactly one activation "
        "layer (ReLU, Activation, LeakyReLU, PReLU, ELU), optionally after one "
        f"BatchNormalization.{extra} Use `pre_activation=True` or tap another "
        f"layer. Received: pre_activation=False"
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
      linear bottleneck) raises a ValueError.

    Only the backbone's top-level layers are searched: conv layers inside a
    nested model cannot be tapped (build such backbones flat). Layers
    `Conv2D` (and subclasses) and `DepthwiseConv2D` count as conv layers.

    Args:
        backbone: a functional `keras.Model` with one input taking raw
            pixels in [0, 255].
        layers: an int N (the first N conv layers in the graph's
            topological order, as `backbone.layers`) or a list of conv layer
            names, in the order the groups should have.
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
            number of conv layers, a missing or non-conv layer name, or an
            activation that cannot be found with `pre_activation=False`.

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
        taps = []
        for conv in convs:
            if not pre_activation:
                tap = _post_activation_output(backbone, conv)
            elif has_fused_activation(conv):
                tap = _LinearConvOutput(
                    conv, dtype=conv.dtype_policy, name=f"{conv.name}_linear_tap"
                )(conv.input)
            else:
                tap = conv.output
            if conv.data_format == "channels_first":
                tap = keras.layers.Permute((2, 3, 1), name=f"{conv.name}_nhwc_tap")(tap)
            taps.append(tap)
        self.backbone = backbone
        self.layers = [conv.name for conv in convs]
        self.pre_activation = pre_activation
        self._groups = [(conv.name, int(tap.shape[-1])) for conv, tap in zip(convs, taps)]
        self._model = keras.Model(backbone.inputs[0], taps, name=f"{backbone.name}_conv_bank")

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
