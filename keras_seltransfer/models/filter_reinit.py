"""Re-initialising conv filters in place, and the BatchNorm statistics they need.

`reinitialize_filters` starts chosen filters of a pretrained model afresh
with their layers' own initializers (kernel slice, bias, the matching
BatchNormalization channel and optionally the next layers' input slices),
as selective filter transfer (`keras_seltransfer.models.filter_transfer`)
and `RelevancePruning` do with the filters they do not keep.
`stream_channel_moments` measures per-channel statistics on data, for the
re-initialised channels' BatchNormalization.
"""

import zlib

import keras
import numpy as np
import tensorflow as tf

from keras_seltransfer.layers.partially_frozen_batch_normalization import (
    PartiallyFrozenBatchNormalization,
)
from keras_seltransfer.models import surgery
from keras_seltransfer.models.filter_masking import ChannelGraph
from keras_seltransfer.models.filter_masking import filter_masks
from keras_seltransfer.models.response_points import response_chains
from keras_seltransfer.utils.histograms import image_batches
from keras_seltransfer.utils.validation import check_choice


BN_STATISTICS = ("target", "initializer")


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


def stream_channel_moments(strategy, submodel, channel_axes, data):
    """Per-channel means and population variances of a model's outputs on data.

    Args:
        strategy: the `tf.distribute` strategy the passes run under.
        submodel: a `keras.Model` from images to one or more rank-4 outputs.
        channel_axes: the channel axis (-1 or 1) of each output.
        data: a `tf.data.Dataset` of image batches or `(images, ...)`
            batches.

    Returns:
        A function that runs one pass over `data` and returns, per output,
        `(mean, variance)` float64 arrays `[channels]` over all images and
        positions (population variance).

    Raises:
        ValueError: if `data` is not a data set of image batches; the
            returned function, if `data` yields no image.

    Example:

    >>> import keras
    >>> import numpy as np
    >>> import tensorflow as tf
    >>> from keras_seltransfer import models
    >>> from keras_seltransfer.models.filter_reinit import stream_channel_moments
    >>> backbone = models.small_cnn((16, 16, 1), widths=(4, 8))
    >>> submodel = keras.Model(backbone.input, backbone.get_layer("block1_conv").output)
    >>> data = tf.data.Dataset.from_tensor_slices(np.ones((4, 16, 16, 1), "float32")).batch(2)
    >>> run = stream_channel_moments(tf.distribute.get_strategy(), submodel, [-1], data)
    >>> [(mean, variance)] = run()
    >>> mean.shape, variance.shape
    ((4,), (4,))
    """
    images = image_batches(data, "data")

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
    run = stream_channel_moments(
        strategy,
        submodel,
        [surgery.channel_axis(graph.by_name[conv]) for conv in convs],
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

    Example:

    >>> import numpy as np
    >>> from keras_seltransfer import models
    >>> classifier = models.build_classifier(models.small_cnn((16, 16, 1), widths=(4, 8)), 3)
    >>> masked = models.add_filter_masks(classifier)
    >>> filters = {"block1_conv": np.array([True, False, False, True])}
    >>> models.reinitialize_filters(masked, filters, seed=0, reinit_next=True)
    {'block1_conv': {'reinitialized': 2, 'next_layers': ['block2_conv']}}
    >>> models.filter_transfer_summary(masked)["block1_conv"]
    {'filters': 4, 'transferred': 2, 'reinitialized': 2, 'masked': 0}
    """
    check_choice(bn_statistics, "bn_statistics", BN_STATISTICS)
    graph = ChannelGraph(model)
    by_name = graph.by_name
    if not isinstance(filters, dict):
        raise ValueError(
            "`filters` must be a dict {conv layer name: bool array [filters]}. "
            f"Received: filters of type {type(filters).__name__}"
        )
    chains = response_chains(graph.flat, list(filters)) if filters else {}
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


__all__ = [
    "BN_STATISTICS",
    "reinitialize_filters",
    "stream_channel_moments",
]
