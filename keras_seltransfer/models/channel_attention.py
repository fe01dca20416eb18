"""How much a classifier's loss rises when one channel of a feature map is removed.

DELTA (Li et al., ICLR 2019) weights its feature-map regulariser by a
"supervised attention": the pretrained network, given a head trained on the
target task, is evaluated on target images with each channel of a chosen
layer removed in turn, and the loss increase says how much the target task
relies on that channel (`keras_seltransfer.losses.channel_attention` turns
the increases into weights). The authors' code removes a channel by zeroing
its convolution filter, one channel and one forward pass of the whole
network at a time. Here a channel is removed by zeroing it in the layer's
output (the same thing for a convolution without bias, and the natural
reading of "removing a channel" of the map that is regularised), and the
ablations are batched: the network runs once up to the chosen layers, and
the part after each layer runs on many masked copies of its output at once.
"""

import keras
import numpy as np

# Probabilities are clipped as Keras clips them in its cross-entropy.
_EPSILON = 1e-7


def _crossentropy(probabilities, labels):
    picked = probabilities[np.arange(len(labels)), labels]
    return -np.log(np.clip(picked, _EPSILON, 1.0 - _EPSILON))


def _tail(classifier, name):
    """The part of `classifier` after layer `name`: from its output to the
    class probabilities (layers shared with `classifier`)."""
    try:
        return keras.Model(classifier.get_layer(name).output, classifier.outputs[0])
    except ValueError as error:
        raise ValueError(
            f"Every path from layer {name!r} to the output of {classifier.name!r} must start at "
            "that layer's output (as at a stage output of a CNN) to remove its channels. "
            f"Received: layer_names containing {name!r} ({error})"
        ) from error


def channel_loss_increases(
    classifier, images, labels, layer_names, batch_size=256, verbose=0
):
    """The rise of the mean cross-entropy when each channel of a layer is zeroed.

    For every layer j of `layer_names` and every channel c of its output,
    `d_{j,c} = mean_i CE(y_i, p(x_i | channel c of layer j set to 0)) -
    mean_i CE(y_i, p(x_i))`, with the classifier in inference mode (moving
    BatchNorm statistics, no dropout). The channel axis is the last one.

    Cost: one forward pass of the classifier over the N images, then, for
    each layer j with C_j channels, C_j * N evaluations of the network's
    part after layer j: sum_j C_j * N partial passes in all, run
    `batch_size` (masked copy, image) pairs per call, with one image batch's
    maps in memory at a time. For the 0.24 M-parameter `small_cnn` at 64x64
    (352 channels over its four stages) and 256 images this is about 90,000
    partial passes in 352 calls: 17 s on two shared CPU cores.

    Args:
        classifier: a functional classifier from images to class
            probabilities (one output).
        images: `[N, height, width, channels]` array of inputs as the
            classifier takes them.
        labels: `[N]` integer class labels.
        layer_names: names of the layers whose channels are removed; every
            path from such a layer to the output must go through its output.
        batch_size: (masked copy, image) pairs evaluated per call.
        verbose: 1 shows a `keras.utils.Progbar`, 0 is silent.

    Returns:
        A list with one float64 NumPy vector `[C_j]` per layer.

    Raises:
        ValueError: for an unknown layer, a layer other computations bypass,
            mismatched images and labels, or a `batch_size` below 1.

    Example:

    ```python
    classifier = build_classifier(small_cnn((16, 16, 1), widths=(4, 8)), 2)
    increases = channel_loss_increases(
        classifier, images, labels, ["block1_relu", "block2_relu"]
    )
    [d.shape for d in increases]  # [(4,), (8,)]
    weights = channel_attention(increases)  # DELTA's channel attention
    ```

    Reference:
        Li, Xiong, Wang, Rao, Liu, Chen, Huan. DELTA: Deep Learning Transfer
        using Feature Map with Attention for Convolutional Networks. ICLR 2019.
    """
    images = np.asarray(images)
    labels = np.asarray(labels).astype("int64").reshape(-1)
    if len(images) != len(labels) or len(images) == 0:
        raise ValueError(
            "`images` and `labels` must be equally long and non-empty. Received: "
            f"{len(images)} images and {len(labels)} labels"
        )
    if isinstance(batch_size, bool) or int(batch_size) < 1:
        raise ValueError(f"`batch_size` must be a positive int. Received: batch_size={batch_size}")
    layer_names = list(layer_names)
    known = {layer.name for layer in classifier.layers}
    for name in layer_names:
        if name not in known:
            raise ValueError(
                f"Model {classifier.name!r} has no layer {name!r}. "
                f"Received: layer_names={layer_names!r}"
            )
    taps = keras.Model(
        classifier.inputs,
        [classifier.outputs[0], *[classifier.get_layer(n).output for n in layer_names]],
    )
    tails = [_tail(classifier, name) for name in layer_names]
    widths = [int(classifier.get_layer(n).output.shape[-1]) for n in layer_names]
    image_batch = min(int(batch_size), len(images))
    chunk = max(1, int(batch_size) // image_batch)
    starts = range(0, len(images), image_batch)
    total_calls = len(starts) * sum(-(-c // chunk) for c in widths)
    progress = keras.utils.Progbar(total_calls, unit_name="ablation") if verbose else None
    base = 0.0
    sums = [np.zeros(c) for c in widths]
    for start in starts:
        x, y = images[start:start + image_batch], labels[start:start + image_batch]
        outputs = taps.predict_on_batch(x)
        base += _crossentropy(np.asarray(outputs[0]), y).sum()
        for j, (tail, maps) in enumerate(zip(tails, outputs[1:])):
            maps = np.asarray(maps)
            eye = np.eye(widths[j], dtype=maps.dtype)
            for first in range(0, widths[j], chunk):
                channels = np.arange(first, min(first + chunk, widths[j]))
                # One masked copy of the batch's maps per removed channel,
                # stacked along the batch axis: [channels * batch, ...].
                keep = (1.0 - eye[channels]).reshape(
                    (len(channels),) + (1,) * (maps.ndim - 1) + (widths[j],)
                )
                masked = (maps[None] * keep).reshape((-1,) + maps.shape[1:])
                probabilities = np.asarray(tail.predict_on_batch(masked))
                losses = _crossentropy(probabilities, np.tile(y, len(channels)))
                sums[j][channels] += losses.reshape(len(channels), len(y)).sum(axis=1)
                if progress is not None:
                    progress.add(1)
    return [(s - base) / len(images) for s in sums]


__all__ = ["channel_loss_increases"]
