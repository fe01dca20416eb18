"""Selective filter transfer: keep the relevant pretrained filters, re-initialise the rest.

What the paper specifies. Jung & Kim (2019) transfer, "among the weights
pre-trained with source data, only the ones relevant to the target data",
with relevance "measured statistically", and report +2% classification
accuracy on a downsized 50-class subset of ImageNet 2012 [paper: abstract,
the only part that is public]. The relevance statistic, the unit of
selection, what happens to the other weights and how the network is then
trained are not public; this module makes these choices [inferred,
DESIGN.md §3.3], documented where they are made:

- Relevance is one of the statistics of `keras_seltransfer.relevance`
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
  `relevance.response_points`) records which filters were transferred
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

import zlib

import keras
import numpy as np
import tensorflow as tf

from keras_seltransfer.layers.filter_mask import FilterMask
from keras_seltransfer.layers.partially_frozen_batch_normalization import (
    PartiallyFrozenBatchNormalization,
)
from keras_seltransfer.models import surgery
from keras_seltransfer import relevance as relevance_lib

BN_STATISTICS = ("target", "initializer")

# What the BatchNormalization of re-initialised filters does when the run's
# BatchNormalization is frozen (see `set_reinitialized_batchnorm`).
REINIT_BATCHNORM = ("frozen", "channels", "layer")

MASK_SUFFIX = "_filter_mask"

# Layers that act on every channel separately without mixing them, so the
# filters of a masked or re-initialised channel reach the next
# channel-mixing layer at the same channel index.
_CHANNELWISE_TYPES = (
    FilterMask,
    keras.layers.BatchNormalization,
    keras.layers.ReLU,
    keras.layers.Activation,
    keras.layers.LeakyReLU,
    keras.layers.PReLU,
    keras.layers.ELU,
    keras.layers.Dropout,
    keras.layers.SpatialDropout2D,
    keras.layers.GaussianNoise,
    keras.layers.GaussianDropout,
    keras.layers.MaxPooling2D,
    keras.layers.AveragePooling2D,
    keras.layers.GlobalAveragePooling2D,
    keras.layers.GlobalMaxPooling2D,
    keras.layers.ZeroPadding2D,
    keras.layers.Cropping2D,
    keras.layers.UpSampling2D,
    keras.layers.Identity,
    keras.layers.ActivityRegularization,
)

# Layers whose input slices `reinit_next` re-initialises.
_NEXT_TYPES = (
    keras.layers.Conv2D,
    keras.layers.DepthwiseConv2D,
    keras.layers.SeparableConv2D,
    keras.layers.Dense,
)


def _flat_layers(model):
    flat = surgery.flatten(model)
    return flat, {layer.name: layer for layer in flat.layers}


class _Graph:
    """The flattened model with its layer lookups, read once (serialising a
    large model's graph for every query would cost more than the surgery)."""

    def __init__(self, model):
        self.flat, self.by_name = _flat_layers(model)
        self.consumers = surgery.consumers(self.flat)
        self.producers = surgery.producers(self.flat)
        self.order = {layer.name: i for i, layer in enumerate(self.flat.layers)}

    def channels(self, conv_name):
        conv = self.by_name[conv_name]
        if isinstance(conv, keras.layers.DepthwiseConv2D):
            return int(conv.kernel.shape[2]) * int(conv.kernel.shape[3])
        return int(conv.kernel.shape[-1])

    def next_layers(self, chain):
        found, stopped, seen = set(), set(), set()
        frontier = list(self.consumers[chain[-1]])
        while frontier:
            name = frontier.pop()
            if name in seen:
                continue
            seen.add(name)
            layer = self.by_name[name]
            if isinstance(layer, _NEXT_TYPES):
                found.add(name)
            elif isinstance(layer, _CHANNELWISE_TYPES):
                frontier.extend(self.consumers[name])
            else:
                stopped.add(name)
        position = self.order.__getitem__
        return sorted(found, key=position), sorted(stopped, key=position)

    def ancestors(self, name):
        """Names of every layer upstream of `name`."""
        found, frontier = set(), list(self.producers[name])
        while frontier:
            current = frontier.pop()
            if current not in found:
                found.add(current)
                frontier.extend(self.producers[current])
        return found


def filter_masks(model):
    """The `FilterMask` of every conv layer that has one.

    A conv layer's mask is the `FilterMask` that alone consumes its
    response point (see `relevance.response_points`), as
    `add_filter_masks` places it.

    Args:
        model: a functional `keras.Model`.

    Returns:
        A dict `{conv_layer_name: FilterMask layer}` in graph order (empty
        when the model has none).
    """
    flat, by_name = _flat_layers(model)
    if not any(isinstance(layer, relevance_lib.CONV_TYPES) for layer in flat.layers):
        return {}
    consumers = surgery.consumers(flat)
    found = {}
    for conv, point in relevance_lib.response_points(flat).items():
        following = consumers[point]
        if len(following) == 1 and isinstance(by_name[following[0]], FilterMask):
            found[conv] = by_name[following[0]]
    return found


def add_filter_masks(model, layers=None, name=None):
    """Rebuilds `model` with a `FilterMask` after every scored conv's response.

    Each mask is named `<conv name>_filter_mask`, computes in the dtype
    policy of the layer it follows, and starts as the identity (mask and
    `transferred` all ones). The `BatchNormalization` in each such conv's
    response chain becomes a `PartiallyFrozenBatchNormalization` of the
    same name, config and weights, with no channel frozen (so it is the
    same computation; `set_reinitialized_batchnorm` later lets the
    channels of re-initialised filters train while the others stay
    frozen). So the new model computes exactly what `model` does, with
    copies of all its weights. Conv layers that already have a mask keep
    it (with its values).

    Args:
        model: a functional `keras.Model` (nested functional models are
            inlined, see `surgery.rebuild`).
        layers: which conv layers (see `relevance.conv_layer_names`).
        name: name of the new model (default: the original's).

    Returns:
        The new functional `keras.Model`.

    Raises:
        ValueError: if a mask's name is already taken by another layer.
    """
    flat, by_name = _flat_layers(model)
    chains = relevance_lib.response_chains(flat, layers)
    existing = filter_masks(flat)
    channel_axes = {}
    swap = set()
    for conv, chain in chains.items():
        swap.update(
            name
            for name in chain[1:]
            if type(by_name[name]) is keras.layers.BatchNormalization
            and isinstance(by_name[name].axis, int)
            and not by_name[name].renorm
        )
        if conv in existing:
            continue
        mask_name = conv + MASK_SUFFIX
        if mask_name in by_name:
            raise ValueError(
                f"Cannot add a FilterMask named {mask_name!r}: model {model.name!r} already "
                "has a layer of that name that is not this conv's mask."
            )
        channel_axes[chain[-1]] = (mask_name, relevance_lib._channel_axis(by_name[conv]))

    def call(layer, original, *args, **kwargs):
        if original.name in swap:
            layer = PartiallyFrozenBatchNormalization.from_config(original.get_config())
            outputs = layer(*args, **kwargs)
            # A different class, so `surgery.rebuild` does not copy these.
            for name in ("gamma", "beta", "moving_mean", "moving_variance"):
                if getattr(original, name, None) is not None:
                    getattr(layer, name).assign(getattr(original, name))
        else:
            outputs = layer(*args, **kwargs)
        if original.name in channel_axes:
            mask_name, axis = channel_axes[original.name]
            outputs = FilterMask(axis=axis, dtype=layer.dtype_policy, name=mask_name)(outputs)
        return outputs

    return surgery.rebuild(flat, call, name=name)


def _variable_seed(base, layer_name, variable_name):
    words = [
        int(base) % (2**32),
        zlib.crc32(layer_name.encode()),
        zlib.crc32(variable_name.encode()),
    ]
    return int(np.random.SeedSequence(words).generate_state(1)[0] % (2**31 - 1))


def _fresh_values(initializer, variable, layer_name, base_seed):
    """A full new value of `variable` drawn from `initializer`, seeded."""
    config = initializer.get_config()
    if "seed" in config:
        config = dict(config, seed=_variable_seed(base_seed, layer_name, variable.path))
        initializer = initializer.__class__.from_config(config)
    return np.asarray(initializer(tuple(variable.shape), dtype=variable.dtype))


def _assign_slices(variable, fresh, index):
    value = np.array(variable.numpy())
    value[index] = fresh[index]
    variable.assign(value)


def _output_index(layer, channels):
    """Index of `layer`'s kernel entries producing output `channels`."""
    if isinstance(layer, keras.layers.DepthwiseConv2D):
        multiplier = int(layer.kernel.shape[-1])
        return (Ellipsis, channels // multiplier, channels % multiplier)
    return (Ellipsis, channels)


def _input_slices(layer, channels):
    """`[(variable, index)]`: the weights of `layer` that read input `channels`."""
    if isinstance(layer, keras.layers.Dense):
        return [(layer.kernel, (channels, slice(None)))]
    if isinstance(layer, keras.layers.SeparableConv2D):
        return [(layer.depthwise_kernel, (slice(None), slice(None), channels, slice(None)))]
    if isinstance(layer, keras.layers.DepthwiseConv2D):
        return [(layer.kernel, (slice(None), slice(None), channels, slice(None)))]
    kernel = layer.kernel
    groups = int(getattr(layer, "groups", 1) or 1)
    if groups == 1:
        return [(kernel, (slice(None), slice(None), channels, slice(None)))]
    # Grouped conv: input channel c is entry c % per_group of group
    # c // per_group, which feeds only that group's outputs.
    per_group_in = int(kernel.shape[2])
    per_group_out = int(kernel.shape[3]) // groups
    slices = []
    for c in channels:
        group = int(c) // per_group_in
        outputs = slice(group * per_group_out, (group + 1) * per_group_out)
        slices.append((kernel, (slice(None), slice(None), int(c) % per_group_in, outputs)))
    return slices


def _initializer_for(layer, variable):
    if isinstance(layer, keras.layers.SeparableConv2D):
        return layer.depthwise_initializer
    if isinstance(layer, keras.layers.DepthwiseConv2D):
        return layer.depthwise_initializer if variable is layer.kernel else layer.bias_initializer
    if variable is layer.kernel:
        return layer.kernel_initializer
    return layer.bias_initializer


def next_layers(model, conv_name):
    """The layers that read the channels of a conv layer's filters directly.

    Follows the conv's response (see `relevance.response_points`) through
    layers that treat each channel on its own (FilterMask,
    BatchNormalization, activations, dropout, pooling, padding, cropping,
    upsampling) to the layers that mix channels. Those that are `Conv2D`,
    `DepthwiseConv2D`, `SeparableConv2D` or `Dense` are the next layers;
    any other (a merge such as Add or Concatenate, Flatten, Reshape) stops
    the walk, as its output channels no longer correspond one to one.

    Args:
        model: a functional `keras.Model`.
        conv_name: a conv layer name of `model`.

    Returns:
        `(next_names, stopped_at)`: names of the next layers and of the
        layers where the walk stopped, each in graph order.
    """
    graph = _Graph(model)
    chain = relevance_lib.response_chains(graph.flat, [conv_name])[conv_name]
    return graph.next_layers(chain)


def _stream_channel_moments(strategy, submodel, channel_axes, data):
    """Per-channel means and population variances of each output of
    `submodel` over all images and positions of `data`."""
    images = relevance_lib._image_batches(data, "data")

    def replica_fn(x):
        outputs = submodel(tf.cast(x, tf.float32), training=False)
        if not isinstance(outputs, (list, tuple)):
            outputs = [outputs]
        sums = []
        for y, axis in zip(outputs, channel_axes):
            y = tf.cast(y, tf.float32)
            if axis == 1:
                y = tf.transpose(y, [0, 2, 3, 1])
            shape = tf.shape(y)
            count = tf.cast(shape[0] * shape[1] * shape[2], tf.float32)
            total = tf.reduce_sum(y, axis=[0, 1, 2])
            squares = tf.reduce_sum(tf.square(y), axis=[0, 1, 2])
            sums.append((total, squares, count))
        return sums

    distributed = strategy.experimental_distribute_dataset(images)

    @tf.function(input_signature=[distributed.element_spec])
    def step(x):
        outputs = strategy.run(replica_fn, args=(x,))
        return tf.nest.map_structure(
            lambda v: strategy.reduce(tf.distribute.ReduceOp.SUM, v, axis=None), outputs
        )

    def run():
        totals = None
        for x in distributed:
            values = tf.nest.map_structure(lambda v: np.asarray(v, np.float64), step(x))
            totals = values if totals is None else tf.nest.map_structure(np.add, totals, values)
        if totals is None or not totals[0][2] > 0:
            raise ValueError("`data` must yield at least one image. Received: an empty data set")
        moments = []
        for total, squares, count in totals:
            mean = total / count
            moments.append((mean, np.maximum(squares / count - mean**2, 0.0)))
        return moments

    return run


def _estimate_bn_statistics(graph, estimate, data, strategy):
    """Sets the moving statistics of re-initialised BatchNormalization
    channels to their input's moments on `data` (see `reinitialize_filters`).

    Each estimate must see the statistics of the estimated layers upstream
    of it, so the passes go in waves: a pass estimates every layer none of
    whose upstream estimated layers is still pending (one pass per layer in
    a chain network, fewer with parallel branches). One traced function
    computes all the conv outputs, so the waves do not retrace.
    """
    convs = [conv for conv, _, _ in estimate]
    upstream = {conv: graph.ancestors(conv) & set(convs) for conv in convs}
    submodel = keras.Model(
        graph.flat.inputs[0], [graph.by_name[conv].output for conv in convs]
    )
    run = _stream_channel_moments(
        strategy,
        submodel,
        [relevance_lib._channel_axis(graph.by_name[conv]) for conv in convs],
        data,
    )
    done = set()
    while len(done) < len(convs):
        ready = [i for i, conv in enumerate(convs) if conv not in done and upstream[conv] <= done]
        moments = run()
        for i in ready:
            _, layer, channels = estimate[i]
            mean, variance = moments[i]
            for variable, values in ((layer.moving_mean, mean), (layer.moving_variance, variance)):
                value = np.array(variable.numpy())
                value[channels] = values[channels]
                variable.assign(value)
            done.add(convs[i])


def _check_choice(name, value, choices):
    if value not in choices:
        raise ValueError(f"`{name}` must be one of {choices}. Received: {name}={value!r}")


def reinitialize_filters(
    model,
    filters,
    *,
    seed=None,
    reinit_next=False,
    bn_statistics="initializer",
    data=None,
    strategy=None,
):
    """Re-initialises chosen filters of a model in place, by assigning to its variables.

    For every conv layer and every chosen output filter c, each of these is
    replaced by a fresh draw of the initializer the layer itself uses
    (so the new values have the distribution of a freshly built layer;
    the whole variable is drawn and only the chosen slices are copied in):

    - the conv's kernel slice producing channel c (`kernel[..., c]`; for a
      `DepthwiseConv2D` with depth multiplier m, `kernel[:, :, c // m,
      c % m]`) and its bias `bias[c]`;
    - channel c of the BatchNormalization in the conv's response chain
      (`relevance.response_chains`): `gamma[c]` and `beta[c]` from its
      initializers, and the moving statistics: with
      `bn_statistics="initializer"` from its initializers (mean 0,
      variance 1), with `"target"` estimated on `data` [inferred: a
      re-initialised filter has no statistics of its own, and with frozen
      BatchNormalization (this toolkit's fine-tuning default) initializer
      statistics would leave its channel unnormalised for the whole run]:
      the mean and population variance of the conv's output channel over
      all images and positions, computed in inference mode after every
      chosen filter has its new weights, conv layer by conv layer in graph
      order (so each estimate sees the re-initialised layers before it);
    - `alpha[..., c]` of a PReLU in the chain;
    - with `reinit_next`, the input slices reading channel c in each of the
      conv's `next_layers` (`kernel[:, :, c, :]` of a Conv2D, the
      corresponding group's slice of a grouped one, `kernel[:, :, c, :]`
      of a DepthwiseConv2D, `depthwise_kernel[:, :, c, :]` of a
      SeparableConv2D, `kernel[c, :]` of a Dense layer); their biases and
      other channels are untouched;
    - the conv's `FilterMask`, if it has one, gets `transferred[c] = 0`
      (its `mask` is unchanged), and a `PartiallyFrozenBatchNormalization`
      in the chain `frozen[c] = 0` (the channel trains whenever the layer
      is trainable, see `set_reinitialized_batchnorm`).

    Nothing else changes; in particular optimizer slots (momenta) of the
    re-initialised entries are left as they are.

    Args:
        model: a functional `keras.Model`.
        filters: `{conv_layer_name: bool array [filters]}`, True for the
            filters to re-initialise.
        seed: int base seed of the draws (each variable gets its own seed
            derived from it and the variable's path), or None to draw the
            base seed from NumPy's global generator (which
            `keras.utils.set_random_seed` seeds).
        reinit_next: also re-initialise the next layers' input slices.
        bn_statistics: `"initializer"` or `"target"` (see above).
        data: for `"target"`: a finite `tf.data.Dataset` of image batches
            or `(images, labels)` batches (the target training images).
        strategy: strategy of the estimation passes; default the model's.

    Returns:
        A dict `{conv_layer_name: {"reinitialized": count, "next_layers":
        [names whose input slices were re-initialised]}}`.

    Raises:
        ValueError: for unknown layers, masks of the wrong shape, a bad
            `bn_statistics`, or `"target"` without `data`.
    """
    _check_choice("bn_statistics", bn_statistics, BN_STATISTICS)
    graph = _Graph(model)
    by_name = graph.by_name
    if not isinstance(filters, dict):
        raise ValueError(
            "`filters` must be a dict {conv layer name: bool array [filters]}. "
            f"Received: filters of type {type(filters).__name__}"
        )
    chains = relevance_lib.response_chains(graph.flat, list(filters)) if filters else {}
    masks = filter_masks(graph.flat)
    chosen = {}
    for conv, selection in filters.items():
        selection = np.asarray(selection)
        channels = graph.channels(conv)
        if selection.dtype != bool or selection.shape != (channels,):
            raise ValueError(
                f"`filters[{conv!r}]` must be a bool array of shape ({channels},). Received: "
                f"dtype {selection.dtype}, shape {selection.shape}"
            )
        chosen[conv] = np.flatnonzero(selection)
    if bn_statistics == "target" and data is None and any(
        len(chosen[conv]) and any(
            isinstance(by_name[n], keras.layers.BatchNormalization) for n in chains[conv]
        )
        for conv in chosen
    ):
        raise ValueError(
            'bn_statistics="target" estimates the re-initialised channels\' BatchNormalization '
            "statistics on the target images: pass them as `data`. Received: data=None"
        )
    base_seed = int(np.random.randint(0, 2**31 - 1)) if seed is None else int(seed)
    summary = {}
    estimate = []
    for conv_name, channels in chosen.items():
        summary[conv_name] = {"reinitialized": int(len(channels)), "next_layers": []}
        if not len(channels):
            continue
        conv = by_name[conv_name]
        kernel = conv.kernel
        fresh = _fresh_values(_initializer_for(conv, kernel), kernel, conv_name, base_seed)
        _assign_slices(kernel, fresh, _output_index(conv, channels))
        if conv.use_bias:
            fresh = _fresh_values(conv.bias_initializer, conv.bias, conv_name, base_seed)
            _assign_slices(conv.bias, fresh, channels)
        for name in chains[conv_name][1:]:
            layer = by_name[name]
            if isinstance(layer, keras.layers.BatchNormalization):
                pairs = [
                    (layer.gamma, layer.gamma_initializer) if layer.scale else None,
                    (layer.beta, layer.beta_initializer) if layer.center else None,
                    (layer.moving_mean, layer.moving_mean_initializer),
                    (layer.moving_variance, layer.moving_variance_initializer),
                ]
                for variable, initializer in filter(None, pairs):
                    fresh = _fresh_values(initializer, variable, name, base_seed)
                    _assign_slices(variable, fresh, channels)
                if isinstance(layer, PartiallyFrozenBatchNormalization):
                    # No pretrained statistics are left to keep for the channel.
                    _assign_slices(layer.frozen, np.zeros(layer.frozen.shape, np.float32), channels)
                if bn_statistics == "target":
                    estimate.append((conv_name, layer, channels))
            elif isinstance(layer, keras.layers.PReLU) and int(layer.alpha.shape[-1]) > 1:
                fresh = _fresh_values(layer.alpha_initializer, layer.alpha, name, base_seed)
                _assign_slices(layer.alpha, fresh, (Ellipsis, channels))
        if reinit_next:
            followers, _ = graph.next_layers(chains[conv_name])
            for name in followers:
                layer = by_name[name]
                for variable, index in _input_slices(layer, channels):
                    fresh = _fresh_values(
                        _initializer_for(layer, variable), variable, name, base_seed
                    )
                    _assign_slices(variable, fresh, index)
            summary[conv_name]["next_layers"] = followers
        if conv_name in masks:
            marker = np.array(masks[conv_name].transferred.numpy())
            marker[channels] = 0.0
            masks[conv_name].transferred.assign(marker)
    if estimate:
        strategy = (
            strategy or getattr(model, "distribute_strategy", None) or tf.distribute.get_strategy()
        )
        _estimate_bn_statistics(graph, estimate, data, strategy)
    return summary


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
    relevance_lib._check_statistic(statistic)
    relevance_lib._check_fraction(ratio, "ratio")
    _check_choice("bn_statistics", bn_statistics, BN_STATISTICS)
    if statistic == "kl" and source_data is None and relevance is None:
        raise ValueError(
            "The 'kl' statistic compares each filter's responses on source and target "
            "images: pass a sample of the source images as `source_data`. "
            "Received: source_data=None"
        )
    names = relevance_lib.conv_layer_names(pretrained, layers)
    if relevance is None:
        relevance = relevance_lib.filter_relevance(
            pretrained,
            target_data,
            statistic,
            source_data=source_data,
            layers=names,
            num_bins=num_bins,
            strategy=strategy,
        )
    else:
        graph = _Graph(pretrained)
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
    keep = relevance_lib.select_filters(relevance, ratio=ratio)
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
    chains = relevance_lib.response_chains(graph.flat, list(masks)) if masks else {}
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
    """
    _check_choice("mode", mode, REINIT_BATCHNORM)
    training = {}
    for _, layer, mask in _masked_batchnorms(_Graph(model)):
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
    """
    graph = _Graph(model)
    found = _masked_batchnorms(graph)
    if not found:
        return {}
    strategy = strategy or getattr(model, "distribute_strategy", None) or tf.distribute.get_strategy()
    submodel = keras.Model(graph.flat.inputs[0], [layer.input for _, layer, _ in found])
    moments = _stream_channel_moments(
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


def _activation_of(conv, chain, by_name):
    """`(description, callable on a float32 array, positively homogeneous)`
    of the activation at the end of a response chain (identity when none)."""
    if relevance_lib._has_fused_activation(conv):
        function = conv.activation
        return f"{conv.name}'s activation", function, function in (
            keras.activations.relu,
            keras.activations.leaky_relu,
        )
    last = by_name[chain[-1]]
    if not isinstance(last, relevance_lib._ACTIVATION_LAYER_TYPES):
        return None, None, True
    if isinstance(last, keras.layers.ReLU):
        homogeneous = last.max_value is None and float(last.threshold) == 0.0
    elif isinstance(last, keras.layers.Activation):
        homogeneous = last.activation in (
            keras.activations.relu,
            keras.activations.leaky_relu,
            keras.activations.linear,
        )
    else:
        homogeneous = isinstance(last, (keras.layers.LeakyReLU, keras.layers.PReLU))
    return f"layer {last.name!r}", last, homogeneous


def fold_filter_masks(model, name=None):
    """The same network with every `FilterMask` multiplied into the weights.

    A mask m sits after act(affine(x)), where affine is the conv's
    BatchNormalization when its response chain has one, else the conv
    itself, and act the chain's activation (identity when none). The fold
    multiplies the affine part's per-channel output by m (BatchNormalization
    `gamma` and `beta`; or the conv's kernel slice and bias) and drops the
    mask, which is exact when act(m * y) = m * act(y): for masks of zeros
    and ones when act(0) = 0 (ReLU, ReLU6, swish, tanh, ELU, ...), and for
    any m >= 0 when act is positively homogeneous (ReLU, LeakyReLU, PReLU,
    linear). It is exact in training mode too (BatchNormalization's batch
    statistics do not depend on gamma and beta). With binary masks the
    folded network's outputs equal the masked one's.

    The `transferred` records are not kept (the folded model has no
    masks), and every `PartiallyFrozenBatchNormalization` becomes a plain
    `BatchNormalization` with the same weights (they compute the same in
    inference mode); keep the model itself to keep them.

    Args:
        model: a functional `keras.Model` whose `FilterMask` layers each
            follow a conv's response (as `add_filter_masks` puts them).
        name: name of the new model (default: the original's).

    Returns:
        A new functional `keras.Model` without `FilterMask` layers (the
        model itself when it has none).

    Raises:
        ValueError: for a FilterMask that follows no conv, negative mask
            values, a mask the activation does not let through exactly
            (e.g. zeros before a sigmoid), or a BatchNormalization without
            scale.
    """
    flat, by_name = _flat_layers(model)
    masks = filter_masks(flat)
    placed = {mask.name for mask in masks.values()}
    stray = [
        layer.name
        for layer in flat.layers
        if isinstance(layer, FilterMask) and layer.name not in placed
    ]
    if stray:
        raise ValueError(
            f"FilterMask layers {stray} do not follow a conv layer's response, so they "
            "cannot be folded into weights; export the model with its masks instead."
        )
    if not masks:
        return model
    chains = relevance_lib.response_chains(flat, list(masks))
    plans = {}
    for conv_name, mask in masks.items():
        values = np.asarray(mask.mask.numpy(), np.float64)
        if (values < 0).any():
            raise ValueError(
                f"Mask {mask.name!r} has negative values; only masks >= 0 fold into the "
                f"weights. Received: min={values.min()}"
            )
        conv = by_name[conv_name]
        chain = chains[conv_name]
        what, activation, homogeneous = _activation_of(conv, chain, by_name)
        binary = np.isin(values, (0.0, 1.0)).all()
        if activation is not None and not homogeneous:
            if not binary:
                raise ValueError(
                    f"Mask {mask.name!r} has values other than 0 and 1, which fold exactly "
                    f"only through positively homogeneous activations (ReLU, LeakyReLU, "
                    f"PReLU, linear), not {what}; export the model with its masks instead."
                )
            if (values == 0).any():
                at_zero = np.asarray(
                    keras.ops.convert_to_numpy(activation(keras.ops.zeros((1, 1, 1, values.size))))
                )
                if np.abs(at_zero).max() != 0:
                    raise ValueError(
                        f"Mask {mask.name!r} zeroes channels after {what}, whose value at 0 "
                        f"is {float(np.abs(at_zero).max())}, not 0, so the zeros cannot be "
                        "folded into the weights; export the model with its masks instead."
                    )
        bn = [
            by_name[n]
            for n in chain[1:]
            if isinstance(by_name[n], keras.layers.BatchNormalization)
        ]
        if bn and not bn[0].scale:
            raise ValueError(
                f"The mask of {conv_name!r} cannot be folded into BatchNormalization "
                f"{bn[0].name!r}, which has no scale (gamma); export the model with its masks."
            )
        plans[conv_name] = (bn[0].name if bn else None, values)

    def call(layer, original, *args, **kwargs):
        if isinstance(original, FilterMask):
            return args[0]
        if isinstance(original, PartiallyFrozenBatchNormalization):
            # Per-channel freezing only matters while training: serve plain
            # BatchNormalization.
            layer = keras.layers.BatchNormalization.from_config(original.get_config())
            outputs = layer(*args, **kwargs)
            for weight in ("gamma", "beta", "moving_mean", "moving_variance"):
                if getattr(original, weight, None) is not None:
                    getattr(layer, weight).assign(getattr(original, weight))
            return outputs
        return layer(*args, **kwargs)

    folded = surgery.rebuild(flat, call, name=name)
    for conv_name, (bn_name, values) in plans.items():
        if bn_name is not None:
            bn = folded.get_layer(bn_name)
            variables = [bn.gamma] + ([bn.beta] if bn.center else [])
            for variable in variables:
                variable.assign(np.asarray(variable.numpy()) * values.astype(np.float32))
            continue
        conv = folded.get_layer(conv_name)
        kernel = np.array(conv.kernel.numpy())
        if isinstance(conv, keras.layers.DepthwiseConv2D):
            shape = kernel.shape
            kernel = (kernel.reshape(shape[:2] + (-1,)) * values.astype(np.float32)).reshape(shape)
        else:
            kernel = kernel * values.astype(np.float32)
        conv.kernel.assign(kernel)
        if conv.use_bias:
            conv.bias.assign(np.asarray(conv.bias.numpy()) * values.astype(np.float32))
    return folded


__all__ = [
    "BN_STATISTICS",
    "REINIT_BATCHNORM",
    "add_filter_masks",
    "batchnorm_statistics_gap",
    "filter_masks",
    "filter_transfer_summary",
    "fold_filter_masks",
    "next_layers",
    "reinitialize_filters",
    "selective_filter_transfer",
    "set_reinitialized_batchnorm",
]
