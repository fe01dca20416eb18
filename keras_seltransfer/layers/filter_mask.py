"""FilterMask: a fixed per-channel mask on a convolution's output filters."""

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="keras_seltransfer")
class FilterMask(keras.layers.Layer):
    """Multiplies every channel of its input by a fixed per-channel value.

    Selective filter transfer (Jung & Kim, 2019) decides filter by filter
    what happens to a pretrained network: some filters are transferred,
    others re-initialised, and during fine-tuning some may be pruned. This
    layer, placed after a convolution's response (after its
    BatchNormalization and activation when it has them; see
    `keras_seltransfer.relevance.response_points`), holds that decision as
    two non-trainable weights, so it is saved and restored with the model
    (`.keras`, checkpoints, `get_weights`) and can be changed during `fit`
    by assigning to the variables, without retracing:

    - `mask` `[channels]`: the value each channel is multiplied by. 1 keeps
      a filter, 0 prunes it: the channel is then exactly zero for finite
      inputs, so every later layer sees the network without that filter.
      Initialised to ones (the identity).
    - `transferred` `[channels]`: a record, not used by the computation: 1
      for a filter whose weights came from the pretrained network, 0 for a
      filter that was re-initialised. Initialised to ones.

    Gradients flow through the multiplication, so a pruned filter's weights
    receive zero gradient from the loss (weight decay still applies).

    Args:
        axis: the channel axis of the input (-1 for channels-last, 1 for
            channels-first).
        **kwargs: base `Layer` arguments.

    Call arguments:
        inputs: a tensor of rank >= 2 whose `axis` dimension is known.

    Returns:
        `inputs * mask`, broadcast along `axis`; same shape and dtype.

    Raises:
        ValueError: for a non-int `axis`, or an input whose channel
            dimension is missing or unknown (raised in `build`).

    Example:

    ```python
    x = keras.layers.ReLU()(keras.layers.Conv2D(8, 3)(inputs))
    mask = FilterMask(name="conv_filter_mask")
    x = mask(x)
    mask.mask.assign([1, 1, 0, 1, 1, 1, 0, 1])  # prune filters 2 and 6
    ```

    Reference:
        Jung & Kim, "Selective filter transfer", 2019.
    """

    def __init__(self, axis=-1, **kwargs):
        super().__init__(**kwargs)
        if isinstance(axis, bool) or not isinstance(axis, int):
            raise ValueError(f"`axis` must be an int. Received: axis={axis!r}")
        self.axis = axis

    def build(self, input_shape):
        rank = len(input_shape)
        if rank < 2 or not -rank <= self.axis < rank:
            raise ValueError(
                f"FilterMask(axis={self.axis}) needs an input of rank >= 2 with that "
                f"axis. Received: input_shape={tuple(input_shape)}"
            )
        channels = input_shape[self.axis]
        if channels is None:
            raise ValueError(
                f"FilterMask needs a known channel dimension (axis {self.axis}). "
                f"Received: input_shape={tuple(input_shape)}"
            )
        self.mask = self.add_weight(
            shape=(int(channels),), initializer="ones", trainable=False, name="mask"
        )
        self.transferred = self.add_weight(
            shape=(int(channels),), initializer="ones", trainable=False, name="transferred"
        )

    def call(self, inputs):
        shape = [1] * len(inputs.shape)
        shape[self.axis] = -1
        mask = ops.reshape(ops.cast(self.mask, inputs.dtype), shape)
        return inputs * mask

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update({"axis": self.axis})
        return config


__all__ = ["FilterMask"]
