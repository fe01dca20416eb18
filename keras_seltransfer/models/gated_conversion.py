"""How AdaFilter converts one convolution: its GatedConv, and the first gate's probe.

`adafilter` (`keras_seltransfer.models.gating`) replaces each supported
convolution, with the BatchNormalization that directly follows it when it can
be absorbed, by a `GatedConv` built from `gated_conv_config`; with
`first_gate_input="features"`, the first gate reads `pretrained_probe`, a
frozen copy of the first gated convolution.
"""

import keras
import numpy as np



# Layer types `adafilter` gates (exact types: a subclass may compute
# something else with the same weights).
SUPPORTED_LAYERS = (
    keras.layers.Conv2D,
    keras.layers.DepthwiseConv2D,
    keras.layers.SeparableConv2D,
)


# Every Keras convolution type, to tell the unsupported ones apart.
CONVOLUTIONS = tuple(
    getattr(keras.layers, name)
    for name in (
        "Conv1D",
        "Conv2D",
        "Conv3D",
        "Conv1DTranspose",
        "Conv2DTranspose",
        "Conv3DTranspose",
        "DepthwiseConv1D",
        "DepthwiseConv2D",
        "SeparableConv1D",
        "SeparableConv2D",
    )
)


def is_supported(layer):
    """Whether `adafilter` gates `layer`: exactly one of `SUPPORTED_LAYERS`.

    Example:

    >>> import keras
    >>> from keras_seltransfer.models.gated_conversion import is_supported
    >>> is_supported(keras.layers.Conv2D(4, 3)), is_supported(keras.layers.Dense(4))
    (True, False)
    """
    return type(layer) in SUPPORTED_LAYERS


def absorbable_batchnorm(conv, bn):
    """Whether `bn` can become the gated batch norm of a GatedConv for `conv`.

    Example:

    >>> from keras_seltransfer import models
    >>> from keras_seltransfer.models.gated_conversion import absorbable_batchnorm
    >>> backbone = models.small_cnn((16, 16, 1), widths=(4, 8))
    >>> conv = backbone.get_layer("block1_conv")
    >>> absorbable_batchnorm(conv, backbone.get_layer("block1_bn"))
    True
    >>> absorbable_batchnorm(conv, backbone.get_layer("block1_relu"))
    False
    """
    if not isinstance(bn, keras.layers.BatchNormalization):
        return False
    config = bn.get_config()
    axis = config["axis"]
    axis = axis if isinstance(axis, (list, tuple)) else [axis]
    return (
        list(axis) in ([-1], [3])
        and not config.get("renorm", False)
        and not config.get("synchronized", False)
        and all(
            config.get(key) is None
            for key in (
                "gamma_regularizer",
                "beta_regularizer",
                "gamma_constraint",
                "beta_constraint",
            )
        )
        # The batch norm must come before the activation it would follow.
        and conv.get_config()["activation"] == "linear"
    )


def gated_conv_config(conv, batchnorm=None, train_batchnorm=None):
    """The `GatedConv` config that replaces `conv` (and `batchnorm`, the
    BatchNormalization directly after it, if any).

    Args:
        conv: a `keras.layers.Conv2D`, `keras.layers.DepthwiseConv2D` or
            `keras.layers.SeparableConv2D` (then the config is a
            `GatedSeparableConv`'s).
        batchnorm: the `keras.layers.BatchNormalization` to absorb, or None.
        train_batchnorm: whether the fine-tuned path's batch norm trains;
            None follows `batchnorm.trainable`.

    Returns:
        A dict for `GatedConv.from_config` (named like `conv`).

    Example:

    >>> from keras_seltransfer import models
    >>> from keras_seltransfer.layers import GatedConv
    >>> from keras_seltransfer.models.gated_conversion import gated_conv_config
    >>> backbone = models.small_cnn((16, 16, 1), widths=(4, 8))
    >>> conv, bn = backbone.get_layer("block1_conv"), backbone.get_layer("block1_bn")
    >>> config = gated_conv_config(conv, bn)
    >>> GatedConv.from_config(config).name
    'block1_conv'
    """
    if not is_supported(conv):
        raise ValueError(
            "`conv` must be a Conv2D, DepthwiseConv2D or SeparableConv2D. "
            f"Received: conv of type {type(conv).__name__}"
        )
    c = conv.get_config()
    depthwise = isinstance(conv, keras.layers.DepthwiseConv2D)
    separable = isinstance(conv, keras.layers.SeparableConv2D)
    # The (depthwise) kernel's settings; a separable conv's pointwise kernel
    # has its own.
    kernel = "depthwise" if depthwise or separable else "kernel"
    config = {
        "name": c["name"],
        "trainable": c.get("trainable", True),
        "dtype": c.get("dtype"),
        "filters": int(conv.output.shape[-1]),
        "kernel_size": tuple(c["kernel_size"]),
        "strides": tuple(c["strides"]),
        "padding": c["padding"],
        "dilation_rate": tuple(c["dilation_rate"]),
        "groups": 1 if depthwise else int(c.get("groups", 1)),
        "depthwise": depthwise,
        "activation": c["activation"],
        "use_bias": c["use_bias"],
        "kernel_initializer": c[f"{kernel}_initializer"],
        "bias_initializer": c["bias_initializer"],
        "kernel_regularizer": c[f"{kernel}_regularizer"],
        "bias_regularizer": c["bias_regularizer"],
        "kernel_constraint": c[f"{kernel}_constraint"],
        "bias_constraint": c["bias_constraint"],
        "activity_regularizer": c.get("activity_regularizer"),
    }
    if separable:
        del config["groups"], config["depthwise"]
        config.update(
            depth_multiplier=int(c["depth_multiplier"]),
            pointwise_initializer=c["pointwise_initializer"],
            pointwise_regularizer=c["pointwise_regularizer"],
            pointwise_constraint=c["pointwise_constraint"],
        )
    if batchnorm is not None:
        b = batchnorm.get_config()
        config.update(
            batchnorm=True,
            train_batchnorm=(
                bool(batchnorm.trainable) if train_batchnorm is None else bool(train_batchnorm)
            ),
            momentum=b["momentum"],
            epsilon=b["epsilon"],
            center=b["center"],
            scale=b["scale"],
        )
    return config


def pretrained_probe(conv, bn, inputs, name):
    """A frozen copy of `conv` with `bn` folded in, and ReLU, applied to
    `inputs`: the features the first gate reads (see `adafilter`'s
    `first_gate_input`).

    Folding the batch norm (inference form) into the kernel and bias keeps
    the probe one frozen layer that no BatchNorm mode can switch to batch
    statistics.

    Args:
        conv: the pretrained `Conv2D`, `DepthwiseConv2D` or `SeparableConv2D`.
        bn: the `BatchNormalization` that follows it, or None.
        inputs: the symbolic tensor `conv` reads.
        name: the probe layer's name.

    Returns:
        The probe's symbolic output.

    Example:

    >>> import keras
    >>> from keras_seltransfer.models.gated_conversion import pretrained_probe
    >>> inputs = keras.Input((8, 8, 3))
    >>> conv, bn = keras.layers.Conv2D(4, 3), keras.layers.BatchNormalization()
    >>> features = bn(conv(inputs))
    >>> pretrained_probe(conv, bn, inputs, "block1_probe").shape
    (None, 6, 6, 4)
    """
    config = conv.get_config()
    depthwise = isinstance(conv, keras.layers.DepthwiseConv2D)
    separable = isinstance(conv, keras.layers.SeparableConv2D)
    weights = conv.get_weights()
    # The batch norm scales output channels: the last axis of a regular or
    # pointwise kernel.
    kernel = np.asarray(weights[1 if separable else 0], dtype="float64")
    filters = int(conv.output.shape[-1])
    bias = (
        np.asarray(conv.bias.numpy(), dtype="float64") if conv.use_bias else np.zeros(filters)
    )
    if bn is not None:
        gamma = bn.gamma.numpy() if bn.scale else np.ones(filters)
        beta = bn.beta.numpy() if bn.center else np.zeros(filters)
        scale = np.asarray(gamma, "float64") / np.sqrt(
            np.asarray(bn.moving_variance.numpy(), "float64") + bn.epsilon
        )
        # A depthwise kernel [h, w, channels, multiplier] writes output
        # channel `c * multiplier + m` from entry [..., c, m].
        kernel = kernel * (scale.reshape(kernel.shape[-2:]) if depthwise else scale)
        bias = (bias - np.asarray(bn.moving_mean.numpy(), "float64")) * scale + beta
    config.update(name=name, trainable=False, use_bias=True)
    # Frozen: no penalties or constraints of the original's weights.
    for key in list(config):
        if key.endswith(("_regularizer", "_constraint")):
            config[key] = None
    probe = type(conv).from_config(config)
    x = probe(inputs)
    dtype = probe.bias.dtype
    probe.set_weights(
        ([weights[0].astype(dtype)] if separable else [])
        + [kernel.astype(dtype), bias.astype(dtype)]
    )
    if _has_no_activation(conv):
        x = keras.layers.ReLU(name=f"{name}_relu")(x)
    return x


def _has_no_activation(conv):
    return conv.get_config()["activation"] in ("linear", None)


__all__ = [
    "CONVOLUTIONS",
    "SUPPORTED_LAYERS",
    "absorbable_batchnorm",
    "gated_conv_config",
    "is_supported",
    "pretrained_probe",
]
