"""Low-level filter banks whose response histograms describe an image.

Selective joint fine-tuning (Ge & Yu, CVPR 2017) retrieves source images
whose low-level statistics resemble the target images'. The statistics are
histograms of the responses of a bank of filters: either a fixed Gabor bank
or the first convolutional layers of the pretrained network. This module
holds the banks; `descriptors` turns their responses into histograms.

A bank is any object with:

- `__call__(images)`: float32 `[batch, height, width, channels]` raw pixels
  in [0, 255] (tensor or array) to a list of float32 response tensors, one
  per group, each `[batch, height', width', channels_g]`, computed with
  TensorFlow ops (so it runs inside `tf.function`, on any device and under a
  distribution strategy);
- `groups`: list of `(name, num_channels)`, in output order;
- `num_channels`: the total number of channels over all groups;
- `get_config()`: a JSON-serialisable dict with a `"type"` key, which
  `bank_from_config` turns back into the bank.
"""

import math
import warnings

import keras
import numpy as np
import tensorflow as tf

from keras_seltransfer.models.classifier import iter_layers

# [inferred] The paper uses 4 scales x 6 orientations but publishes no
# frequencies. These are one octave apart, from 20 to 2.5 pixels per cycle
# (0.5, the Nyquist frequency, would be 2).
DEFAULT_FREQUENCIES = (0.05, 0.1, 0.2, 0.4)

# Largest kernel size chosen automatically. A 3-sigma window at f = 0.05 is
# 69 px wide, larger than the small images this toolkit targets.
MAX_AUTO_KERNEL_SIZE = 31

PADDINGS = ("symmetric", "valid")

# ITU-R 601-2 luma, as the data pipeline's RGB -> grey conversion.
_LUMA = (0.299, 0.587, 0.114)

_CONV_TYPES = (keras.layers.Conv2D, keras.layers.DepthwiseConv2D)
_ACTIVATION_LAYER_TYPES = (
    keras.layers.ReLU,
    keras.layers.Activation,
    keras.layers.LeakyReLU,
    keras.layers.PReLU,
    keras.layers.ELU,
)


def _gabor_sigma(frequency, bandwidth):
    # scikit-image's `gabor_kernel` convention: the Gaussian's standard
    # deviation for a half-magnitude bandwidth of `bandwidth` octaves.
    prefactor = (
        (1.0 / math.pi)
        * math.sqrt(math.log(2.0) / 2.0)
        * (2.0**bandwidth + 1.0)
        / (2.0**bandwidth - 1.0)
    )
    return prefactor / frequency


def _check_gabor_args(frequencies, num_orientations, kernel_size, bandwidth):
    try:
        freqs = tuple(float(f) for f in frequencies)
    except (TypeError, ValueError) as e:
        raise ValueError(
            "Expected `frequencies` to be a sequence of numbers. "
            f"Received: frequencies={frequencies!r}"
        ) from e
    if not freqs or not all(0.0 < f <= 0.5 for f in freqs):
        raise ValueError(
            "Expected `frequencies` to be a non-empty sequence of frequencies in "
            "(0, 0.5] cycles per pixel (0.5 is the Nyquist frequency). "
            f"Received: frequencies={frequencies!r}"
        )
    if (
        isinstance(num_orientations, bool)
        or not isinstance(num_orientations, (int, np.integer))
        or num_orientations < 1
    ):
        raise ValueError(
            "Expected `num_orientations` to be a positive int. "
            f"Received: num_orientations={num_orientations!r}"
        )
    if kernel_size is not None and (
        isinstance(kernel_size, bool)
        or not isinstance(kernel_size, (int, np.integer))
        or kernel_size < 1
        or kernel_size % 2 == 0
    ):
        raise ValueError(
            "Expected `kernel_size` to be None or a positive odd int. "
            f"Received: kernel_size={kernel_size!r}"
        )
    if isinstance(bandwidth, bool) or not (
        isinstance(bandwidth, (int, float, np.number))
        and math.isfinite(bandwidth)
        and bandwidth > 0
    ):
        raise ValueError(
            "Expected `bandwidth` to be a positive number (octaves). "
            f"Received: bandwidth={bandwidth!r}"
        )
    if kernel_size is not None:
        kernel_size = int(kernel_size)
    return freqs, int(num_orientations), kernel_size, float(bandwidth)


def gabor_kernels(
    frequencies=DEFAULT_FREQUENCIES, num_orientations=6, kernel_size=None, bandwidth=1.0
):
    """Real and imaginary parts of a bank of complex Gabor filters.

    Each filter is

        g(x, y) = 1 / (2 pi sigma^2) * exp(-(x'^2 + y'^2) / (2 sigma^2))
                  * exp(i 2 pi f x'),
        x' = x cos(theta) + y sin(theta),
        y' = -x sin(theta) + y cos(theta),

    with sigma = (1/pi) sqrt(ln 2 / 2) (2^b + 1) / (2^b - 1) / f for a
    bandwidth of b octaves, as scikit-image's `gabor_kernel`. Coordinates
    are pixel offsets from the kernel centre with x along the columns
    (rightwards) and y along the rows (downwards): `kernel[r, c]` holds
    g(c - h, r - h) for half size h. So theta = 0 oscillates along x and
    responds to vertical stripes, and theta turns from +x towards +y
    (clockwise on screen).

    Each filter is non-zero on its own centred square of half size
    ceil(3 sigma) (as scikit-image) and zero-padded to the common size, or
    cut by it when the common size is smaller.

    Defaults [inferred; the paper publishes neither]: frequencies 0.05,
    0.1, 0.2 and 0.4 cycles per pixel (20 to 2.5 pixels per cycle, one
    octave apart), theta = j pi / 6 for j = 0..5, bandwidth 1 octave: the
    paper's 4 scales x 6 orientations x (real, imaginary) = 48 filters.

    Kernel size: with `kernel_size=None` the common size is the smallest odd
    size holding every filter's 3-sigma square, capped at
    `MAX_AUTO_KERNEL_SIZE` (31) so that the filters fit the small images
    this toolkit targets. With the defaults the 3-sigma size of f = 0.05
    is 69 and of f = 0.1 is 35, so the cap cuts the f = 0.05 envelope at
    +-1.33 sigma (the Gaussian keeps 69% of its mass) and the f = 0.1
    envelope at +-2.67 sigma (99%). Pass `kernel_size=69` for untruncated
    filters on large images.

    DC: the mean is not subtracted, so the filters are the closed form
    above exactly. An untruncated real part sums to about 0.001 to 0.002
    (it nearly ignores flat brightness); the capped f = 0.05 real parts sum
    to about -0.07, so those channels also respond weakly to brightness.
    Imaginary parts are odd and sum to zero.

    Args:
        frequencies: spatial frequencies in cycles per pixel, in (0, 0.5].
        num_orientations: number of orientations, theta = j pi / n.
        kernel_size: odd size of the square kernels, or None for automatic.
        bandwidth: half-magnitude frequency bandwidth in octaves.

    Returns:
        np.float32 array `[k, k, 1, 2 * len(frequencies) * num_orientations]`:
        for each frequency, for each orientation, the real part then the
        imaginary part. As `tf.nn.conv2d` computes a cross-correlation,
        convolving with it correlates the image with g.

    Raises:
        ValueError: for out-of-range arguments.
    """
    freqs, num_orientations, kernel_size, bandwidth = _check_gabor_args(
        frequencies, num_orientations, kernel_size, bandwidth
    )
    sigmas = [_gabor_sigma(f, bandwidth) for f in freqs]
    half_sizes = [int(math.ceil(3.0 * s)) for s in sigmas]
    if kernel_size is None:
        kernel_size = min(2 * max(half_sizes) + 1, MAX_AUTO_KERNEL_SIZE)
    h = kernel_size // 2
    y, x = np.mgrid[-h : h + 1, -h : h + 1].astype(np.float64)
    filters = []
    for f, sigma, support in zip(freqs, sigmas, half_sizes):
        inside = (np.abs(x) <= support) & (np.abs(y) <= support)
        for j in range(num_orientations):
            theta = j * math.pi / num_orientations
            xr = x * math.cos(theta) + y * math.sin(theta)
            yr = -x * math.sin(theta) + y * math.cos(theta)
            g = (
                np.exp(-(xr**2 + yr**2) / (2.0 * sigma**2))
                / (2.0 * math.pi * sigma**2)
                * np.exp(2j * math.pi * f * xr)
            )
            g = np.where(inside, g, 0.0)
            filters.extend([g.real, g.imag])
    return np.stack(filters, axis=-1)[:, :, None, :].astype(np.float32)


def _to_image_tensor(images):
    images = tf.convert_to_tensor(images)
    if images.shape.rank != 4:
        raise ValueError(
            "Expected `images` of shape [batch, height, width, channels]. "
            f"Received: images.shape={images.shape}"
        )
    return tf.cast(images, tf.float32)


class GaborBank:
    """A Gabor filter bank on grayscale images, as the paper's Gabor variant.

    Images are converted to grayscale in [0, 1] (ITU-R 601-2 luma of RGB
    pixels divided by 255; one-channel images are divided by 255) and
    correlated with `gabor_kernels(...)` as one group named `"gabor"`.

    Padding: `"symmetric"` (default) mirrors the image about its border
    (edge pixel repeated, NumPy's and TensorFlow's `SYMMETRIC`) before a
    valid convolution, so responses have the image's size. Zero padding
    would put a step edge around every image, and with a 31 px kernel on a
    64 px image 72% of the positions lie within reach of the border, so
    those artificial edges would dominate the histograms; a valid
    convolution would keep only the central 34x34 positions and fail on
    images smaller than the kernel. `"valid"` is offered for large images.

    Args:
        frequencies: spatial frequencies in cycles per pixel, in (0, 0.5].
        num_orientations: number of orientations, theta = j pi / n.
        kernel_size: odd kernel size, or None (see `gabor_kernels`).
        bandwidth: frequency bandwidth in octaves.
        padding: `"symmetric"` or `"valid"`.

    Call arguments:
        images: float `[batch, height, width, 1 or 3]` raw pixels in [0, 255].

    Returns:
        A one-element list: float32 `[batch, height', width', 2 * F * O]`.

    Example:

    ```python
    bank = GaborBank()
    (responses,) = bank(images)  # [batch, height, width, 48]
    ```

    Reference:
        Ge & Yu, "Borrowing Treasures from the Wealthy: Deep Transfer
        Learning through Selective Joint Fine-Tuning", CVPR 2017.
    """

    def __init__(
        self,
        frequencies=DEFAULT_FREQUENCIES,
        num_orientations=6,
        kernel_size=None,
        bandwidth=1.0,
        padding="symmetric",
    ):
        freqs, num_orientations, kernel_size, bandwidth = _check_gabor_args(
            frequencies, num_orientations, kernel_size, bandwidth
        )
        if padding not in PADDINGS:
            raise ValueError(
                f"Expected `padding` to be one of {PADDINGS}. Received: padding={padding!r}"
            )
        self.frequencies = freqs
        self.num_orientations = num_orientations
        self.kernel_size = kernel_size
        self.bandwidth = bandwidth
        self.padding = padding
        self.kernels = gabor_kernels(freqs, num_orientations, kernel_size, bandwidth)

    @property
    def groups(self):
        return [("gabor", int(self.kernels.shape[-1]))]

    @property
    def num_channels(self):
        return int(self.kernels.shape[-1])

    def grayscale(self, images):
        """Grayscale in [0, 1] `[batch, height, width, 1]` of raw images."""
        images = _to_image_tensor(images)
        channels = images.shape[-1]
        if channels == 3:
            luma = tf.constant(_LUMA, tf.float32)
            grey = tf.reduce_sum(images * luma, axis=-1, keepdims=True)
        elif channels == 1:
            grey = images
        else:
            raise ValueError(
                "GaborBank expects images with 1 or 3 channels. "
                f"Received: images.shape={images.shape}"
            )
        return grey / 255.0

    def __call__(self, images):
        grey = self.grayscale(images)
        size = self.kernels.shape[0]
        half = size // 2
        height, width = grey.shape[1], grey.shape[2]
        if self.padding == "symmetric":
            # SYMMETRIC padding cannot reach further than the image itself.
            if (height is not None and height < half) or (width is not None and width < half):
                raise ValueError(
                    f"Images must be at least {half} px high and wide for "
                    f"symmetric padding with {size}x{size} kernels. "
                    f"Received: images.shape={images.shape}"
                )
            grey = tf.pad(grey, [[0, 0], [half, half], [half, half], [0, 0]], mode="SYMMETRIC")
        elif (height is not None and height < size) or (width is not None and width < size):
            raise ValueError(
                f"Images must be at least {size} px high and wide for valid "
                f"padding with {size}x{size} kernels. Received: images.shape={images.shape}"
            )
        kernels = tf.constant(self.kernels)
        return [tf.nn.conv2d(grey, kernels, strides=1, padding="VALID")]

    def get_config(self):
        return {
            "type": "gabor",
            "frequencies": list(self.frequencies),
            "num_orientations": self.num_orientations,
            "kernel_size": self.kernel_size,
            "bandwidth": self.bandwidth,
            "padding": self.padding,
        }

    def __repr__(self):
        return (
            f"GaborBank(frequencies={list(self.frequencies)}, num_orientations="
            f"{self.num_orientations}, kernel_size={self.kernels.shape[0]}, "
            f"bandwidth={self.bandwidth}, padding={self.padding!r})"
        )


def _has_fused_activation(layer):
    return layer.activation is not None and layer.activation is not keras.activations.linear


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
        if isinstance(layer, _CONV_TYPES):
            found.append(layer)
        elif isinstance(layer, keras.Model) and any(
            isinstance(inner, _CONV_TYPES) for inner in iter_layers(layer)
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
    conv_names = [layer.name for layer in backbone.layers if isinstance(layer, _CONV_TYPES)]
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
        if not isinstance(layer, _CONV_TYPES):
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
    if _has_fused_activation(conv):
        return conv.output
    tensor, path = conv.output, [conv.name]
    for _ in range(2):
        consumers, unreadable = _consumers(backbone, tensor)
        if len(consumers) == 1 and isinstance(consumers[0], _ACTIVATION_LAYER_TYPES):
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
            elif _has_fused_activation(conv):
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
        images = _to_image_tensor(images)
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


def bank_from_config(config, backbone=None):
    """Rebuilds a bank from its `get_config()`.

    Args:
        config: a dict from `GaborBank.get_config()` or
            `ConvBank.get_config()`.
        backbone: the backbone a conv bank taps (required for
            `"type": "conv"`; ignored for Gabor banks). A warning is issued
            when its name differs from the one the bank was built on.

    Returns:
        A `GaborBank` or `ConvBank`.

    Raises:
        ValueError: for an unknown type, or a conv bank without a backbone.
    """
    if not isinstance(config, dict) or config.get("type") not in ("gabor", "conv"):
        raise ValueError(
            "Expected `config` to be a bank config dict with 'type' 'gabor' or "
            f"'conv'. Received: config={config!r}"
        )
    config = dict(config)
    kind = config.pop("type")
    if kind == "gabor":
        return GaborBank(**config)
    if backbone is None:
        raise ValueError(
            "A conv bank taps a backbone: pass the backbone it was built on. "
            "Received: backbone=None"
        )
    name = config.pop("backbone", None)
    if name is not None and name != backbone.name:
        warnings.warn(
            f"The conv bank was built on backbone {name!r} but is rebuilt on "
            f"{backbone.name!r}; descriptors are only comparable when the "
            "weights are the same.",
            stacklevel=2,
        )
    return ConvBank(backbone, **config)
