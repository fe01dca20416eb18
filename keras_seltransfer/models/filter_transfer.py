"""Selective filter transfer: keep the relevant pretrained filters, re-initialise the rest.

What the paper specifies. Jung & Kim (2019) transfer, "among the weights
pre-trained with source data, only the ones relevant to the target data",
with relevance "measured statistically", and report +2% classification
accuracy on a downsized 50-class subset of ImageNet 2012 [paper: abstract,
the only part that is public]. The relevance statistic, the unit of
selection, what happens to the other weights and how the network is then
trained are not public; this module makes these choices [inferred: this
package's reading of the abstract], documented where they are made:

- Relevance is one of the statistics of `keras_seltransfer.models.relevance`
  ("mean", "frequency", "kl") measured on the target data with the
  pretrained network; per conv layer the top `ratio` of filters is
  transferred (`select_top_fraction`) [inferred: the filter as the unit].
- Every other filter is re-initialised with its layer's own initializers:
  its kernel slice and bias, and the matching channel of the
  BatchNormalization that follows the conv (scale and offset from the
  layer's initializers; moving mean and variance either from the
  initializers or estimated on the target data, see
  `reinitialize_filters`) [inferred: "transfer only the relevant" read as
  "start the others afresh"]. Optionally the next layers' input slices
  that read the filter are re-initialised too (`reinit_next`) [inferred:
  otherwise the next layers' pretrained weights read channels that now
  carry random features; the stricter reading of transferring only the
  relevant filters' connections].
- The BatchNormalization of each masked conv becomes a
  `PartiallyFrozenBatchNormalization`, so that when the run freezes
  BatchNormalization the re-initialised channels can still train (batch
  statistics, learnt scale and offset) while the transferred ones keep
  their pretrained values (`set_reinitialized_batchnorm`) [inferred: a
  re-initialised filter has no pretrained statistics; frozen, the
  statistics estimated at initialisation go stale as its kernel trains,
  `batchnorm_statistics_gap` measures by how much].
- A `FilterMask` after each scored conv's response (see
  `models.response_points`) records which filters were transferred
  (its `transferred` weight) and can prune filters (its `mask`, all ones
  after the transfer); `RelevancePruning` uses it during fine-tuning.
- `fold_filter_masks` multiplies the masks into the weights for export,
  giving the same network without `FilterMask` layers; keeping the masks
  (exporting the model as it is) serves identically.

Reference:
    Jung & Kim, "Selective filter transfer", Advances in Intelligent
    Systems and Computing, vol. 751, Springer, 2019,
    doi:10.1007/978-3-319-78452-6_3.
"""

import keras
import numpy as np
import tensorflow as tf

from keras_seltransfer.layers.partially_frozen_batch_normalization import (
    PartiallyFrozenBatchNormalization,
)
from keras_seltransfer.models.filter_masking import add_filter_masks
from keras_seltransfer.models.filter_masking import ChannelGraph
from keras_seltransfer.models.filter_masking import filter_masks
from keras_seltransfer.models.filter_reinit import BN_STATISTICS
from keras_seltransfer.models.filter_reinit import reinitialize_filters
from keras_seltransfer.models.filter_reinit import stream_channel_moments
from keras_seltransfer.models.filter_selection import select_filters
from keras_seltransfer.models.relevance import check_statistic
from keras_seltransfer.models.relevance import filter_relevance
from keras_seltransfer.models.response_points import conv_layer_names
from keras_seltransfer.models.response_points import response_chains
from keras_seltransfer.utils.validation import check_choice
from keras_seltransfer.utils.validation import check_fraction
# What the BatchNormalization of re-initialised filters does when the run's
# BatchNormalization is frozen (see `set_reinitialized_batchnorm`).
REINIT_BATCHNORM = ("frozen", "channels", "layer")


def selective_filter_transfer(
    pretrained,
    target_data,
    ratio=0.5,
    statistic="mean",
    *,
    source_data=None,
    reinit_next=False,
    seed=None,
    layers=None,
    bn_statistics="target",
    num_bins=32,
    relevance=None,
    strategy=None,
    name=None,
):
    """Builds a target model that keeps only the pretrained filters relevant to the target data.

    1. Scores every filter of the chosen conv layers of `pretrained` on
       `target_data` with `relevance.filter_relevance(statistic)`.
    2. Per layer, keeps the top `ratio` of the filters
       (`relevance.select_top_fraction`: ceil(ratio * n) filters, ties to
       the lower index).
    3. Rebuilds the model (`surgery.rebuild`: fresh layers, every weight
       copied) with a `FilterMask` after each scored conv's response
       (`add_filter_masks`), then re-initialises the other filters in place
       (`reinitialize_filters`: kernel slice, bias, the matching
       BatchNormalization channel and, with `reinit_next`, the next
       layers' input slices) and marks them in the masks' `transferred`
       weights. All masks are ones: nothing is pruned.

    Build it inside the strategy scope the model will train under; the
    relevance and statistics passes run under that strategy.

    Args:
        pretrained: a functional `keras.Model` with one image input (for
            example a `build_classifier` model, whose new head is not a
            conv layer and keeps its own initialisation); it is not changed.
        target_data: a finite `tf.data.Dataset` of target image batches or
            `(images, labels)` batches, unshuffled and unaugmented (read
            several times).
        ratio: fraction of each layer's filters transferred, in [0, 1]
            (0 re-initialises every scored filter, 1 transfers all).
        statistic: `"mean"`, `"frequency"` or `"kl"` (see
            `relevance.filter_statistics`).
        source_data: a dataset of source images, required for `"kl"`.
        reinit_next: also re-initialise the next layers' input slices of
            the re-initialised filters.
        seed: base seed of the re-initialisation (see
            `reinitialize_filters`).
        layers: which conv layers are scored and selected (see
            `relevance.conv_layer_names`); the others are transferred whole.
        bn_statistics: moving statistics of re-initialised channels:
            `"target"` (estimated on `target_data`, the default) or
            `"initializer"`.
        num_bins: bins per filter of the `"kl"` statistic.
        relevance: optional precomputed `{conv_layer_name: scores}`
            (`filter_relevance`'s output) to use instead of step 1.
        strategy: strategy of the passes; default `pretrained`'s.
        name: name of the new model (default: the original's).

    Returns:
        The new functional `keras.Model`. `filter_transfer_summary(model)`
        tells per layer how many filters were transferred.

    Raises:
        ValueError: for an unknown statistic, a ratio outside [0, 1], `"kl"`
            without `source_data`, empty data, or a `relevance` dict that
            does not match the layers.

    Example:

    ```python
    target = make_dataset(train, 64, batch_size=64, channels=1)
    with strategy.scope():
        model = selective_filter_transfer(classifier, target, ratio=0.5, statistic="mean")
    model.compile(...)
    model.fit(...)
    export_saved_model(fold_filter_masks(model), "exported")
    ```

    Reference:
        Jung & Kim, "Selective filter transfer", 2019.
    """
    check_statistic(statistic)
    check_fraction(ratio, "ratio")
    check_choice(bn_statistics, "bn_statistics", BN_STATISTICS)
    if statistic == "kl" and source_data is None and relevance is None:
        raise ValueError(
            "The 'kl' statistic compares each filter's responses on source and target "
            "images: pass a sample of the source images as `source_data`. "
            "Received: source_data=None"
        )
    names = conv_layer_names(pretrained, layers)
    if relevance is None:
        relevance = filter_relevance(
            pretrained,
            target_data,
            statistic,
            source_data=source_data,
            layers=names,
            num_bins=num_bins,
            strategy=strategy,
        )
    else:
        graph = ChannelGraph(pretrained)
        if sorted(relevance) != sorted(names):
            raise ValueError(
                f"`relevance` must score exactly the layers {names}. "
                f"Received: relevance for {sorted(relevance)}"
            )
        for conv in names:
            channels = graph.channels(conv)
            if np.shape(relevance[conv]) != (channels,):
                raise ValueError(
                    f"`relevance[{conv!r}]` must have shape ({channels},). "
                    f"Received: shape {np.shape(relevance[conv])}"
                )
    keep = select_filters(relevance, ratio=ratio)
    model = add_filter_masks(pretrained, layers=names, name=name)
    reinitialize_filters(
        model,
        {conv: ~kept for conv, kept in keep.items()},
        seed=seed,
        reinit_next=reinit_next,
        bn_statistics=bn_statistics,
        data=target_data,
        strategy=strategy,
    )
    return model


def filter_transfer_summary(model):
    """Per conv layer with a `FilterMask`: how many filters were transferred,
    re-initialised and masked.

    Returns:
        A dict `{conv_layer_name: {"filters": n, "transferred": t,
        "reinitialized": n - t, "masked": m}}` with plain ints (JSON
        serialisable): `t` counts `transferred == 1`, `m` counts
        `mask == 0`.

    Example:

    >>> import numpy as np
    >>> from keras_seltransfer import models
    >>> classifier = models.build_classifier(models.small_cnn((16, 16, 1), widths=(4, 8)), 3)
    >>> masked = models.add_filter_masks(classifier)
    >>> _ = models.reinitialize_filters(masked, {"block2_conv": np.arange(8) < 3}, seed=0)
    >>> models.filter_transfer_summary(masked)["block2_conv"]
    {'filters': 8, 'transferred': 5, 'reinitialized': 3, 'masked': 0}
    """
    summary = {}
    for conv, mask in filter_masks(model).items():
        transferred = np.asarray(mask.transferred.numpy())
        values = np.asarray(mask.mask.numpy())
        summary[conv] = {
            "filters": int(values.size),
            "transferred": int((transferred == 1).sum()),
            "reinitialized": int((transferred != 1).sum()),
            "masked": int((values == 0).sum()),
        }
    return summary


def _masked_batchnorms(graph):
    """`[(conv name, BatchNormalization layer, FilterMask layer)]`: the first
    BatchNormalization in the response chain of every masked conv."""
    masks = filter_masks(graph.flat)
    chains = response_chains(graph.flat, list(masks)) if masks else {}
    found = []
    for conv, mask in masks.items():
        for name in chains[conv][1:]:
            layer = graph.by_name[name]
            if isinstance(layer, keras.layers.BatchNormalization):
                found.append((conv, layer, mask))
                break
    return found


def set_reinitialized_batchnorm(model, mode="channels"):
    """Chooses what the BatchNormalization of re-initialised filters does
    when a selective-filter-transfer model fine-tunes with frozen batch norm.

    A re-initialised filter's channel starts with scale 1, offset 0 and
    moving statistics estimated once on the target images (see
    `reinitialize_filters`). Under frozen batch normalization (this
    toolkit's fine-tuning default, `set_batchnorm_mode(model, "frozen")`)
    those stay fixed while the filter's kernel trains, so its statistics go
    stale and its scale and offset never adapt. Call this after
    `set_batchnorm_mode(model, "frozen")` and before `compile`; it changes
    only the BatchNormalization in the response chain of each conv that has
    a `FilterMask` (see `add_filter_masks`):

    - `"frozen"`: those layers stay frozen, as every other (the behaviour
      before this option existed);
    - `"channels"`: each becomes trainable with its channels frozen one by
      one (`PartiallyFrozenBatchNormalization.frozen` = the mask's
      `transferred`): transferred filters keep their pretrained statistics,
      scale and offset, while re-initialised ones are normalised with batch
      statistics, keep their moving statistics current and learn their
      scale and offset [inferred: the paper transfers the relevant filters
      and trains the rest; a re-initialised filter has no pretrained
      statistics to keep]. Filters that `RelevancePruning` re-initialises
      later start training too;
    - `"layer"`: each layer with at least one re-initialised channel trains
      as a whole (all its channels, transferred ones included, use batch
      statistics), the others stay frozen [inferred].

    With BatchNormalization trained everywhere (`set_batchnorm_mode(model,
    "train")`), do not call it: every channel already trains.

    Args:
        model: a functional `keras.Model` built by `selective_filter_transfer`
            (or `add_filter_masks` + `reinitialize_filters`).
        mode: `"frozen"`, `"channels"` or `"layer"`.

    Returns:
        A dict `{batchnorm layer name: number of its channels that train}`.

    Raises:
        ValueError: for an unknown `mode`, or `"channels"` when a masked
            conv's BatchNormalization is not a
            `PartiallyFrozenBatchNormalization`.

    Example:

    >>> import numpy as np
    >>> from keras_seltransfer import models
    >>> classifier = models.build_classifier(models.small_cnn((16, 16, 1), widths=(4, 8)), 3)
    >>> masked = models.add_filter_masks(classifier)
    >>> filters = {"block1_conv": np.array([True, False, False, True])}
    >>> _ = models.reinitialize_filters(masked, filters, seed=0)
    >>> models.set_batchnorm_mode(masked, "frozen")
    2
    >>> models.set_reinitialized_batchnorm(masked, "channels")
    {'block1_bn': 2, 'block2_bn': 0}
    """
    check_choice(mode, "mode", REINIT_BATCHNORM)
    training = {}
    for _, layer, mask in _masked_batchnorms(ChannelGraph(model)):
        reinitialized = np.asarray(mask.transferred.numpy()) != 1
        partial = isinstance(layer, PartiallyFrozenBatchNormalization)
        if mode == "channels" and not partial:
            raise ValueError(
                f'mode="channels" freezes BatchNormalization channels one by one, which layer '
                f"{layer.name!r} cannot: rebuild the model with `add_filter_masks`, which makes "
                f"it a PartiallyFrozenBatchNormalization. Received: {type(layer).__name__}"
            )
        if mode == "frozen":
            layer.trainable = False
        elif mode == "channels":
            layer.trainable = True
            layer.frozen.assign((~reinitialized).astype(np.float32))
        else:
            layer.trainable = bool(reinitialized.any())
            if partial:
                layer.frozen.assign(np.zeros(reinitialized.shape, np.float32))
        if not layer.trainable:
            count = 0
        elif partial:
            count = int((np.asarray(layer.frozen.numpy()) == 0).sum())
        else:
            count = int(reinitialized.size)
        training[layer.name] = count
    return training


def batchnorm_statistics_gap(model, data, *, strategy=None):
    """How far the moving statistics of each masked conv's BatchNormalization
    are from the statistics of what it actually normalises.

    The diagnostic of stale statistics: for every conv with a `FilterMask`
    and a BatchNormalization in its response chain, the mean and population
    variance of the BatchNormalization's input per channel over all images
    and positions of `data` (inference mode, the model as it is), compared
    with the layer's moving mean m and variance v:

    - `mean_gap` = |mean - m| / sqrt(v + epsilon): how many moving standard
      deviations the channel's actual mean is off (0 when current);
    - `log_variance_ratio` = |log((variance + epsilon) / (v + epsilon))|:
      0 when current, log 2 = 0.69 when off by a factor of 2.

    Both are summarised (median) separately over the layer's transferred
    and re-initialised channels (the mask's `transferred`).

    Args:
        model: a functional `keras.Model` with `FilterMask` layers.
        data: a finite `tf.data.Dataset` of image batches or `(images,
            labels)` batches.
        strategy: strategy of the pass; default the model's.

    Returns:
        A dict `{conv layer name: {"batchnorm": name, "transferred": {...},
        "reinitialized": {...}}}`, each inner dict with `channels`,
        `mean_gap` and `log_variance_ratio` (medians; None without
        channels), plain floats and ints (JSON serialisable).

    Raises:
        ValueError: for empty `data`.

    Example:

    ```python
    masked = keras_seltransfer.models.add_filter_masks(classifier)
    keras_seltransfer.models.reinitialize_filters(
        masked, {"block1_conv": np.array([True, False, False, True])},
        bn_statistics="target", data=target_images)
    gap = keras_seltransfer.models.batchnorm_statistics_gap(masked, target_images)
    # Right after the estimate, on the same images: {"channels": 2,
    # "mean_gap": ~0, "log_variance_ratio": ~0}.
    gap["block1_conv"]["reinitialized"]
    ```
    """
    graph = ChannelGraph(model)
    found = _masked_batchnorms(graph)
    if not found:
        return {}
    strategy = strategy or getattr(model, "distribute_strategy", None) or tf.distribute.get_strategy()
    submodel = keras.Model(graph.flat.inputs[0], [layer.input for _, layer, _ in found])
    moments = stream_channel_moments(
        strategy, submodel, [1 if layer.axis in (1, -3) else -1 for _, layer, _ in found], data
    )()
    result = {}
    for (conv, layer, mask), (mean, variance) in zip(found, moments):
        eps = float(layer.epsilon)
        moving_mean = np.asarray(layer.moving_mean.numpy(), np.float64)
        moving_variance = np.asarray(layer.moving_variance.numpy(), np.float64)
        mean_gap = np.abs(mean - moving_mean) / np.sqrt(moving_variance + eps)
        ratio = np.abs(np.log((variance + eps) / (moving_variance + eps)))
        transferred = np.asarray(mask.transferred.numpy()) == 1
        entry = {"batchnorm": layer.name}
        for key, chosen in (("transferred", transferred), ("reinitialized", ~transferred)):
            entry[key] = {
                "channels": int(chosen.sum()),
                "mean_gap": float(np.median(mean_gap[chosen])) if chosen.any() else None,
                "log_variance_ratio": float(np.median(ratio[chosen])) if chosen.any() else None,
            }
        result[conv] = entry
    return result


__all__ = [
    "REINIT_BATCHNORM",
    "batchnorm_statistics_gap",
    "filter_transfer_summary",
    "selective_filter_transfer",
    "set_reinitialized_batchnorm",
]
