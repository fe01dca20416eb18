"""PartiallyFrozenBatchNormalization: batch normalization frozen channel by channel."""

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="keras_seltransfer")
class PartiallyFrozenBatchNormalization(keras.layers.BatchNormalization):
    """Batch normalization whose channels can be frozen one by one.

    A `keras.layers.BatchNormalization` with one more non-trainable weight,
    `frozen` `[channels]` (saved with the model, changed by assigning to it):

    - a channel with `frozen = 0` behaves exactly as in
      `BatchNormalization`: in training mode it is normalised with the
      batch's mean and variance, its moving statistics follow them (with
      `momentum`), and its `gamma` and `beta` learn;
    - a channel with `frozen = 1` behaves, in training mode too, as in a
      frozen (non-trainable) `BatchNormalization`: it is normalised with its
      moving statistics, which stay as they are, and its `gamma` and `beta`
      receive zero gradient.

    In inference mode, and whenever the layer itself is not trainable
    (`trainable=False` freezes every channel, as in Keras), it computes
    exactly what `BatchNormalization` does, so a model with these layers
    serves and exports like one with plain batch normalization. With
    `frozen` all zeros (its initial value) it is `BatchNormalization`.

    Selective filter transfer (Jung & Kim, 2019) uses it when fine-tuning
    with frozen batch normalization: the channels of transferred filters
    keep their pretrained statistics, scale and offset, while the channels
    of re-initialised filters, which have no pretrained statistics, are
    trained [inferred: see `keras_seltransfer.models.filter_transfer`].

    Frozen channels get a zero gradient, so optimizers without weight decay
    leave them unchanged; a decoupled weight decay (`weight_decay` of a
    Keras optimizer) still shrinks their `gamma` and `beta`, as it would any
    trainable variable.

    Args:
        axis: the channel axis (an int; -1 for channels-last).
        **kwargs: the other `BatchNormalization` arguments (`momentum`,
            `epsilon`, `center`, `scale`, initializers, regularizers,
            constraints, `synchronized`), and base `Layer` arguments.
            Batch renormalization (`renorm=True`) is not supported.

    Call arguments:
        inputs: a tensor whose `axis` dimension is known.
        training: whether the layer runs in training mode.
        mask: not supported (must be None).

    Returns:
        The normalised tensor: same shape and dtype.

    Raises:
        ValueError: for a non-int `axis`, `renorm=True`, or a `mask`.

    Example:

    ```python
    bn = PartiallyFrozenBatchNormalization()
    y = bn(x)  # builds: frozen = [0, ..., 0]
    bn.frozen.assign([1.0, 1.0, 0.0, 1.0])  # only channel 2 keeps training
    ```

    Reference:
        Ioffe & Szegedy, "Batch normalization", ICML 2015;
        Jung & Kim, "Selective filter transfer", 2019.
    """

    def __init__(self, axis=-1, **kwargs):
        if isinstance(axis, bool) or not isinstance(axis, int):
            raise ValueError(
                f"`axis` of PartiallyFrozenBatchNormalization must be an int. "
                f"Received: axis={axis!r}"
            )
        if kwargs.get("renorm"):
            raise ValueError(
                "PartiallyFrozenBatchNormalization does not support batch renormalization. "
                f"Received: renorm={kwargs['renorm']!r}"
            )
        super().__init__(axis=axis, **kwargs)

    def build(self, input_shape):
        super().build(input_shape)
        self.frozen = self.add_weight(
            shape=(int(input_shape[self.axis]),),
            initializer="zeros",
            trainable=False,
            autocast=False,
            name="frozen",
        )
        rank = len(input_shape)
        self._channel_axis = self.axis % rank
        self._moment_axes = [i for i in range(rank) if i != self._channel_axis]

    def call(self, inputs, training=None, mask=None):
        if mask is not None:
            raise ValueError(
                "PartiallyFrozenBatchNormalization does not take a mask. "
                f"Received: mask of shape {mask.shape}"
            )
        if not (training and self.trainable):
            return super().call(inputs, training=False)
        compute_dtype = keras.backend.result_type(inputs.dtype, "float32")
        # As BatchNormalization: statistics in float32 even for half inputs.
        inputs = ops.cast(inputs, compute_dtype)
        frozen = ops.cast(self.frozen, compute_dtype) > 0.5
        moving_mean = ops.cast(self.moving_mean, compute_dtype)
        moving_variance = ops.cast(self.moving_variance, compute_dtype)
        batch_mean, batch_variance = ops.moments(
            inputs, axes=self._moment_axes, synchronized=self.synchronized
        )
        mean = ops.where(frozen, moving_mean, batch_mean)
        variance = ops.where(frozen, moving_variance, batch_variance)
        # `where`, not a blend, so a frozen channel's statistics stay bit for
        # bit what they were.
        self.moving_mean.assign(
            ops.where(
                frozen, moving_mean, moving_mean * self.momentum + batch_mean * (1.0 - self.momentum)
            )
        )
        self.moving_variance.assign(
            ops.where(
                frozen,
                moving_variance,
                moving_variance * self.momentum + batch_variance * (1.0 - self.momentum),
            )
        )
        gamma = beta = None
        if self.scale:
            gamma = ops.cast(self.gamma, compute_dtype)
            gamma = ops.where(frozen, ops.stop_gradient(gamma), gamma)
        if self.center:
            beta = ops.cast(self.beta, compute_dtype)
            beta = ops.where(frozen, ops.stop_gradient(beta), beta)
        outputs = ops.batch_normalization(
            x=inputs,
            mean=mean,
            variance=variance,
            axis=self._channel_axis,
            offset=beta,
            scale=gamma,
            epsilon=self.epsilon,
        )
        return ops.cast(outputs, self.compute_dtype)


__all__ = ["PartiallyFrozenBatchNormalization"]
