"""Equal-mass filter-response histograms: the images' retrieval descriptors.

An image's descriptor in selective joint fine-tuning (Ge & Yu, CVPR 2017)
is, for every channel of a filter bank, the histogram of that channel's
responses over the image. Each channel's bin edges are fitted once on the
*target* training images so that every bin holds about the same share of
the target responses; target and source images are then described with the
same edges, and compared with a weighted symmetric KL divergence
(`keras_seltransfer.utils.divergence`) whose per-channel weights come from
`channel_weights`.

A bank is any callable mapping an image batch to a list of response maps
`[batch, height, width, channels]`, with `groups` (a list of
`(name, channels)`, one per map) and `num_channels` (their total): the
banks of `keras_seltransfer.retrieval.filter_banks`, or the filter
responses of `keras_seltransfer.models.relevance.FilterResponses`. The
retrieval package re-exports these functions (`keras_seltransfer.retrieval`).
"""

import keras
import numpy as np
import tensorflow as tf

from keras_seltransfer.utils.validation import check_int

MAX_BINS = 1000

# Floor of the spacing given to the edges of a constant channel, relative to
# its magnitude: 2^-20 is 8 float32 steps, well clear of float32 rounding
# and of denormals (which TensorFlow flushes to zero on CPU).
_DEGENERATE_SPACING = 2.0**-20


def image_batches(data, name="images"):
    """`data` as a dataset of image batches, labels and weights dropped.

    Args:
        data: a `tf.data.Dataset` of image batches
            `[batch, height, width, channels]`, or of `(images, ...)` tuples.
        name: the argument's name, used in the error.

    Returns:
        A `tf.data.Dataset` of image batches.

    Raises:
        ValueError: if `data` is not a data set of (tuples starting with)
            rank-4 image batches.

    Example:

    >>> ds = tf.data.Dataset.from_tensors((tf.zeros([2, 4, 4, 1]), tf.zeros([2])))
    >>> image_batches(ds).element_spec.shape.as_list()
    [2, 4, 4, 1]
    """
    if not isinstance(data, tf.data.Dataset):
        raise ValueError(
            f"Expected `{name}` to be a tf.data.Dataset of image batches or "
            f"(images, labels) batches. Received: {name}={type(data).__name__}"
        )
    spec = data.element_spec
    if isinstance(spec, (tuple, list)):
        data = data.map(lambda *element: element[0])
        spec = spec[0]
    if not isinstance(spec, tf.TensorSpec) or spec.shape.rank != 4:
        raise ValueError(
            f"Expected `{name}` to yield batches of images [batch, height, width, "
            "channels] (batch the dataset first). "
            f"Received: {name}.element_spec={data.element_spec}"
        )
    return data


def image_tensor(images):
    """`images` as a float32 tensor `[batch, height, width, channels]`.

    Args:
        images: a tensor or array of rank 4.

    Returns:
        A float32 `tf.Tensor`.

    Raises:
        ValueError: for another rank.

    Example:

    >>> image_tensor(np.zeros([2, 8, 8, 1], np.uint8)).dtype
    tf.float32
    """
    images = tf.convert_to_tensor(images)
    if images.shape.rank != 4:
        raise ValueError(
            "Expected `images` of shape [batch, height, width, channels]. "
            f"Received: images.shape={images.shape}"
        )
    return tf.cast(images, tf.float32)


def _progbar(images, progress, label):
    if not progress:
        return None
    steps = int(images.cardinality())
    # Unknown and infinite cardinalities are negative: no target then.
    return keras.utils.Progbar(steps if steps >= 0 else None, unit_name=label)


def _finish(progbar, steps):
    # A bar with a target finalises itself on reaching it.
    if progbar is not None and progbar.target is None:
        progbar.update(steps, finalize=True)


def _channel_offsets(bank):
    offsets, start = [], 0
    for _, channels in bank.groups:
        offsets.append(start)
        start += int(channels)
    return offsets


def fit_bin_edges(bank, images, num_bins=32, fine_bins=2000, progress=True):
    """Fits per-channel bin edges that split the responses into equal masses.

    As in the authors' code, two streaming passes over `images`: the first
    finds each channel's minimum and maximum response; the second counts
    each channel's responses in `fine_bins` equal intervals of
    [min, max]. The fine histogram is then walked: edge k (0 < k <
    num_bins) sits where the cumulative mass reaches k / num_bins,
    interpolated linearly inside the fine interval where it crosses
    (assuming the mass is spread evenly within it; the authors take the
    interval's end). Each fitted bin therefore holds 1 / num_bins of the
    fitting responses up to the mass of one fine interval.

    Edges are strictly increasing float32 values (returned as float64),
    the first is the channel's minimum and the last its maximum. Degenerate
    cases:

    - Point masses (e.g. the zeros of a post-ReLU channel): thresholds that
      cross in the same fine interval get distinct interpolated edges
      inside it, so those bins are nearly empty and the point mass fills
      one bin; no bin can split a single value.
    - Edges closer than float32 can represent are pushed up by one float32
      step each.
    - A channel whose responses span less than `num_bins` times
      delta = 2^-20 max(1, |min|, |max|) (constant channels, such as a dead
      ReLU) gets edges min + j delta instead, so its fitting responses all
      fall in the first bin and larger values in later ones. Its last edge
      is then above its maximum.

    `images` is read twice and must yield the same batches both times (no
    random augmentation or reshuffling; responses outside the first pass's
    range would be counted in the end intervals). Memory does not grow with
    the data set: only the running minima, maxima and the
    `[num_channels, fine_bins]` counts are kept.

    Args:
        bank: a filter bank (see the module docstring).
        images: a finite `tf.data.Dataset` of float image batches
            `[batch, height, width, channels]` in [0, 255], or of
            `(images, labels)` batches (labels unused): the *target* training
            images.
        num_bins: number of histogram bins per channel, 1 to 1000 (the
            authors use 100; 32 suits small images, which give few
            responses per channel).
        fine_bins: number of fine intervals per channel, at least
            `num_bins`.
        progress: whether to show a `keras.utils.Progbar` per pass.

    Returns:
        np.float64 array `[bank.num_channels, num_bins + 1]` of bin edges.

    Raises:
        ValueError: for bad arguments, an empty data set or non-finite
            responses.

    Example:

    ```python
    bank = keras_seltransfer.retrieval.GaborBank()  # 48 channels
    images = np.random.default_rng(0).uniform(0, 255, (8, 32, 32, 1)).astype("float32")
    data = tf.data.Dataset.from_tensor_slices(images).batch(4)
    edges = fit_bin_edges(bank, data, num_bins=8, progress=False)
    edges.shape  # (48, 9)
    ```
    """
    num_bins = check_int(num_bins, "num_bins", 1, MAX_BINS)
    fine_bins = check_int(fine_bins, "fine_bins", num_bins)
    if fine_bins > 2**31 // max(1, bank.num_channels):
        raise ValueError(
            "Expected `fine_bins * bank.num_channels` to fit in int32. "
            f"Received: fine_bins={fine_bins}"
        )
    images = image_batches(images)
    num_channels = bank.num_channels

    @tf.function(reduce_retracing=True)
    def range_step(x):
        responses = bank(x)
        low = tf.concat([tf.reduce_min(r, axis=[0, 1, 2]) for r in responses], axis=0)
        high = tf.concat([tf.reduce_max(r, axis=[0, 1, 2]) for r in responses], axis=0)
        bad = tf.add_n(
            [tf.reduce_sum(tf.cast(~tf.math.is_finite(r), tf.int32)) for r in responses]
        )
        return low, high, bad

    low = np.full(num_channels, np.inf, np.float32)
    high = np.full(num_channels, -np.inf, np.float32)
    progbar = _progbar(images, progress, "batch (range)")
    steps = 0
    for x in images:
        batch_low, batch_high, bad = range_step(x)
        if int(bad):
            raise ValueError(
                f"Expected finite filter responses, but batch {steps} of `images` "
                f"gives {int(bad)} non-finite ones: check the images. "
                f"Received: images={images!r}"
            )
        np.minimum(low, batch_low.numpy(), out=low)
        np.maximum(high, batch_high.numpy(), out=high)
        steps += 1
        if progbar is not None:
            progbar.update(steps)
    if steps == 0:
        raise ValueError(
            f"Expected `images` to yield at least one batch. Received: images={images!r}"
        )
    _finish(progbar, steps)

    # Constant channels get scale 0, so all their responses land in the
    # first fine interval.
    span = high.astype(np.float64) - low.astype(np.float64)
    scale = np.where(span > 0, fine_bins / np.where(span > 0, span, 1.0), 0.0)
    low_t = tf.constant(low, tf.float32)
    scale_t = tf.constant(scale, tf.float32)
    offsets = _channel_offsets(bank)

    @tf.function(reduce_retracing=True)
    def count_step(x):
        ids = []
        for r, start in zip(bank(x), offsets):
            channels = r.shape[-1]
            values = tf.reshape(r, [-1, channels])
            channel_slice = slice(start, start + channels)
            fine = tf.floor((values - low_t[channel_slice]) * scale_t[channel_slice])
            fine = tf.clip_by_value(tf.cast(fine, tf.int32), 0, fine_bins - 1)
            ids.append(tf.reshape(fine + (start + tf.range(channels)) * fine_bins, [-1]))
        ids = tf.concat(ids, axis=0)
        return tf.math.bincount(
            ids, minlength=num_channels * fine_bins, maxlength=num_channels * fine_bins
        )

    counts = np.zeros(num_channels * fine_bins, np.int64)
    progbar = _progbar(images, progress, "batch (histogram)")
    steps = 0
    for x in images:
        counts += count_step(x).numpy()
        steps += 1
        if progbar is not None:
            progbar.update(steps)
    _finish(progbar, steps)
    counts = counts.reshape(num_channels, fine_bins)
    return _walk_equal_mass(counts, low, high, num_bins)


def _walk_equal_mass(counts, low, high, num_bins):
    """Equal-mass edges from fine uniform histograms (see fit_bin_edges)."""
    num_channels, fine_bins = counts.shape
    low64, high64 = low.astype(np.float64), high.astype(np.float64)
    step = (high64 - low64) / fine_bins
    cumulative = np.cumsum(counts, axis=1)
    edges = np.empty((num_channels, num_bins + 1), np.float64)
    edges[:, 0], edges[:, -1] = low64, high64
    fractions = np.arange(1, num_bins, dtype=np.float64) / num_bins
    for c in range(num_channels):
        thresholds = fractions * cumulative[c, -1]
        crossing = np.searchsorted(cumulative[c], thresholds, side="left")
        before = np.where(crossing > 0, cumulative[c, crossing - 1], 0)
        # `crossing` is the first interval whose cumulative count reaches the
        # threshold, so it holds at least one response.
        within = (thresholds - before) / counts[c, crossing]
        edges[c, 1:-1] = low64[c] + (crossing + within) * step[c]

    edges32 = edges.astype(np.float32)
    edges32[:, 0], edges32[:, -1] = low, high
    for j in range(1, num_bins + 1):
        above_previous = np.nextafter(edges32[:, j - 1], np.float32(np.inf))
        edges32[:, j] = np.maximum(edges32[:, j], above_previous)
    delta = _DEGENERATE_SPACING * np.maximum(1.0, np.maximum(np.abs(low64), np.abs(high64)))
    degenerate = (high64 - low64 < num_bins * delta) | (edges32[:, -1] > high)
    if np.any(degenerate):
        edges32[degenerate] = (
            low64[degenerate, None] + np.arange(num_bins + 1) * delta[degenerate, None]
        ).astype(np.float32)
    return edges32.astype(np.float64)


def _check_edges(bank, bin_edges):
    edges = np.asarray(bin_edges, dtype=np.float64)
    if edges.ndim != 2 or edges.shape[0] != bank.num_channels or edges.shape[1] < 2:
        raise ValueError(
            f"Expected `bin_edges` of shape [num_channels, num_bins + 1] = "
            f"[{bank.num_channels}, >= 2] for this bank ({bank.groups}). "
            f"Received: bin_edges.shape={edges.shape}"
        )
    bad_rows = np.flatnonzero(
        ~np.all(np.isfinite(edges), axis=1) | np.any(np.diff(edges, axis=1) <= 0, axis=1)
    )
    if bad_rows.size:
        row = int(bad_rows[0])
        raise ValueError(
            "Expected `bin_edges` to be finite and strictly increasing along each "
            f"channel (as `fit_bin_edges` returns); {bad_rows.size} rows are not. "
            f"Received: bin_edges[{row}]={edges[row].tolist()}"
        )
    return edges


def describe_batch(bank, bin_edges, images):
    """Descriptors of one batch of images (TensorFlow ops only).

    Per image and channel, the fraction of the channel's spatial response
    positions falling in each bin. Bin j holds responses v with
    edges[j] <= v < edges[j + 1]; responses below the first edge count in
    the first bin and responses at or above the last interior edge in the
    last bin (so values beyond the fitted range are clipped into the end
    bins, as `np.histogram` on clipped values). Comparisons are made in
    float32, where the edges of `fit_bin_edges` are exact.

    Args:
        bank: a filter bank.
        bin_edges: `[bank.num_channels, num_bins + 1]` edges: an array, or a
            float tensor with a static shape (whose values are not checked).
        images: float `[batch, height, width, channels]` raw pixels.

    Returns:
        float32 tensor `[batch, bank.num_channels, num_bins]`; each
        channel's histogram sums to 1.

    Raises:
        ValueError: if `bin_edges` does not match the bank.

    Example:

    ```python
    bank = keras_seltransfer.retrieval.GaborBank()  # 48 channels
    images = np.random.default_rng(0).uniform(0, 255, (8, 32, 32, 1)).astype("float32")
    data = tf.data.Dataset.from_tensor_slices(images).batch(4)
    edges = fit_bin_edges(bank, data, num_bins=8, progress=False)
    describe_batch(bank, edges, images[:2]).shape  # TensorShape([2, 48, 8])
    ```
    """
    if isinstance(bin_edges, (tf.Tensor, tf.Variable)):
        shape = tuple(bin_edges.shape)
        if len(shape) != 2 or shape[0] != bank.num_channels or shape[1] is None or shape[1] < 2:
            raise ValueError(
                f"Expected `bin_edges` of shape [num_channels, num_bins + 1] = "
                f"[{bank.num_channels}, >= 2] for this bank ({bank.groups}). "
                f"Received: bin_edges.shape={shape}"
            )
        edges = tf.cast(bin_edges, tf.float32)
    else:
        edges = tf.constant(_check_edges(bank, bin_edges), tf.float32)
    num_bins = edges.shape[1] - 1
    responses = bank(images)
    histograms, start = [], 0
    for r, (_, channels) in zip(responses, bank.groups):
        batch = tf.shape(r)[0]
        positions = tf.shape(r)[1] * tf.shape(r)[2]
        # [batch, channels, positions], so every (image, channel) row is
        # searched in its channel's edges.
        values = tf.reshape(tf.transpose(r, [0, 3, 1, 2]), [batch, channels, -1])
        interior = edges[start : start + channels, 1:-1]
        if num_bins > 1:
            bins = tf.searchsorted(
                tf.broadcast_to(interior, [batch, channels, num_bins - 1]),
                values,
                side="right",
                out_type=tf.int32,
            )
        else:
            bins = tf.zeros_like(values, tf.int32)
        rows = tf.reshape(tf.range(batch * channels), [batch, channels, 1])
        counts = tf.math.bincount(
            tf.reshape(bins + rows * num_bins, [-1]),
            minlength=batch * channels * num_bins,
            maxlength=batch * channels * num_bins,
            dtype=tf.float32,
        )
        counts = tf.reshape(counts, [batch, channels, num_bins])
        histograms.append(counts / tf.cast(positions, tf.float32))
        start += channels
    return tf.concat(histograms, axis=1)


def describe(bank, bin_edges, images, progress=True):
    """Descriptors of every image in a data set.

    Runs `describe_batch` in a `tf.function` over the batches of `images`.

    Args:
        bank: a filter bank.
        bin_edges: `[bank.num_channels, num_bins + 1]` edges from
            `fit_bin_edges` (fitted on the target training images).
        images: a finite `tf.data.Dataset` of image batches or
            `(images, labels)` batches (labels unused).
        progress: whether to show a `keras.utils.Progbar`.

    Returns:
        np.float32 array `[num_images, bank.num_channels, num_bins]`; each
        channel's histogram sums to 1.

    Raises:
        ValueError: if `bin_edges` does not match the bank or `images` is not
            a data set of image batches.

    Example:

    ```python
    bank = keras_seltransfer.retrieval.GaborBank()  # 48 channels
    images = np.random.default_rng(0).uniform(0, 255, (8, 32, 32, 1)).astype("float32")
    data = tf.data.Dataset.from_tensor_slices(images).batch(4)
    edges = fit_bin_edges(bank, data, num_bins=8, progress=False)
    descriptors = describe(bank, edges, data, progress=False)
    descriptors.shape, descriptors.sum(-1).min()  # (8, 48, 8), 1.0
    ```
    """
    edges = _check_edges(bank, bin_edges)
    images = image_batches(images)
    num_bins = edges.shape[1] - 1

    @tf.function(reduce_retracing=True)
    def step(x):
        return describe_batch(bank, edges, x)

    outputs = []
    progbar = _progbar(images, progress, "batch")
    for x in images:
        outputs.append(step(x).numpy())
        if progbar is not None:
            progbar.update(len(outputs))
    _finish(progbar, len(outputs))
    if not outputs:
        return np.zeros((0, bank.num_channels, num_bins), np.float32)
    return np.concatenate(outputs, axis=0)


def channel_weights(bank, layer_weights=None):
    """Per-channel weights of the descriptor distance.

    w_h = layer_weight / (channels in h's group) [code], so each group
    (layer) counts by its layer weight however many channels it has. The
    authors weight each of their two layers 0.5, so the weights sum to 1.

    Args:
        bank: a filter bank.
        layer_weights: one non-negative weight per group, or None for 0.5
            each.

    Returns:
        np.float64 array `[bank.num_channels]`.

    Raises:
        ValueError: for a wrong number of weights, or negative or
            non-finite ones.

    Example:

    ```python
    bank = keras_seltransfer.retrieval.GaborBank()  # one group of 48 channels
    weights = channel_weights(bank)
    weights.shape, weights.sum()  # (48,), 0.5
    ```
    """
    groups = bank.groups
    if layer_weights is None:
        layer_weights = [0.5] * len(groups)
    try:
        weights = np.asarray(layer_weights, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise ValueError(
            "Expected `layer_weights` to be a list of numbers. "
            f"Received: layer_weights={layer_weights!r}"
        ) from e
    if weights.shape != (len(groups),):
        raise ValueError(
            f"Expected `layer_weights` to hold one weight per group ({len(groups)}: "
            f"{[name for name, _ in groups]}). Received: layer_weights={layer_weights!r}"
        )
    if not np.all(np.isfinite(weights)) or np.any(weights < 0):
        raise ValueError(
            "Expected `layer_weights` to be finite and non-negative. "
            f"Received: layer_weights={layer_weights!r}"
        )
    return np.concatenate(
        [np.full(int(channels), w / int(channels)) for w, (_, channels) in zip(weights, groups)]
    )


__all__ = [
    "MAX_BINS",
    "channel_weights",
    "describe",
    "describe_batch",
    "fit_bin_edges",
    "image_batches",
    "image_tensor",
]
