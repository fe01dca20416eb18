"""Mixed source/target batches for selective joint fine-tuning.

Selective joint fine-tuning (Ge & Yu, CVPR 2017) trains one backbone on the
target task and a source task at once. Every batch is half target images and
half source images; each source image is a random neighbour of one of the
batch's target images, drawn from the first `K_i` entries of that target
image's sorted neighbour list (from `keras_seltransfer.retrieval`). Hard
target images get longer lists as training goes (`AdaptiveNeighbourGrowth`).

`JointSampler` holds the neighbour lists and the growth state in TensorFlow
variables; `make_joint_dataset` builds a `tf.data` pipeline that reads them
when an epoch starts, so a callback that changes the lists between epochs
changes what the next epoch samples without rebuilding the model or
retracing the training step.

How an epoch's target and source images are drawn: see
`keras_seltransfer.data.joint_sampler`.

Only the source images that can be drawn are touched: in-memory sources are
gathered from the raw uint8 arrays of the candidates, on-disk sources read
and decode just the drawn files.
"""

import numpy as np
import tensorflow as tf

from keras_seltransfer.data.image_source import ImageSource
from keras_seltransfer.data.joint_sampler import JointSampler
from keras_seltransfer.data.pipeline import augment_batch
from keras_seltransfer.data.pipeline import AUGMENTATIONS
from keras_seltransfer.data.pipeline import convert_channels
from keras_seltransfer.data.pipeline import make_dataset
from keras_seltransfer.data.pipeline import prepare_fn
from keras_seltransfer.utils.validation import check_int
from keras_seltransfer.utils.validation import image_size_pair

def joint_steps_per_epoch(num_targets, global_batch_size):
    """Steps of one joint epoch: enough half-batches to cover every target once.

    Args:
        num_targets: number of target training images (int >= 1).
        global_batch_size: images per step, half target and half source
            (int >= 2).

    Returns:
        `ceil(num_targets / (global_batch_size // 2))`, an int.

    Raises:
        ValueError: for a `num_targets` below 1 or a `global_batch_size`
            below 2.

    Example:

    >>> joint_steps_per_epoch(10, global_batch_size=4)
    5
    """
    num_targets = check_int(num_targets, "num_targets", 1)
    global_batch_size = check_int(global_batch_size, "global_batch_size", 2)
    return -(-num_targets // (global_batch_size // 2))


def prepared_images(source, image_size, channels=None, batch_size=256):
    """Decodes, converts and resizes every image of a source into one array.

    The images are prepared as `make_dataset` prepares them (without
    augmentation), in the source's order, so the result can be passed to
    several `make_joint_dataset` calls as `target_images`.

    Args:
        source: an `ImageSource`.
        image_size: int or `(height, width)`.
        channels: output channels (None: the source's).
        batch_size: images decoded per batch.

    Returns:
        A float32 NumPy array `[N, height, width, channels]` of raw pixels
        in [0, 255].

    Example:

    >>> source = from_numpy(np.zeros((5, 28, 28), np.uint8), np.arange(5) % 2)
    >>> prepared_images(source, 32, channels=3).shape
    (5, 32, 32, 3)
    """
    dataset = make_dataset(source, image_size, batch_size, channels=channels, cache=False)
    return np.concatenate([images.numpy() for images, _ in dataset], axis=0)


def _source_fetcher(source, candidate_ids, height, width, channels):
    """Returns a function from candidate positions `[n]` to prepared images."""
    if source.in_memory:
        raw = tf.Variable(
            source.images[candidate_ids], trainable=False, name="joint_source_images"
        )
        same_size = tuple(source.images.shape[1:3]) == (height, width)

        def fetch(positions):
            images = convert_channels(
                tf.cast(tf.gather(raw, positions), tf.float32), source.channels, channels
            )
            if not same_size:
                images = tf.image.resize(images, (height, width), method="bilinear", antialias=True)
                images = tf.clip_by_value(images, 0.0, 255.0)
            return images

        return fetch

    paths = tf.constant(source.paths[candidate_ids])
    prepare = prepare_fn(source, height, width, channels)

    def fetch(positions):
        return tf.map_fn(
            lambda path: prepare(path, 0)[0],
            tf.gather(paths, positions),
            fn_output_signature=tf.TensorSpec([height, width, channels], tf.float32),
        )

    return fetch


def make_joint_dataset(
    target,
    source,
    sampler,
    image_size,
    global_batch_size,
    *,
    strategy=None,
    channels=None,
    augment="flip",
    target_class_weight=None,
    target_images=None,
):
    """Builds the joint training pipeline: every batch half target, half source.

    Each element is `(images, labels, sample_weights)` for a model built by
    `build_multitask_model`: `images` is `[batch, h, w, c]` float32 raw
    pixels with the batch's target images first and their paired source
    images second; `labels` and `sample_weights` are dicts with `"target"`
    and `"source"` entries. A target image has source weight 0 and a source
    image target weight 0; the others are 2 (times the target class weight,
    when given), so with Keras's `sum_over_batch_size` reduction each loss is
    the mean over its own half of the batch.

    The dataset is finite: one epoch of `joint_steps_per_epoch(len(target),
    global_batch_size)` steps. Call `fit` without `steps_per_epoch` so a new
    epoch starts a new iterator, which reads the sampler's current state.

    Args:
        target: `ImageSource` of the target training images, in the order of
            the sampler's rows.
        source: `ImageSource` of the whole source set (positions match the
            sampler's candidate ids).
        sampler: a `JointSampler`.
        image_size: int or `(height, width)`.
        global_batch_size: images per step over all replicas, half target and
            half source; each replica's share must be even.
        strategy: a `tf.distribute.Strategy` to distribute to, or None for a
            plain `tf.data.Dataset`.
        channels: output channels (None: the target's).
        augment: `"none"`, `"flip"` or `"flip_ud"`, applied to both halves.
        target_class_weight: optional dict from target class to loss weight.
        target_images: optional prepared target images (`prepared_images`),
            to share one decoded copy between pipelines.

    Returns:
        A `tf.data.Dataset`, or a `tf.distribute.DistributedDataset` when a
        strategy with several replicas is given. (Keras cannot tell the
        length of the latter before its first epoch ends, and warns once that
        the input "ran out of data" when that epoch ends: expected.)

    Raises:
        ValueError: for a sampler that does not match `target` or `source`,
            a call inside `strategy.scope()`, a `global_batch_size` that
            does not split evenly over the replicas, or an unknown
            `augment`.

    Example:

    >>> target = from_numpy(np.zeros((6, 8, 8), np.uint8), np.arange(6) % 2)
    >>> source = from_numpy(np.zeros((10, 8, 8), np.uint8), np.arange(10) % 5)
    >>> neighbour_ids = np.tile(np.arange(4), (6, 1))  # [targets, K], nearest first
    >>> sampler = JointSampler.from_neighbours(neighbour_ids, source.labels, k0=2)
    >>> ds = make_joint_dataset(target, source, sampler, 8, global_batch_size=4)
    >>> images, labels, weights = next(iter(ds))
    >>> images.shape.as_list(), weights["target"].numpy().tolist()
    ([4, 8, 8, 1], [2.0, 2.0, 0.0, 0.0])

    Train with `model.fit(ds, epochs=..., callbacks=[sampler])`.
    """
    if not isinstance(target, ImageSource) or not isinstance(source, ImageSource):
        raise ValueError("Expected `target` and `source` to be ImageSources.")
    if not isinstance(sampler, JointSampler):
        raise ValueError(f"Expected a JointSampler. Received: {type(sampler).__name__}")
    if tf.distribute.has_strategy():
        raise ValueError(
            "Call make_joint_dataset outside `strategy.scope()` and pass the strategy "
            "as `strategy=`: the pipeline's images live on the host, not with the replicas."
        )
    if len(target) != sampler.num_targets:
        raise ValueError(
            f"The sampler has {sampler.num_targets} target rows but the target set has "
            f"{len(target)} images; build the sampler for these target images."
        )
    if sampler.candidate_ids.max() >= len(source):
        raise ValueError(
            f"The sampler draws source position {sampler.candidate_ids.max()} but the "
            f"source set has {len(source)} images."
        )
    height, width = image_size_pair(image_size)
    global_batch_size = check_int(global_batch_size, "global_batch_size", 2)
    replicas = strategy.num_replicas_in_sync if strategy is not None else 1
    if global_batch_size % (2 * replicas):
        raise ValueError(
            "Expected `global_batch_size` to be a multiple of 2 x replicas "
            f"({2 * replicas}) so every replica gets a half/half batch. "
            f"Received: global_batch_size={global_batch_size}"
        )
    if augment not in AUGMENTATIONS:
        raise ValueError(f"Expected `augment` in {AUGMENTATIONS}. Received: augment={augment!r}")
    channels = target.channels if channels is None else int(channels)
    if target_images is None:
        target_images = prepared_images(target, (height, width), channels)
    if target_images.shape != (len(target), height, width, channels):
        raise ValueError(
            f"Expected `target_images` of shape {(len(target), height, width, channels)}. "
            f"Received: {target_images.shape}"
        )
    target_images = tf.Variable(target_images, trainable=False, name="joint_target_images")
    target_labels = tf.constant(target.labels.astype(np.int32))
    class_weights = np.ones([max(target.num_classes, 1)], np.float32)
    if target_class_weight:
        for label, weight in target_class_weight.items():
            class_weights[int(label)] = float(weight)
    class_weights = tf.constant(class_weights)
    source_labels = tf.constant(sampler.candidate_labels)
    fetch_source = _source_fetcher(source, sampler.candidate_ids, height, width, channels)
    steps = joint_steps_per_epoch(len(target), global_batch_size)
    half = global_batch_size // (2 * replicas)
    num_draws = steps * replicas * half
    if sampler.max_level is not None and num_draws > sampler.num_targets * sampler.max_level:
        raise ValueError(
            f"An epoch makes {num_draws} target draws (whole batches), more than "
            f"{sampler.num_targets} targets x max_level={sampler.max_level} allows; "
            "raise `max_level` or lower `global_batch_size`."
        )

    def dataset_fn(input_context=None):
        pipelines = input_context.num_input_pipelines if input_context else 1
        pipeline = input_context.input_pipeline_id if input_context else 0
        local = replicas // pipelines

        def plan(_):
            epoch = sampler.next_epoch()
            targets, positions = sampler.draw(num_draws, epoch)
            # Rows ordered [step, pipeline, local replica]: this pipeline
            # keeps its own replicas' rows of every step.
            shape = [steps, pipelines, local, half]
            targets = tf.reshape(targets, shape)[:, pipeline]
            positions = tf.reshape(positions, shape)[:, pipeline]
            rows = (
                tf.range(steps, dtype=tf.int64)[:, None] * pipelines + pipeline
            ) * local + tf.range(local, dtype=tf.int64)[None, :]
            return (
                tf.reshape(targets, [-1, half]),
                tf.reshape(positions, [-1, half]),
                tf.fill([steps * local], epoch),
                tf.reshape(rows, [-1]),
            )

        def fetch(targets, positions, epoch, row):
            images = tf.concat(
                [tf.gather(target_images, targets), fetch_source(positions)], axis=0
            )
            key = tf.random.experimental.stateless_fold_in(
                tf.random.experimental.stateless_fold_in(
                    tf.constant([sampler.seed, 11], tf.int64), epoch
                ),
                row,
            )
            images = augment_batch(images, augment, key)
            t_labels = tf.gather(target_labels, targets)
            zeros = tf.zeros([half], tf.int32)
            labels = {
                "target": tf.concat([t_labels, zeros], 0),
                "source": tf.concat([zeros, tf.gather(source_labels, positions)], 0),
            }
            none = tf.zeros([half], tf.float32)
            weights = {
                "target": tf.concat([2.0 * tf.gather(class_weights, t_labels), none], 0),
                "source": tf.concat([none, tf.fill([half], 2.0)], 0),
            }
            return images, labels, weights

        dataset = tf.data.Dataset.from_tensors(0).map(plan)
        dataset = dataset.flat_map(lambda *rows: tf.data.Dataset.from_tensor_slices(rows))
        dataset = dataset.map(fetch, num_parallel_calls=tf.data.AUTOTUNE)
        dataset = dataset.apply(tf.data.experimental.assert_cardinality(steps * local))
        return dataset.prefetch(tf.data.AUTOTUNE)

    if replicas == 1:
        # One replica: Keras takes the plain dataset as is (and knows its
        # length from the first epoch on).
        return dataset_fn()
    return strategy.distribute_datasets_from_function(dataset_fn)


def joint_validation_dataset(target, image_size, batch_size, channels=None):
    """Target images in the joint model's `(images, labels, weights)` form.

    Target labels get weight 1 and the source head weight 0, so validation
    measures the target task only.

    Args:
        target: `ImageSource` of the target validation images.
        image_size: int or `(height, width)`.
        batch_size: images per batch.
        channels: output channels (None: the target's).

    Returns:
        A `tf.data.Dataset` of `(images, labels, sample_weights)`, with
        `"target"` and `"source"` entries in `labels` and `sample_weights`.

    Example:

    >>> target = from_numpy(np.zeros((6, 8, 8), np.uint8), np.arange(6) % 2)
    >>> images, labels, weights = next(iter(joint_validation_dataset(target, 8, 4)))
    >>> weights["target"].numpy().tolist(), weights["source"].numpy().tolist()
    ([1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0])
    """

    def to_joint(images, labels):
        zeros = tf.zeros_like(labels)
        count = tf.shape(labels)[0]
        return (
            images,
            {"target": labels, "source": zeros},
            {"target": tf.ones([count], tf.float32), "source": tf.zeros([count], tf.float32)},
        )

    return make_dataset(target, image_size, batch_size, channels=channels).map(to_joint)


__all__ = [
    "joint_steps_per_epoch",
    "joint_validation_dataset",
    "make_joint_dataset",
    "prepared_images",
]
