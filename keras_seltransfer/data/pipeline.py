"""tf.data input pipelines for `ImageSource`s, plain and distributed.

The pipeline follows the tf.data performance guide:

    from_tensor_slices -> shard -> map(decode, convert, resize) -> cache
    -> shuffle -> repeat -> batch -> map(augment the batch) -> prefetch

Expensive, deterministic work (decoding, resizing) happens once, before the
in-memory cache; cheap random work (flips) happens after it, so every epoch
sees fresh augmentation. Images come out as float32 *raw pixel values* in
`[0, 255]`: models carry their own rescaling layers, so the exported model
serves on the same raw pixels.
"""

import functools
import math

import numpy as np
import tensorflow as tf

from keras_seltransfer.data.image_source import ImageSource
from keras_seltransfer.utils.validation import check_int
from keras_seltransfer.utils.validation import image_size_pair
from keras_seltransfer.utils.validation import is_int

AUGMENTATIONS = ("none", "flip", "flip_ud")
# How a training pipeline draws its examples (see `make_dataset`).
SAMPLINGS = ("uniform", "balanced")

# ITU-R 601-2 luma, as PIL's `convert("L")`: the RGB -> grey weights of the
# data pipeline and the Gabor filter bank. The weights sum to exactly 1, so
# grey -> RGB -> grey is the identity.
LUMA = (0.299, 0.587, 0.114)


def convert_channels(image, source_channels, channels):
    """Converts a float image with a known channel count to `channels`.

    Grey becomes RGB by repetition, RGB becomes grey by luma (`LUMA`), and
    alpha is dropped (or, for RGBA output, added as opaque).

    Args:
        image: float tensor `[..., source_channels]` in [0, 255].
        source_channels: the channel count of `image`, 1 to 4.
        channels: the channel count wanted, 1 to 4.

    Returns:
        A float tensor `[..., channels]` of the same dtype.

    Example:

    >>> grey = convert_channels(tf.fill([2, 2, 3], 10.0), 3, 1)
    >>> grey.shape.as_list()
    [2, 2, 1]
    """
    if source_channels == channels:
        return image
    if channels == 1:
        if source_channels == 2:
            return image[..., :1]
        return tf.reduce_sum(image[..., :3] * tf.constant(LUMA, image.dtype), -1, keepdims=True)
    if source_channels in (1, 2):
        rgb = tf.concat([image[..., :1]] * 3, axis=-1)
    else:
        rgb = image[..., :3]
    if channels == 3:
        return rgb
    if source_channels in (2, 4):
        alpha = image[..., -1:]
    else:
        alpha = tf.fill(tf.shape(image[..., :1]), tf.constant(255, image.dtype))
    return tf.concat([rgb, alpha], axis=-1)


def _convert_decoded(image, channels):
    """Converts a decoded image whose channel count is only known at run time.

    `tf.io.decode_image(channels=0)` gives 1 to 4 channels depending on the
    file (grey+alpha PNGs give 2, 32-bit BMPs 4), so the conversion switches
    on the run-time count.
    """

    def branch(count):
        return convert_channels(tf.ensure_shape(image, [None, None, count]), count, channels)

    converted = tf.switch_case(
        tf.shape(image)[-1] - 1,
        [functools.partial(branch, count) for count in (1, 2, 3, 4)],
    )
    return tf.ensure_shape(converted, [None, None, channels])


def _resize(image, height, width):
    static_height, static_width = image.shape[0], image.shape[1]
    if static_height is not None and static_width is not None:
        if (static_height, static_width) == (height, width):
            return image
        return tf.image.resize(image, (height, width), method="bilinear", antialias=True)
    shape = tf.shape(image)
    # Files at the target size keep their exact pixels; only others resize.
    resized = tf.cond(
        tf.logical_and(tf.equal(shape[0], height), tf.equal(shape[1], width)),
        lambda: image,
        lambda: tf.image.resize(image, (height, width), method="bilinear", antialias=True),
    )
    return tf.ensure_shape(resized, [height, width, image.shape[-1]])


def prepare_fn(source, height, width, channels):
    """The map function from one element of `source` to a prepared image.

    The function takes `(image, label)` of an in-memory source or
    `(path, label)` of a file source and returns `(image, label)` with the
    image as float32 `[height, width, channels]` in [0, 255]: decoded,
    converted to `channels` (`convert_channels`) and resized (bilinear,
    antialiased; images already at the size keep their exact pixels).

    Args:
        source: an `ImageSource`.
        height: output height.
        width: output width.
        channels: output channel count.

    Returns:
        A function for `tf.data.Dataset.map` over
        `tf.data.Dataset.from_tensor_slices((items, source.labels))`, with
        `items` the images of an in-memory source or its file paths.

    Example:

    >>> source = from_numpy(np.zeros((4, 28, 28), np.uint8), np.arange(4) % 2)
    >>> ds = tf.data.Dataset.from_tensor_slices((source.images, source.labels))
    >>> ds = ds.map(prepare_fn(source, 64, 64, 3), num_parallel_calls=tf.data.AUTOTUNE)
    >>> ds.element_spec[0].shape
    TensorShape([64, 64, 3])
    """

    def finish(image):
        image = _resize(image, height, width)
        # Antialiased bilinear weights are convex, but float rounding can
        # step a hair outside the pixel range.
        return tf.clip_by_value(image, 0.0, 255.0)

    if source.in_memory:

        def prepare(image, label):
            image = convert_channels(tf.cast(image, tf.float32), source.channels, channels)
            return finish(image), label

    else:

        def prepare(path, label):
            # channels=0 because decode_image rejects channels=1 for BMP and
            # GIF and channels=4 for JPEG and GIF; converting afterwards with
            # the same ops as in-memory sources also keeps one grey formula.
            image = tf.io.decode_image(
                tf.io.read_file(path), channels=0, expand_animations=False
            )
            image.set_shape([None, None, None])
            image = _convert_decoded(tf.cast(image, tf.float32), channels)
            return finish(image), label

    return prepare


def augment_batch(images, augment, key):
    """Randomly flips the images of a batch with one vectorised op per axis.

    Augmenting whole batches (rather than running one op chain per image)
    keeps the input side cheap enough that it never competes with the
    training step for the CPU. The flips are stateless random functions of
    `key` (a `[2]` int64 seed), so a batch's augmentation is reproducible.

    Args:
        images: `[batch, height, width, channels]` tensor.
        augment: `"none"`, `"flip"` (left-right) or `"flip_ud"` (left-right
            and up-down).
        key: stateless random seed of shape `[2]`.

    Returns:
        The augmented images.

    Example:

    >>> images = tf.reshape(tf.range(8, dtype=tf.float32), [2, 2, 2, 1])
    >>> key = tf.constant([0, 1], tf.int64)
    >>> augment_batch(images, "flip", key).shape.as_list()
    [2, 2, 2, 1]
    >>> augment_batch(images, "none", key) is images
    True
    """
    if augment == "none":
        return images
    keys = tf.random.experimental.stateless_split(key, 2)

    def flip(images, axis, key):
        count = tf.shape(images)[0]
        coins = tf.random.stateless_uniform([count], seed=key) < 0.5
        return tf.where(coins[:, None, None, None], tf.reverse(images, [axis]), images)

    images = flip(images, 2, keys[0])
    if augment == "flip_ud":
        images = flip(images, 1, keys[1])
    return images


def _augment_fn(augment, seed, pipeline_id):
    """Returns a map function augmenting a batch, keyed on the batch's
    position in the stream (see `augment_batch`)."""
    base = tf.random.experimental.stateless_fold_in(
        tf.constant([seed, 0], tf.int64), pipeline_id
    )

    def apply(index, element):
        images, labels = element
        key = tf.random.experimental.stateless_fold_in(base, index)
        return augment_batch(images, augment, key), labels

    return apply


def make_dataset(
    source,
    image_size,
    batch_size,
    *,
    training=False,
    channels=None,
    augment="flip",
    seed=None,
    repeat=False,
    cache=True,
    drop_remainder=False,
    input_context=None,
    shuffle_buffer=None,
    skip_batches=0,
    sampling="uniform",
):
    """Builds a batched `tf.data.Dataset` of `(images, labels)` from a source.

    Images are float32 of shape `[batch, height, width, channels]` holding
    raw pixel values in `[0, 255]` (not normalised: models include their own
    rescaling); labels are int32 of shape `[batch]`. Images not already at
    `image_size` are resized with antialiased bilinear interpolation; images
    already at that size keep their exact pixel values.

    On-disk sources are read with `tf.io.read_file` and decoded with
    `tf.io.decode_image(channels=0, expand_animations=False)`; the decoded
    channels are then converted with the same operations as in-memory
    images: grey to RGB by repetition, RGB to grey with the ITU-R 601-2 luma
    weights (as PIL's `convert("L")`), alpha dropped.

    When `training` is True the examples are shuffled (with `seed`, a new
    order every epoch) and augmented. The augmentation uses stateless random
    ops keyed on `seed` and the batch's position in the stream, so two
    pipelines with the same seed produce identical batches. (`Dataset.shuffle`
    also mixes in TensorFlow's global seed, which `keras.utils.set_random_seed`
    sets: keep that fixed too to reproduce an order across processes.)
    With `repeat=False`, positions restart every epoch but the shuffle
    gives each position a different image.

    `sampling="balanced"` (training, repeated pipelines only) draws each
    example's class with equal probability among the classes present, and
    an image of that class from its own shuffled, repeated stream
    (`tf.data.Dataset.sample_from_datasets`, seeded), so minority images
    recur more often than majority ones; batch sizes are unchanged.

    Args:
        source: an `ImageSource`.
        image_size: int or `(height, width)` of the output images.
        batch_size: examples per batch (per replica, under a strategy).
        training: shuffle and augment when True.
        channels: None (keep `source.channels`), 1 or 3.
        augment: augmentation when training: None or `"none"`, `"flip"`
            (random left-right flips) or `"flip_ud"` (random left-right and
            up-down flips, for data without a canonical orientation).
        seed: int seed of the shuffle and the augmentation. None draws one
            from NumPy's global generator, so `keras.utils.set_random_seed`
            still makes runs reproducible.
        repeat: repeat the data indefinitely (use with `steps_per_epoch`).
        cache: keep decoded, resized images in memory after the first epoch.
        drop_remainder: drop the last partial batch.
        input_context: a `tf.distribute.InputContext`; with several input
            pipelines, each keeps the shard `input_pipeline_id` of the
            examples.
        shuffle_buffer: shuffle buffer size. Defaults to the number of
            examples (a full shuffle; the buffer holds references to the
            cached images).
        skip_batches: start the stream this many batches in. A resumed
            run skips what it already trained on, so it sees exactly the
            batches (order and augmentation) the uninterrupted run would
            have seen next.
        sampling: `"uniform"` (every example once per pass) or `"balanced"`
            (classes drawn equally; needs `training` and `repeat`).

    Returns:
        A `tf.data.Dataset`.

    Raises:
        ValueError: for an empty source or an invalid argument.

    Example:

    >>> source = from_numpy(np.zeros((10, 28, 28), np.uint8), np.arange(10) % 2)
    >>> ds = make_dataset(source, 32, batch_size=4, channels=3)
    >>> ds.element_spec[0].shape
    TensorShape([None, 32, 32, 3])
    """
    if not isinstance(source, ImageSource):
        raise ValueError(
            f"Expected `source` to be an ImageSource. Received: source={type(source).__name__}"
        )
    if len(source) == 0:
        raise ValueError(f"Expected a non-empty source. Received: source={source!r}")
    height, width = image_size_pair(image_size)
    batch_size = check_int(batch_size, "batch_size", 1)
    if channels is not None and (isinstance(channels, bool) or channels not in (1, 3)):
        raise ValueError(f"Expected `channels` to be None, 1 or 3. Received: channels={channels!r}")
    channels = source.channels if channels is None else int(channels)
    augment = "none" if augment is None else augment
    if augment not in AUGMENTATIONS:
        raise ValueError(
            f"Expected `augment` to be None or one of {AUGMENTATIONS}. "
            f"Received: augment={augment!r}"
        )
    if seed is None:
        seed = int(np.random.randint(0, 2**31 - 1))
    elif not is_int(seed):
        raise ValueError(f"Expected `seed` to be None or an int. Received: seed={seed!r}")
    if shuffle_buffer is not None:
        shuffle_buffer = check_int(shuffle_buffer, "shuffle_buffer", 1)
    skip_batches = check_int(skip_batches, "skip_batches", 0)
    if sampling not in SAMPLINGS or (sampling == "balanced" and not (training and repeat)):
        raise ValueError(
            f"Expected `sampling` to be one of {SAMPLINGS}, and 'balanced' only with "
            f"training=True and repeat=True. Received: sampling={sampling!r}, "
            f"training={training}, repeat={repeat}"
        )

    labels = source.labels.astype(np.int32)
    items = source.images if source.in_memory else source.paths

    pipeline_id, num_pipelines = 0, 1
    if input_context is not None and input_context.num_input_pipelines > 1:
        pipeline_id = input_context.input_pipeline_id
        num_pipelines = input_context.num_input_pipelines
    prepare = prepare_fn(source, height, width, channels)

    def stream(dataset, size):
        # shard -> prepare -> cache -> shuffle -> repeat, for the whole
        # source or for one class of it.
        if num_pipelines > 1:
            dataset = dataset.shard(num_pipelines, pipeline_id)
            size = len(range(pipeline_id, size, num_pipelines))
        dataset = dataset.map(prepare, num_parallel_calls=tf.data.AUTOTUNE)
        if cache:
            dataset = dataset.cache()
        if training:
            dataset = dataset.shuffle(
                shuffle_buffer or max(size, 1), seed=seed, reshuffle_each_iteration=True
            )
        return (dataset.repeat() if repeat else dataset), size

    if sampling == "balanced":
        streams = []
        for label in np.unique(labels):
            index = np.flatnonzero(labels == label)
            per_class, size = stream(
                tf.data.Dataset.from_tensor_slices((np.asarray(items)[index], labels[index])),
                len(index),
            )
            if size:
                streams.append(per_class)
        dataset = tf.data.Dataset.sample_from_datasets(
            streams, weights=[1.0 / len(streams)] * len(streams), seed=seed
        )
    else:
        dataset, _ = stream(tf.data.Dataset.from_tensor_slices((items, labels)), len(source))
    dataset = dataset.batch(batch_size, drop_remainder=drop_remainder)
    if training and augment != "none":
        dataset = dataset.enumerate().map(
            _augment_fn(augment, seed, pipeline_id), num_parallel_calls=tf.data.AUTOTUNE
        )
    if skip_batches:
        # After the shuffle and the augmentation, so the skipped batches
        # consume the same random draws as the batches they stand for.
        dataset = dataset.skip(skip_batches)
    return dataset.prefetch(tf.data.AUTOTUNE)


def distributed_dataset(strategy, source, global_batch_size, image_size, skip_steps=0, **kwargs):
    """Builds a per-replica input pipeline for a `tf.distribute` strategy.

    Calls `strategy.distribute_datasets_from_function` with a function that
    builds `make_dataset(source, image_size, per_replica_batch, ...,
    input_context=ctx)` for each input pipeline, so every replica gets
    batches of `global_batch_size / num_replicas_in_sync` examples and, with
    several input pipelines (multi-worker), each reads its own shard.

    Args:
        strategy: a `tf.distribute.Strategy`.
        source: an `ImageSource`.
        global_batch_size: examples per step over all replicas; must be
            divisible by `strategy.num_replicas_in_sync`.
        image_size: int or `(height, width)`.
        skip_steps: training steps to skip at the start of the stream (a
            resumed run passes the steps it already took); every input
            pipeline skips the per-replica batches its replicas consumed.
        **kwargs: other `make_dataset` keyword arguments (not `batch_size`,
            `input_context` or `skip_batches`, which this sets).

    Returns:
        A `tf.distribute.DistributedDataset`.

    Raises:
        ValueError: if `global_batch_size` is not a positive multiple of the
            replica count, or `kwargs` sets `batch_size` or `input_context`.

    Example:

    >>> strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])  # doctest: +SKIP
    >>> ds = distributed_dataset(  # doctest: +SKIP
    ...     strategy, source, 64, 96, training=True, repeat=True
    ... )
    """
    global_batch_size = check_int(global_batch_size, "global_batch_size", 1)
    replicas = strategy.num_replicas_in_sync
    if global_batch_size % replicas:
        raise ValueError(
            "Expected `global_batch_size` to be divisible by the number of replicas "
            f"({replicas}). Received: global_batch_size={global_batch_size}"
        )
    skip_steps = check_int(skip_steps, "skip_steps", 0)
    for reserved in ("batch_size", "input_context", "skip_batches"):
        if reserved in kwargs:
            raise ValueError(
                f"`{reserved}` is set by distributed_dataset itself; pass "
                f"`global_batch_size` instead. Received: {reserved}={kwargs[reserved]!r}"
            )

    def dataset_fn(input_context):
        # Each step takes one per-replica batch for every replica this
        # pipeline feeds.
        replicas_per_pipeline = max(
            1, input_context.num_replicas_in_sync // input_context.num_input_pipelines
        )
        return make_dataset(
            source,
            image_size,
            input_context.get_per_replica_batch_size(global_batch_size),
            input_context=input_context,
            skip_batches=skip_steps * replicas_per_pipeline,
            **kwargs,
        )

    return strategy.distribute_datasets_from_function(dataset_fn)


def steps_per_epoch(num_examples, batch_size, drop_remainder=False):
    """Returns the number of batches in one pass over `num_examples`.

    Args:
        num_examples: number of examples (non-negative int).
        batch_size: examples per batch (the global batch under a strategy).
        drop_remainder: count only full batches (floor) instead of every
            batch (ceil).

    Returns:
        An int.

    Raises:
        ValueError: for a negative `num_examples` or a non-positive
            `batch_size`.

    Example:

    >>> steps_per_epoch(10, 4), steps_per_epoch(10, 4, drop_remainder=True)
    (3, 2)
    """
    if not is_int(num_examples) or (
        num_examples < 0
    ):
        raise ValueError(
            "Expected `num_examples` to be a non-negative int. "
            f"Received: num_examples={num_examples!r}"
        )
    batch_size = check_int(batch_size, "batch_size", 1)
    if drop_remainder:
        return int(num_examples) // batch_size
    return math.ceil(int(num_examples) / batch_size)
