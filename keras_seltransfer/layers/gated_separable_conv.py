"""GatedSeparableConv: AdaFilter's per-example, per-filter gate on a
depthwise-separable convolution."""

import keras
from keras import ops

from keras_seltransfer.layers.gated_conv import GatedConv


@keras.saving.register_keras_serializable(package="keras_seltransfer")
class GatedSeparableConv(GatedConv):
    """A separable convolution with a frozen pretrained path and a fine-tuned
    path, mixed per example and per output filter by binary gates.

    Like `GatedConv`, with each path a `SeparableConv2D` (a depthwise
    convolution, then a 1x1 pointwise one):

    `outputs = g * act(BN_ft(sep_ft(x))) + (1 - g) * act(BN_pre(sep_pre(x)))`

    What is gated [inferred]: AdaFilter (Guo et al., AAAI 2020) decides, per
    example and per *filter* of a layer, whether the output channel is
    computed by the pretrained filter or by its fine-tuned copy. Output
    channel `j` of a separable convolution is computed by the factorised
    filter `W_j[:, :, c] = sum_m D[:, :, c, m] * P[c * M + m, j]` (depthwise
    kernel `D`, depth multiplier `M`, pointwise kernel `P`): the pair of the
    depthwise filters and pointwise filter `j` is that channel's filter. So
    each path holds a whole separable convolution, the pretrained one frozen
    and the fine-tuned one (depthwise and pointwise kernels, bias)
    trainable, and the gate of channel `j` chooses between the two paths'
    channel `j`, one gate per output channel as for a regular convolution.
    Gating the pointwise filters alone would leave the depthwise filters
    shared by both paths: training them would change the "pretrained" path
    too, which then no longer computes the pretrained filter; gating the
    depthwise filters (one per input channel and multiplier) would not be a
    choice per output filter, since every pointwise filter mixes them all.
    The cost is two separable convolutions, as `GatedConv` costs two
    convolutions.

    Args:
        filters: number of output filters (gates per example).
        kernel_size: int or pair, the depthwise kernel's height and width.
        depth_multiplier: depthwise output channels per input channel.
        pointwise_initializer: initializer of the pretrained pointwise
            kernel (the fine-tuned one starts as a copy of it).
        pointwise_regularizer: regularizer of the fine-tuned pointwise
            kernel.
        pointwise_constraint: constraint of the fine-tuned pointwise kernel.
        **kwargs: the other arguments of `GatedConv` (`strides`, `padding`,
            `dilation_rate`, `activation`, `use_bias`, `batchnorm`...), with
            `kernel_initializer`, `kernel_regularizer` and
            `kernel_constraint` applying to the depthwise kernel; `groups`
            and `depthwise` are not taken.

    Call arguments:
        inputs: `[batch, height, width, channels]`.
        gates: `[batch, filters]`; 1 selects the fine-tuned filter, 0 the
            pretrained one.
        training: whether the fine-tuned batch norm uses batch statistics.

    Returns:
        `[batch, out_height, out_width, filters]`.

    Example:

    ```python
    layer = GatedSeparableConv(16, 3, padding="same")
    y = layer(images, gates)  # gates: [batch, 16]
    layer.load_pretrained(sep.depthwise_kernel, sep.pointwise_kernel, bias=sep.bias)
    ```

    Reference:
    - [Guo, Li, Wang, Rosing, "AdaFilter: Adaptive Filter Fine-tuning for
      Deep Transfer Learning", AAAI 2020](https://arxiv.org/abs/1911.09659)
    """

    def __init__(
        self,
        filters,
        kernel_size,
        depth_multiplier=1,
        pointwise_initializer="glorot_uniform",
        pointwise_regularizer=None,
        pointwise_constraint=None,
        **kwargs,
    ):
        for key, default in (("groups", 1), ("depthwise", False)):
            value = kwargs.pop(key, default)
            if value != default:
                raise ValueError(f"GatedSeparableConv takes no `{key}`. Received: {key}={value!r}")
        super().__init__(filters, kernel_size, **kwargs)
        if not isinstance(depth_multiplier, int) or depth_multiplier < 1:
            raise ValueError(
                "`depth_multiplier` must be a positive int. "
                f"Received: depth_multiplier={depth_multiplier!r}"
            )
        self.depth_multiplier = depth_multiplier
        self.pointwise_initializer = keras.initializers.get(pointwise_initializer)
        self.pointwise_regularizer = keras.regularizers.get(pointwise_regularizer)
        self.pointwise_constraint = keras.constraints.get(pointwise_constraint)

    def _kernel_shape(self, channels):
        return self.kernel_size + (channels, self.depth_multiplier)

    def build(self, inputs_shape, gates_shape):
        super().build(inputs_shape, gates_shape)
        shape = (1, 1, inputs_shape[-1] * self.depth_multiplier, self.filters)
        self.pretrained_pointwise_kernel = self.add_weight(
            shape=shape,
            initializer=self.pointwise_initializer,
            trainable=False,
            name="pretrained_pointwise_kernel",
        )
        self.pointwise_kernel = self.add_weight(
            shape=shape,
            initializer=self._copy_of(self.pretrained_pointwise_kernel),
            regularizer=self.pointwise_regularizer,
            constraint=self.pointwise_constraint,
            name="pointwise_kernel",
        )

    def _convolve(self, inputs, pretrained):
        return ops.separable_conv(
            inputs,
            self.pretrained_kernel if pretrained else self.kernel,
            self.pretrained_pointwise_kernel if pretrained else self.pointwise_kernel,
            strides=self.strides,
            padding=self.padding,
            data_format="channels_last",
            dilation_rate=self.dilation_rate,
        )

    def load_pretrained(self, kernel, pointwise_kernel, bias=None, **batchnorm):
        """Sets both paths to pretrained weights (of a SeparableConv2D and of
        the BatchNormalization after it).

        Args:
            kernel: the pretrained depthwise kernel
                `[height, width, channels, depth_multiplier]`.
            pointwise_kernel: the pretrained pointwise kernel
                `[1, 1, channels * depth_multiplier, filters]`.
            bias: its bias (needs `use_bias`).
            **batchnorm: `gamma`, `beta`, `moving_mean`, `moving_variance`,
                as for `GatedConv.load_pretrained`.

        Raises:
            ValueError: as `GatedConv.load_pretrained`, or if
                `pointwise_kernel` does not fit.
        """
        super().load_pretrained(kernel, bias=bias, **batchnorm)
        value = ops.convert_to_tensor(pointwise_kernel)
        expected = tuple(self.pretrained_pointwise_kernel.shape)
        if tuple(value.shape) != expected:
            raise ValueError(
                f"`pointwise_kernel` must have shape {expected} for GatedSeparableConv "
                f"{self.name!r}. Received: pointwise_kernel of shape {tuple(value.shape)}"
            )
        for variable in (self.pretrained_pointwise_kernel, self.pointwise_kernel):
            variable.assign(ops.cast(value, variable.dtype))

    def get_config(self):
        config = super().get_config()
        del config["groups"], config["depthwise"]
        config.update(
            {
                "depth_multiplier": self.depth_multiplier,
                "pointwise_initializer": keras.initializers.serialize(self.pointwise_initializer),
                "pointwise_regularizer": keras.regularizers.serialize(self.pointwise_regularizer),
                "pointwise_constraint": keras.constraints.serialize(self.pointwise_constraint),
            }
        )
        return config


__all__ = ["GatedSeparableConv"]
