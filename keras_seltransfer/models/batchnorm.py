"""Re-estimating BatchNormalization statistics after a model changes.

A transform that changes what a BatchNormalization layer sees (anti-aliasing
blurs every activation after the first subsampling; joint training on mixed
source/target batches leaves statistics of the mixture) leaves its moving
statistics describing inputs it no longer gets. `recalibrate_batchnorm`
measures them again on data the user passes, with every weight unchanged.
"""

import warnings

import keras
import numpy as np
import tensorflow as tf

from keras_seltransfer.layers.partially_frozen_batch_normalization import (
    PartiallyFrozenBatchNormalization,
)
from keras_seltransfer.models.classifier import iter_layers
from keras_seltransfer.utils.validation import is_int


def batchnorm_layers(model):
    """Every `keras.layers.BatchNormalization` of `model`, nested models included.

    Example:

    >>> from keras_seltransfer import models
    >>> model = models.small_cnn((16, 16, 1), widths=(4, 8))
    >>> [layer.name for layer in models.batchnorm_layers(model)]
    ['block1_bn', 'block2_bn']
    """
    return [layer for layer in iter_layers(model) if isinstance(layer, keras.layers.BatchNormalization)]


def _image_batches(data, batch_size):
    """Yields image batches of an array or of a dataset of images or tuples."""
    if isinstance(data, tf.data.Dataset):
        for element in data:
            yield element[0] if isinstance(element, (tuple, list)) else element
        return
    if isinstance(data, (np.ndarray, tf.Tensor)) or hasattr(data, "__array__"):
        images = np.asarray(data)
        if images.ndim != 4:
            raise ValueError(
                "`data` must be images [count, height, width, channels] or a tf.data.Dataset. "
                f"Received: data with shape {images.shape}"
            )
        for start in range(0, len(images), batch_size):
            yield images[start:start + batch_size]
        return
    raise ValueError(
        "`data` must be a NumPy array of images or a tf.data.Dataset of images or "
        f"(images, labels) tuples. Received: data of type {type(data).__name__}"
    )


def recalibrate_batchnorm(model, data, *, batch_size=32, max_images=None):
    """Re-estimates the moving statistics of every BatchNormalization layer.

    Runs `model` over `data` in training mode with each BatchNormalization
    layer's momentum at 0, reads every batch's mean and variance from the
    layer, and finally sets the moving mean and variance to those of all the
    images together (the per-channel mean and the pooled variance, weighted
    by batch size), as in AdaBN (Li et al., 2016) and precise BatchNorm (Wu
    and Johnson, 2021). Kernels, scales and offsets do not change, and each
    layer's `trainable` flag and momentum (and the `frozen` channels of a
    `PartiallyFrozenBatchNormalization`, which are recalibrated too) are
    restored afterwards, so a frozen layer (see `set_batchnorm_mode`) stays
    frozen with the new statistics.

    As in training, each layer normalises a batch with that batch's
    statistics while the statistics of the layers after it are measured; the
    first layer's result is exact for any batch size, the later ones are
    exact when `data` is one batch and otherwise the statistics of the
    training-mode network (batches of 32 or more differ from that by little).
    Dropout and other training-mode randomness are active during the pass.
    If the pass fails (bad data, an interrupt), the old statistics are put
    back.

    Use it right after a transform that changes activations (`antialias`),
    or to serve a model with the statistics of the data it will see (after
    joint training on source and target images). Call it outside `fit`; under
    a `tf.distribute` strategy call it in the strategy's scope like any other
    model call outside `fit`.

    Args:
        model: a Keras model; its BatchNormalization layers, in nested models
            too, are changed in place.
        data: images as a NumPy array `[count, height, width, channels]`
            (what the model takes: raw pixels for the toolkit's classifiers),
            or a `tf.data.Dataset` of image batches or of `(images, labels)`
            tuples (for example `data.make_dataset(source, size, 32)`).
        batch_size: batch size when `data` is an array.
        max_images: stop after this many images (None: all of `data`).

    Returns:
        The number of BatchNormalization layers recalibrated (0, with a
        warning, for a model without any).

    Raises:
        ValueError: for bad arguments, or when `data` holds no images.

    Example:

    ```python
    student = models.antialias(classifier, filt_size=4)
    models.recalibrate_batchnorm(student, source_images[:2000])
    ```
    """
    if not is_int(batch_size) or batch_size < 1:
        raise ValueError(f"`batch_size` must be a positive int. Received: batch_size={batch_size!r}")
    if max_images is not None and (
        not is_int(max_images) or max_images < 1
    ):
        raise ValueError(f"`max_images` must be a positive int or None. Received: max_images={max_images!r}")
    layers = batchnorm_layers(model)
    if not layers:
        warnings.warn(
            f"Model {model.name!r} has no BatchNormalization layer: nothing to recalibrate.",
            stacklevel=2,
        )
        return 0
    saved = [(layer.trainable, layer.momentum) for layer in layers]
    # Channels a PartiallyFrozenBatchNormalization keeps frozen would keep
    # their old statistics through the pass: unfreeze them for it.
    partial = [layer for layer in layers if isinstance(layer, PartiallyFrozenBatchNormalization)]
    frozen = [keras.ops.convert_to_numpy(layer.frozen) for layer in partial]
    # The statistics to put back if the pass fails half-way.
    original = [
        (keras.ops.convert_to_numpy(layer.moving_mean), keras.ops.convert_to_numpy(layer.moving_variance))
        for layer in layers
    ]
    sums = [None] * len(layers)
    seen = 0
    try:
        for layer in layers:
            layer.trainable = True
            layer.momentum = 0.0
        for layer in partial:
            layer.frozen.assign(np.zeros(layer.frozen.shape, np.float32))

        # One trace per call: every batch size shares the signature.
        @tf.function(input_signature=[tf.TensorSpec((None, *model.inputs[0].shape[1:]), "float32")])
        def forward(images):
            model(images, training=True)

        for images in _image_batches(data, batch_size):
            if max_images is not None and seen >= max_images:
                break
            if max_images is not None and seen + int(images.shape[0]) > max_images:
                images = images[: max_images - seen]
            count = int(images.shape[0])
            if count == 0:
                continue
            forward(tf.cast(images, "float32"))
            # With momentum 0 the moving statistics are this batch's.
            for i, layer in enumerate(layers):
                mean = np.asarray(keras.ops.convert_to_numpy(layer.moving_mean), np.float64)
                var = np.asarray(keras.ops.convert_to_numpy(layer.moving_variance), np.float64)
                moments = np.stack([mean, var + mean**2]) * count
                sums[i] = moments if sums[i] is None else sums[i] + moments
            seen += count
        if not seen:
            raise ValueError("`data` holds no images to recalibrate BatchNormalization with.")
        for layer, moments in zip(layers, sums):
            mean, second = moments / seen
            layer.moving_mean.assign(mean.astype(np.float32))
            layer.moving_variance.assign(np.maximum(second - mean**2, 0.0).astype(np.float32))
    except BaseException:
        for layer, (mean, var) in zip(layers, original):
            layer.moving_mean.assign(mean)
            layer.moving_variance.assign(var)
        raise
    finally:
        for layer, (trainable, momentum) in zip(layers, saved):
            layer.trainable = trainable
            layer.momentum = momentum
        for layer, value in zip(partial, frozen):
            layer.frozen.assign(value)
    return len(layers)


__all__ = ["batchnorm_layers", "recalibrate_batchnorm"]
