"""GatedConv: a convolution with a frozen pretrained path and a fine-tuned
path, mixed per example and per filter by binary gates (AdaFilter)."""

import keras
from keras import ops

from keras_seltransfer.utils.validation import check_choice
from keras_seltransfer.utils.validation import check_pair
from keras_seltransfer.utils.validation import is_int

PADDINGS = ("valid", "same")


def conv_output_length(length, kernel, stride, dilation, padding):
    """Output length of a convolution along one axis (None stays None)."""
    if length is None:
        return None
    if padding == "same":
        return -(-length // stride)
    return max(0, (length - dilation * (kernel - 1) - 1) // stride + 1)


@keras.saving.register_keras_serializable(package="keras_seltransfer")
class GatedConv(keras.layers.Layer):
    """Per-example, per-filter choice between a pretrained and a fine-tuned filter.

    The layer holds two copies of a 2-D convolution: the pretrained kernel,
    frozen (non-trainable), and a trainable fine-tuned kernel initialised
    from it. With gates `g` in {0, 1} for every example and output filter,

    `outputs = g * act(BN_ft(conv_ft(x))) + (1 - g) * act(BN_pre(conv_pre(x)))`

    where each path has its own batch normalisation ("gated batch norm",
    `batchnorm=True`; omitted for backbones without one) and `act` is the
    activation of the convolution it replaces. The pretrained path's batch
    norm always uses its stored statistics and affine parameters; the
    fine-tuned path's trains like a Keras `BatchNormalization` layer when
    `train_batchnorm` (batch statistics in training, moving averages
    updated) and is frozen like one otherwise. Since both paths start equal,
    the output at initialisation does not depend on the gates.

    The gradient reaching a gate `g` is `sum(dL/dy * (ft - pre))`: zero while
    the two paths compute the same thing. With `train_batchnorm` the
    fine-tuned path normalises with batch statistics in training while the
    pretrained path uses its stored ones, so the paths, and the gates'
    gradient, differ from the first step [paper: separate batch norms for
    the two paths, "gated batch normalization"]; with a frozen fine-tuned
    batch norm they differ only once the fine-tuned kernel has moved.

    The convolution can be a regular or grouped `Conv2D` (`groups`) or a
    `DepthwiseConv2D` (`depthwise=True`, with `filters` the number of output
    channels, `input channels * depth_multiplier`, and the depthwise kernel
    layout `[height, width, channels, depth_multiplier]`). Input is channels
    last.

    The two paths are two convolutions. One convolution with both kernels
    side by side along the output axis would also compute the gradient of
    the frozen kernel, which makes a training step slower than the second
    pass over the input does.

    Args:
        filters: number of output filters (gates per example).
        kernel_size: int or pair, the kernel's height and width.
        strides: int or pair.
        padding: `"valid"` or `"same"`.
        dilation_rate: int or pair.
        groups: number of groups of a grouped convolution (divides the
            input channels and `filters`); 1 for a regular one.
        depthwise: whether this is a depthwise convolution.
        activation: activation applied to each path before the paths mix.
        use_bias: whether each path adds a bias.
        batchnorm: whether each path has its own batch normalisation (after
            the bias, before the activation).
        train_batchnorm: whether the fine-tuned path's batch norm trains.
        momentum: batch-norm moving-average momentum.
        epsilon: batch-norm variance epsilon.
        center: whether the batch norms have an offset (`beta`).
        scale: whether the batch norms have a scale (`gamma`).
        kernel_initializer: initializer of the pretrained kernel (the
            fine-tuned kernel starts as a copy of it).
        bias_initializer: initializer of the biases (copied likewise).
        kernel_regularizer: regularizer of the fine-tuned kernel.
        bias_regularizer: regularizer of the fine-tuned bias.
        kernel_constraint: constraint of the fine-tuned kernel.
        bias_constraint: constraint of the fine-tuned bias.
        **kwargs: base `Layer` arguments.

    Call arguments:
        inputs: `[batch, height, width, channels]`.
        gates: `[batch, filters]`; 1 selects the fine-tuned filter, 0 the
            pretrained one (other values mix the two linearly, which the
            straight-through gradient of the gates relies on).
        training: whether the fine-tuned batch norm uses batch statistics.

    Returns:
        `[batch, out_height, out_width, filters]`.

    Example:

    ```python
    layer = GatedConv(16, 3, padding="same", batchnorm=True)
    y = layer(images, gates)  # gates: [batch, 16]
    layer.load_pretrained(conv.kernel, gamma=bn.gamma, beta=bn.beta,
                          moving_mean=bn.moving_mean,
                          moving_variance=bn.moving_variance)
    ```

    Reference:
    - [Guo, Li, Wang, Rosing, "AdaFilter: Adaptive Filter Fine-tuning for
      Deep Transfer Learning", AAAI 2020](https://arxiv.org/abs/1911.09659)
    """

    def __init__(
        self,
        filters,
        kernel_size,
        strides=1,
        padding="valid",
        dilation_rate=1,
        groups=1,
        depthwise=False,
        activation=None,
        use_bias=True,
        batchnorm=False,
        train_batchnorm=True,
        momentum=0.99,
        epsilon=1e-3,
        center=True,
        scale=True,
        kernel_initializer="glorot_uniform",
        bias_initializer="zeros",
        kernel_regularizer=None,
        bias_regularizer=None,
        kernel_constraint=None,
        bias_constraint=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if not is_int(filters) or filters < 1:
            raise ValueError(f"`filters` must be a positive int. Received: filters={filters!r}")
        if not is_int(groups) or groups < 1:
            raise ValueError(f"`groups` must be a positive int. Received: groups={groups!r}")
        if filters % groups:
            raise ValueError(
                f"`filters` must be divisible by `groups`. Received: filters={filters}, "
                f"groups={groups}"
            )
        if depthwise and groups != 1:
            raise ValueError(
                f"A depthwise GatedConv takes no `groups`. Received: groups={groups}"
            )
        padding = str(padding).lower()
        check_choice(padding, "padding", PADDINGS)
        if not 0.0 <= float(momentum) <= 1.0:
            raise ValueError(f"`momentum` must be in [0, 1]. Received: momentum={momentum!r}")
        if not float(epsilon) > 0:
            raise ValueError(f"`epsilon` must be > 0. Received: epsilon={epsilon!r}")
        self.filters = int(filters)
        self.kernel_size = check_pair(kernel_size, "kernel_size")
        self.strides = check_pair(strides, "strides")
        self.padding = padding
        self.dilation_rate = check_pair(dilation_rate, "dilation_rate")
        if max(self.strides) > 1 and max(self.dilation_rate) > 1:
            raise ValueError(
                "`strides` > 1 and `dilation_rate` > 1 cannot be combined. Received: "
                f"strides={self.strides}, dilation_rate={self.dilation_rate}"
            )
        self.groups = int(groups)
        self.depthwise = bool(depthwise)
        self.activation = keras.activations.get(activation)
        self.use_bias = bool(use_bias)
        self.batchnorm = bool(batchnorm)
        self.train_batchnorm = bool(train_batchnorm)
        self.momentum = float(momentum)
        self.epsilon = float(epsilon)
        self.center = bool(center)
        self.scale = bool(scale)
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.bias_initializer = keras.initializers.get(bias_initializer)
        self.kernel_regularizer = keras.regularizers.get(kernel_regularizer)
        self.bias_regularizer = keras.regularizers.get(bias_regularizer)
        self.kernel_constraint = keras.constraints.get(kernel_constraint)
        self.bias_constraint = keras.constraints.get(bias_constraint)

    def _kernel_shape(self, channels):
        if self.depthwise:
            return self.kernel_size + (channels, self.filters // channels)
        return self.kernel_size + (channels // self.groups, self.filters)

    def build(self, inputs_shape, gates_shape):
        if len(inputs_shape) != 4:
            raise ValueError(
                "GatedConv expects inputs [batch, height, width, channels]. "
                f"Received: inputs_shape={inputs_shape}"
            )
        channels = inputs_shape[-1]
        if channels is None:
            raise ValueError("The channel dimension of the inputs of GatedConv must be defined.")
        if self.depthwise and self.filters % channels:
            raise ValueError(
                f"A depthwise GatedConv needs `filters` to be a multiple of the {channels} input "
                f"channels. Received: filters={self.filters}"
            )
        if not self.depthwise and channels % self.groups:
            raise ValueError(
                f"The {channels} input channels must be divisible by `groups`. "
                f"Received: groups={self.groups}"
            )
        if len(gates_shape) != 2 or gates_shape[-1] != self.filters:
            raise ValueError(
                f"GatedConv {self.name!r} expects gates [batch, {self.filters}]. "
                f"Received: gates_shape={gates_shape}"
            )
        self.pretrained_kernel = self.add_weight(
            shape=self._kernel_shape(channels),
            initializer=self.kernel_initializer,
            trainable=False,
            name="pretrained_kernel",
        )
        self.kernel = self.add_weight(
            shape=self._kernel_shape(channels),
            initializer=self._copy_of(self.pretrained_kernel),
            regularizer=self.kernel_regularizer,
            constraint=self.kernel_constraint,
            name="kernel",
        )
        self.pretrained_bias = self.bias = None
        if self.use_bias:
            self.pretrained_bias = self.add_weight(
                shape=(self.filters,),
                initializer=self.bias_initializer,
                trainable=False,
                name="pretrained_bias",
            )
            self.bias = self.add_weight(
                shape=(self.filters,),
                initializer=self._copy_of(self.pretrained_bias),
                regularizer=self.bias_regularizer,
                constraint=self.bias_constraint,
                name="bias",
            )
        self.pretrained_gamma = self.pretrained_beta = self.gamma = self.beta = None
        if self.batchnorm:
            shape = (self.filters,)
            stats = dict(shape=shape, trainable=False, autocast=False)
            if self.scale:
                self.pretrained_gamma = self.add_weight(
                    initializer="ones", name="pretrained_gamma", **stats
                )
            if self.center:
                self.pretrained_beta = self.add_weight(
                    initializer="zeros", name="pretrained_beta", **stats
                )
            self.pretrained_moving_mean = self.add_weight(
                initializer="zeros", name="pretrained_moving_mean", **stats
            )
            self.pretrained_moving_variance = self.add_weight(
                initializer="ones", name="pretrained_moving_variance", **stats
            )
            affine = dict(shape=shape, trainable=self.train_batchnorm, autocast=False)
            if self.scale:
                self.gamma = self.add_weight(initializer="ones", name="gamma", **affine)
            if self.center:
                self.beta = self.add_weight(initializer="zeros", name="beta", **affine)
            self.moving_mean = self.add_weight(initializer="zeros", name="moving_mean", **stats)
            self.moving_variance = self.add_weight(
                initializer="ones", name="moving_variance", **stats
            )

    @staticmethod
    def _copy_of(variable):
        def initializer(shape, dtype=None):
            return ops.cast(ops.convert_to_tensor(variable), dtype or variable.dtype)

        return initializer

    def _convolve(self, inputs, pretrained):
        """One path's convolution (the pretrained or the fine-tuned one)."""
        conv = ops.depthwise_conv if self.depthwise else ops.conv
        return conv(
            inputs,
            self.pretrained_kernel if pretrained else self.kernel,
            strides=self.strides,
            padding=self.padding,
            data_format="channels_last",
            dilation_rate=self.dilation_rate,
        )

    def _normalize(self, x, mean, variance, gamma, beta):
        dtype = x.dtype
        x = ops.cast(x, "float32")
        x = ops.batch_normalization(
            x, mean, variance, axis=-1, offset=beta, scale=gamma, epsilon=self.epsilon
        )
        return ops.cast(x, dtype)

    def call(self, inputs, gates, training=None):
        pre = self._convolve(inputs, pretrained=True)
        ft = self._convolve(inputs, pretrained=False)
        if self.use_bias:
            pre = pre + self.pretrained_bias
            ft = ft + self.bias
        if self.batchnorm:
            pre = self._normalize(
                pre,
                self.pretrained_moving_mean,
                self.pretrained_moving_variance,
                self.pretrained_gamma,
                self.pretrained_beta,
            )
            if training and self.train_batchnorm and self.trainable:
                mean, variance = ops.moments(ops.cast(ft, "float32"), axes=[0, 1, 2])
                self.moving_mean.assign(
                    self.moving_mean * self.momentum + mean * (1.0 - self.momentum)
                )
                self.moving_variance.assign(
                    self.moving_variance * self.momentum + variance * (1.0 - self.momentum)
                )
            else:
                mean, variance = self.moving_mean, self.moving_variance
            ft = self._normalize(ft, mean, variance, self.gamma, self.beta)
        if self.activation is not None:
            pre = self.activation(pre)
            ft = self.activation(ft)
        g = ops.cast(gates, ft.dtype)[:, None, None, :]
        return (1.0 - g) * pre + g * ft

    def compute_output_shape(self, inputs_shape, gates_shape):
        height, width = (
            conv_output_length(inputs_shape[axis], k, s, d, self.padding)
            for axis, k, s, d in zip((1, 2), self.kernel_size, self.strides, self.dilation_rate)
        )
        return (inputs_shape[0], height, width, self.filters)

    def load_pretrained(
        self, kernel, bias=None, gamma=None, beta=None, moving_mean=None, moving_variance=None
    ):
        """Sets both paths to pretrained weights (of a Conv2D or
        DepthwiseConv2D and of the BatchNormalization after it).

        Args:
            kernel: the pretrained kernel, in the replaced layer's layout.
            bias: its bias (needs `use_bias`).
            gamma, beta, moving_mean, moving_variance: the pretrained batch
                norm's parameters (need `batchnorm`; `gamma` needs `scale`,
                `beta` needs `center`).

        Raises:
            ValueError: if the layer is not built, a value does not fit, or
                a value is given for a part the layer does not have.
        """
        if not self.built:
            raise ValueError(
                f"GatedConv {self.name!r} must be built (called once) before load_pretrained."
            )
        pairs = [("kernel", kernel, self.pretrained_kernel, self.kernel)]
        if bias is not None:
            if not self.use_bias:
                raise ValueError(f"GatedConv {self.name!r} has no bias (use_bias=False).")
            pairs.append(("bias", bias, self.pretrained_bias, self.bias))
        bn = dict(gamma=gamma, beta=beta, moving_mean=moving_mean, moving_variance=moving_variance)
        for key, value in bn.items():
            if value is None:
                continue
            if not self.batchnorm or getattr(self, key) is None:
                raise ValueError(f"GatedConv {self.name!r} has no batch-norm `{key}`.")
            pairs.append((key, value, getattr(self, f"pretrained_{key}"), getattr(self, key)))
        for key, value, frozen, finetuned in pairs:
            value = ops.convert_to_tensor(value)
            if tuple(value.shape) != tuple(frozen.shape):
                raise ValueError(
                    f"`{key}` must have shape {tuple(frozen.shape)} for GatedConv "
                    f"{self.name!r}. Received: {key} of shape {tuple(value.shape)}"
                )
            frozen.assign(ops.cast(value, frozen.dtype))
            finetuned.assign(ops.cast(value, finetuned.dtype))

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "filters": self.filters,
                "kernel_size": self.kernel_size,
                "strides": self.strides,
                "padding": self.padding,
                "dilation_rate": self.dilation_rate,
                "groups": self.groups,
                "depthwise": self.depthwise,
                "activation": keras.activations.serialize(self.activation),
                "use_bias": self.use_bias,
                "batchnorm": self.batchnorm,
                "train_batchnorm": self.train_batchnorm,
                "momentum": self.momentum,
                "epsilon": self.epsilon,
                "center": self.center,
                "scale": self.scale,
                "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
                "bias_initializer": keras.initializers.serialize(self.bias_initializer),
                "kernel_regularizer": keras.regularizers.serialize(self.kernel_regularizer),
                "bias_regularizer": keras.regularizers.serialize(self.bias_regularizer),
                "kernel_constraint": keras.constraints.serialize(self.kernel_constraint),
                "bias_constraint": keras.constraints.serialize(self.bias_constraint),
            }
        )
        return config


__all__ = ["GatedConv"]
