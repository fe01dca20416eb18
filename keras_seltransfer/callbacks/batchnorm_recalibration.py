"""BatchNormRecalibration: validate and serve with the statistics of the data served.

Selective joint fine-tuning (Ge & Yu, CVPR 2017) trains BatchNorm on batches
of half target and half source images, so the moving statistics it keeps
describe that mixture. Validation and serving run in inference mode with
those statistics; on a target unlike the source they are far from the
target's own, and the validation accuracy of a network that fits its
training batches well can fall to chance. The training forward pass never
reads the moving statistics (it normalises with each batch's own), so they
can be re-estimated on the target images before every validation without
changing what the network learns.
"""

import contextlib

import keras

from keras_seltransfer.models.batchnorm import recalibrate_batchnorm


class BatchNormRecalibration(keras.callbacks.Callback):
    """Re-estimates BatchNorm moving statistics on given images during `fit`.

    Before every validation pass (`on_test_begin`) and once when training
    ends (after `EarlyStopping` has restored the best weights, when it comes
    earlier in the callback list) it calls `recalibrate_batchnorm(model,
    data)`: every BatchNormalization layer's moving mean and variance become
    those of `data` under the current weights, so validation, the saved
    model and the exported model all use the statistics of the images they
    will see. Weights do not change; training batches still normalise with
    their own statistics, so the training trajectory is the same as without
    the callback.

    Only use it with BatchNorm layers that train (statistics from the
    batch): a frozen layer normalises training batches with its moving
    statistics, and changing them would change training.

    Args:
        data: the images to take statistics from, unaugmented, in the
            form the model takes (for the toolkit's models: raw pixels):
            an array `[count, height, width, channels]` or a
            `tf.data.Dataset` of image batches or `(images, labels)` tuples.
            For joint fine-tuning, the target training images.
        batch_size: batch size when `data` is an array.
        max_images: use at most this many images (None: all).

    Example:

    ```python
    recalibration = callbacks.BatchNormRecalibration(data.prepared_images(target, 64))
    model.fit(joint_ds, validation_data=val_ds, callbacks=[sampler, recalibration])
    ```
    """

    def __init__(self, data, *, batch_size=32, max_images=None):
        super().__init__()
        # Bad arguments fail here, not at the first validation of a long fit.
        for name, value, optional in (
            ("batch_size", batch_size, False),
            ("max_images", max_images, True),
        ):
            if optional and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                kind = "a positive int or None" if optional else "a positive int"
                raise ValueError(f"`{name}` must be {kind}. Received: {name}={value!r}")
        self.data = data
        self.batch_size = batch_size
        self.max_images = max_images
        self.recalibrations = 0

    def on_train_begin(self, logs=None):
        self.recalibrations = 0

    def _recalibrate(self):
        strategy = getattr(self.model, "distribute_strategy", None)
        with strategy.scope() if strategy is not None else contextlib.nullcontext():
            recalibrate_batchnorm(
                self.model, self.data, batch_size=self.batch_size, max_images=self.max_images
            )
        self.recalibrations += 1

    def on_test_begin(self, logs=None):
        self._recalibrate()

    def on_train_end(self, logs=None):
        self._recalibrate()


__all__ = ["BatchNormRecalibration"]
