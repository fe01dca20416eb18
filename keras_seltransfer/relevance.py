"""Filter relevance: how each pretrained conv filter responds to the target data.

Selective filter transfer (Jung & Kim, 2019) transfers only the pretrained
filters that are relevant to the target data, relevance being measured
statistically; the paper's abstract does not say how. This module runs a
pretrained network over a `tf.data` pipeline of (target) images and scores
every filter of every `Conv2D` and `DepthwiseConv2D` layer with one of
these statistics [inferred, see DESIGN.md §3.3]:

- `"mean"`: the mean of the filter's response over all images and spatial
  positions.
- `"frequency"`: the fraction of those responses that are positive (how
  often the filter fires).
- `"kl"`: the symmetric KL divergence between the distribution of the
  filter's responses on source images and on target images, over
  equal-mass bins fitted on the target data (the histograms of the
  selective joint fine-tuning descriptors: `retrieval.descriptors`).

Where a filter's response is read: see `response_points` (after the conv's
BatchNormalization and activation when it has them).

Everything streams: per batch only sums are kept (per-channel sums and
counts, or `[channels, bins]` histogram sums), so memory does not grow with
the data. The passes run through `strategy.run` and are reduced with
`strategy.reduce`, so they work plainly and under any `tf.distribute`
strategy (the model's own by default).

Selection is separate and pure: `select_top_fraction` (keep the best
`ratio` of a layer), `select_above_threshold`, `select_filters` (per layer)
and `prune_lowest` (grow a pruned set, for `RelevancePruning`).

Reference:
    Jung & Kim, "Selective filter transfer", 2019.
"""

import math

import keras
import numpy as np
import tensorflow as tf

from keras_seltransfer.models import surgery
from keras_seltransfer.retrieval.descriptors import describe_batch
from keras_seltransfer.retrieval.descriptors import fit_bin_edges
from keras_seltransfer.retrieval.filter_banks import _ACTIVATION_LAYER_TYPES
from keras_seltransfer.retrieval.filter_banks import _has_fused_activation
from keras_seltransfer.retrieval.similarity import DEFAULT_EPS
from keras_seltransfer.retrieval.similarity import symmetric_kl
from keras_seltransfer.utils.validation import check_int

STATISTICS = ("mean", "frequency", "kl")

# The sign that turns a statistic into a relevance (higher is more relevant).
RELEVANCE_SIGN = {"mean": 1.0, "frequency": 1.0, "kl": -1.0}

CONV_TYPES = (keras.layers.Conv2D, keras.layers.DepthwiseConv2D)

# Ratios are compared after rounding to this many decimals, so that
# `0.3 * 10` (3.0000000000000004 in binary) counts as 3 filters, not 4.
_RATIO_DECIMALS = 9


def _check_statistic(statistic):
    if statistic not in STATISTICS:
        raise ValueError(
            f"`statistic` must be one of {STATISTICS}. Received: statistic={statistic!r}"
        )
    return statistic


def _channel_axis(layer):
    return -1 if getattr(layer, "data_format", "channels_last") == "channels_last" else 1


def _bn_axis(layer):
    axis = layer.axis
    if isinstance(axis, (list, tuple)):
        if len(axis) != 1:
            return None
        axis = axis[0]
    return axis


def _follows_channels(layer, conv):
    """Whether a BatchNormalization `layer` normalises `conv`'s channel axis."""
    axis = _bn_axis(layer)
    if axis is None:
        return False
    rank = 4
    return axis % rank == _channel_axis(conv) % rank


def conv_layer_names(model, layers=None):
    """Names of the conv layers of `model` to score, in graph order.

    Args:
        model: a functional `keras.Model` (nested functional models are
            looked into).
        layers: None (every `Conv2D` and `DepthwiseConv2D`, including
            subclasses), a regular expression matched against layer names
            (`re.search`), or a list of conv layer names.

    Returns:
        A list of layer names.

    Raises:
        ValueError: if nothing matches, a name is missing or is not a conv
            layer.
    """
    flat = surgery.flatten(model)
    all_convs = [layer.name for layer in flat.layers if isinstance(layer, CONV_TYPES)]
    if layers is None:
        names = all_convs
    elif isinstance(layers, str):
        names = surgery.matching_layers(flat, CONV_TYPES, layers)
    else:
        try:
            names = [str(name) for name in layers]
        except TypeError:
            raise ValueError(
                "`layers` must be None, a regular expression or a list of conv layer "
                f"names. Received: layers={layers!r}"
            ) from None
        by_name = {layer.name: layer for layer in flat.layers}
        for name in names:
            if name not in by_name:
                raise ValueError(
                    f"Model {model.name!r} has no layer named {name!r}. "
                    f"Received: layers={layers!r}"
                )
            if not isinstance(by_name[name], CONV_TYPES):
                raise ValueError(
                    f"Layer {name!r} is a {type(by_name[name]).__name__}, not a Conv2D or "
                    f"DepthwiseConv2D layer. Received: layers={layers!r}"
                )
        if len(set(names)) != len(names):
            raise ValueError(f"`layers` must name each layer once. Received: layers={layers!r}")
        order = {name: i for i, name in enumerate(all_convs)}
        names = sorted(names, key=order.__getitem__)
    if not names:
        raise ValueError(
            f"Model {model.name!r} has no Conv2D or DepthwiseConv2D layer to score"
            + (f" matching {layers!r}" if layers is not None else "")
            + f". Received: layers={layers!r}"
        )
    return names


def response_chains(model, layers=None):
    """The layers from each conv layer to the point its response is read at.

    A filter's response is read after what belongs to it alone [inferred]:
    the conv's output; then, if that output feeds exactly one layer and it
    is a BatchNormalization over the conv's channel axis, that layer's
    output; then, if *that* feeds exactly one activation layer (`ReLU`,
    `Activation`, `LeakyReLU`, `PReLU`, `ELU`), its output. A conv with a
    fused non-linear activation (`activation="relu"`) is read at its own
    output. So conv -> BN -> ReLU (small_cnn, ResNet, MobileNet) is read
    post-activation, conv -> BN -> Add (a residual branch's last conv, a
    linear bottleneck) after the BN, and a conv feeding a concatenation
    (DenseNet) at the conv itself. A BatchNormalization or activation layer
    called more than once (shared) ends the chain before it.

    Args:
        model: a functional `keras.Model`.
        layers: which conv layers (see `conv_layer_names`).

    Returns:
        A dict `{conv_name: [conv_name, (bn_name), (activation_name)]}` in
        graph order; the last name of each chain is its response point.

    Raises:
        ValueError: as `conv_layer_names`, or for a conv layer called more
            than once (a shared layer).
    """
    flat = surgery.flatten(model)
    names = conv_layer_names(flat, layers)
    consumers = surgery.consumers(flat)
    by_name = {layer.name: layer for layer in flat.layers}
    calls = {
        spec["name"]: len(spec.get("inbound_nodes", [])) for spec in flat.get_config()["layers"]
    }
    shared = [name for name in names if calls.get(name, 0) > 1]
    if shared:
        raise ValueError(
            f"Conv layers {shared} are called more than once in model {model.name!r}; a "
            "shared layer's filters have no single response to score. "
            f"Received: layers={layers!r}"
        )
    chains = {}
    for name in names:
        conv = by_name[name]
        chain = [name]
        if not _has_fused_activation(conv):
            following = consumers[name]
            if (
                len(following) == 1
                and calls.get(following[0], 0) == 1
                and isinstance(by_name[following[0]], keras.layers.BatchNormalization)
                and _follows_channels(by_name[following[0]], conv)
            ):
                chain.append(following[0])
                following = consumers[following[0]]
            if (
                len(following) == 1
                and calls.get(following[0], 0) == 1
                and isinstance(by_name[following[0]], _ACTIVATION_LAYER_TYPES)
            ):
                chain.append(following[0])
        chains[name] = chain
    return chains


def response_points(model, layers=None):
    """`{conv_name: name of the layer whose output is its filters' response}`
    (see `response_chains` for the rule)."""
    return {conv: chain[-1] for conv, chain in response_chains(model, layers).items()}


def _image_batches(data, name):
    """`data` as a dataset of image batches (labels and weights dropped)."""
    if not isinstance(data, tf.data.Dataset):
        raise ValueError(
            f"`{name}` must be a tf.data.Dataset of image batches or (images, labels) "
            f"batches. Received: {name} of type {type(data).__name__}"
        )
    spec = data.element_spec
    if isinstance(spec, (tuple, list)):
        data = data.map(lambda *element: element[0])
        spec = spec[0]
    if not isinstance(spec, tf.TensorSpec) or spec.shape.rank != 4:
        raise ValueError(
            f"`{name}` must yield batches of images [batch, height, width, channels] "
            f"(batch the dataset first). Received: {name}.element_spec={data.element_spec}"
        )
    return data


class FilterResponses:
    """The responses of a model's conv filters, read where `response_points` says.

    One `keras.Model` from the model's input to every response point
    computes all layers' responses in one pass, sharing the model's
    weights (so it follows the weights as they train); the model runs in
    inference mode (BatchNormalization uses its moving statistics, dropout
    is off). It is also a filter bank in the sense of
    `keras_seltransfer.retrieval.filter_banks` (`groups`, `num_channels`,
    `__call__`), which is how the "kl" statistic reuses the descriptors'
    equal-mass bins and histograms.

    The statistics are computed with `statistics` (or the module functions
    `filter_statistics` / `filter_relevance`, which build one of these);
    keeping one object reuses its traced `tf.function`s across calls.

    Args:
        model: a functional `keras.Model` with one image input.
        layers: which conv layers (see `conv_layer_names`).

    Call arguments:
        images: float `[batch, height, width, channels]` images as the
            model takes them.

    Returns:
        A list of float32 tensors `[batch, height_l, width_l, filters_l]`,
        one per conv layer (channels last even for channels-first layers).

    Raises:
        ValueError: for a model with several inputs, or as
            `response_chains`.

    Reference:
        Jung & Kim, "Selective filter transfer", 2019.
    """

    def __init__(self, model, layers=None):
        flat = surgery.flatten(model)
        if len(flat.inputs) != 1:
            raise ValueError(
                "FilterResponses needs a model with exactly one (image) input. "
                f"Received: a model with {len(flat.inputs)} inputs"
            )
        self.chains = response_chains(flat, layers)
        taps = []
        for conv_name, chain in self.chains.items():
            tap = flat.get_layer(chain[-1]).output
            if _channel_axis(flat.get_layer(conv_name)) == 1:
                tap = keras.layers.Permute((2, 3, 1), name=f"{conv_name}_nhwc_response")(tap)
            taps.append(tap)
        self.model = model
        self._model = keras.Model(flat.inputs[0], taps, name=f"{model.name}_filter_responses")
        self._groups = [(name, int(tap.shape[-1])) for name, tap in zip(self.chains, taps)]
        strategy = getattr(model, "distribute_strategy", None)
        self.strategy = strategy or tf.distribute.get_strategy()
        self._functions = {}

    @property
    def layers(self):
        """The scored conv layer names, in output order."""
        return list(self.chains)

    @property
    def points(self):
        """`{conv_name: response point layer name}`."""
        return {conv: chain[-1] for conv, chain in self.chains.items()}

    @property
    def groups(self):
        return list(self._groups)

    @property
    def num_channels(self):
        return sum(channels for _, channels in self._groups)

    def __call__(self, images):
        images = tf.cast(tf.convert_to_tensor(images), tf.float32)
        outputs = self._model(images, training=False)
        if not isinstance(outputs, (list, tuple)):
            outputs = [outputs]
        return [tf.cast(o, tf.float32) for o in outputs]

    def get_config(self):
        return {"type": "filter_responses", "layers": self.layers, "model": self.model.name}

    def _sum_over(self, kind, replica_fn, dataset, strategy, *extra):
        """Sums the float32 outputs of `replica_fn(images, *extra)` over the
        batches and replicas of `dataset`, in float64 on the host."""
        distributed = strategy.experimental_distribute_dataset(dataset)
        # A signature from the data's spec (batch size unknown) traces each
        # function once, not once per batch shape.
        signature = [distributed.element_spec] + [tf.TensorSpec(e.shape, e.dtype) for e in extra]
        key = (kind, id(strategy), str(signature))
        if key not in self._functions:

            @tf.function(input_signature=signature)
            def step(x, *args):
                outputs = strategy.run(replica_fn, args=(x, *args))
                return tf.nest.map_structure(
                    lambda v: strategy.reduce(tf.distribute.ReduceOp.SUM, v, axis=None),
                    outputs,
                )

            # The strategy is kept with its function so that its id is not reused.
            self._functions[key] = (step, strategy)
        step = self._functions[key][0]
        totals = None
        for x in distributed:
            values = [np.asarray(v, np.float64) for v in tf.nest.flatten(step(x, *extra))]
            totals = values if totals is None else [t + v for t, v in zip(totals, values)]
        return totals

    def _moments(self, x):
        sums, positives, positions = [], [], []
        for r in self(x):
            sums.append(tf.reduce_sum(r, axis=[0, 1, 2]))
            positives.append(tf.reduce_sum(tf.cast(r > 0, tf.float32), axis=[0, 1, 2]))
            shape = tf.shape(r)
            positions.append(tf.cast(shape[0] * shape[1] * shape[2], tf.float32))
        return sums, positives, positions

    def _histograms(self, x, edges):
        return tf.reduce_sum(describe_batch(self, edges, x), axis=0), tf.cast(
            tf.shape(x)[0], tf.float32
        )

    def _split(self, values):
        result, start = {}, 0
        for name, channels in self._groups:
            result[name] = values[start : start + channels]
            start += channels
        return result

    def statistics(
        self,
        data,
        statistic="mean",
        *,
        source_data=None,
        num_bins=32,
        fine_bins=2000,
        strategy=None,
    ):
        """Per-filter values of one statistic (see `filter_statistics`)."""
        _check_statistic(statistic)
        strategy = strategy or self.strategy
        images = _image_batches(data, "data")
        if statistic in ("mean", "frequency"):
            totals = self._sum_over("moments", self._moments, images, strategy)
            n = len(self._groups)
            if totals is None or not sum(totals[2 * n :]) > 0:
                raise ValueError(
                    "`data` must yield at least one image. Received: an empty data set"
                )
            numerators = totals[:n] if statistic == "mean" else totals[n : 2 * n]
            return {
                name: numerator / positions
                for (name, _), numerator, positions in zip(
                    self._groups, numerators, totals[2 * n :]
                )
            }
        if source_data is None:
            raise ValueError(
                "The 'kl' statistic compares each filter's responses on source and "
                "target images: pass a sample of the source images as `source_data`. "
                "Received: source_data=None"
            )
        sources = _image_batches(source_data, "source_data")
        num_bins = check_int(num_bins, "num_bins", 2, 1000)
        try:
            edges = fit_bin_edges(
                self, images, num_bins=num_bins, fine_bins=fine_bins, progress=False
            )
        except ValueError as e:
            if "at least one batch" in str(e):
                raise ValueError(
                    "`data` must yield at least one image. Received: an empty data set"
                ) from None
            raise
        edges = tf.constant(edges, tf.float32)
        distributions = []
        for which, dataset in (("data", images), ("source_data", sources)):
            totals = self._sum_over("histograms", self._histograms, dataset, strategy, edges)
            if totals is None or not totals[1] > 0:
                raise ValueError(
                    f"`{which}` must yield at least one image. Received: an empty data set"
                )
            distributions.append(totals[0] / totals[1])
        target, source = distributions
        divergence = np.array(
            [
                symmetric_kl(p[None], q[None], channel_weights=[1.0], eps=DEFAULT_EPS)
                for p, q in zip(target, source)
            ]
        )
        # A filter whose target responses are (nearly) constant lands in one
        # bin and says nothing about the target images; it must not pass as
        # "identical on both data sets" when it is constant on both.
        divergence[target.max(axis=1) >= 1.0 - 1e-6] = np.inf
        return self._split(divergence)

    def relevance(self, data, statistic="mean", **kwargs):
        """Per-filter relevance, higher is more relevant (see `filter_relevance`)."""
        values = self.statistics(data, statistic, **kwargs)
        sign = RELEVANCE_SIGN[statistic]
        return {name: sign * v for name, v in values.items()}


def _responses(model, layers):
    if isinstance(model, FilterResponses):
        if layers is not None and list(layers) != model.layers:
            raise ValueError(
                "`layers` must be None when `model` is a FilterResponses (it fixes its "
                f"own layers {model.layers}). Received: layers={layers!r}"
            )
        return model
    return FilterResponses(model, layers)


def filter_statistics(
    model,
    data,
    statistic="mean",
    *,
    source_data=None,
    layers=None,
    num_bins=32,
    fine_bins=2000,
    strategy=None,
):
    """Streams a data set through a model and measures every conv filter.

    With r the response of one filter (see `response_points`) at every
    spatial position of every image:

    - `"mean"`: mean(r), pooled over all positions of all images.
    - `"frequency"`: mean(r > 0), likewise (an exact 0, e.g. a ReLU's, is
      not positive).
    - `"kl"`: 0.5 * [KL(p || q) + KL(q || p)] with
      `KL(p || q) = sum_b p_b (log(p_b + eps) - log(q_b + eps))`, eps =
      2.2e-16 (the retrieval distance of `symmetric_kl`, one channel), where
      p and q are the filter's response distributions on `data` (the
      target) and on `source_data` over `num_bins` bins whose edges are
      fitted per filter on `data` to hold equal target mass
      (`fit_bin_edges`, two passes). A distribution is the mean over images
      of each image's normalised histogram (`describe_batch`), so every
      image weighs the same; for images of one size, as the input
      pipelines make them, that is the histogram of all responses pooled.
      A filter whose target responses fall in a single bin (constant on
      the target data, such as a dead ReLU) gets an infinite divergence.

    Args:
        model: a functional `keras.Model` with one image input, or a
            `FilterResponses` (which reuses its traced functions).
        data: a finite `tf.data.Dataset` of image batches or
            `(images, labels)` batches: the target images, in the form the
            model takes (for this toolkit's models, raw pixels in [0, 255]).
            Read once ("mean", "frequency") or three times ("kl"), so it
            must yield the same images each time (no random augmentation).
        statistic: one of `STATISTICS`.
        source_data: like `data`, a sample of the source images; required
            for "kl" and read once.
        layers: which conv layers (see `conv_layer_names`).
        num_bins: "kl": bins per filter (2 to 1000).
        fine_bins: "kl": fine intervals used to fit the equal-mass edges.
        strategy: the `tf.distribute.Strategy` to run on; default the
            model's (`model.distribute_strategy`). The bin edges of "kl" are
            fitted in plain passes on the default device (the same on every
            worker), the sums under the strategy.

    Returns:
        A dict `{conv_layer_name: np.float64 array [filters]}` in graph
        order.

    Raises:
        ValueError: for an unknown statistic, data that is not a data set of
            image batches, an empty data set, or "kl" without `source_data`.

    Example:

    ```python
    target = make_dataset(train, 64, batch_size=64, channels=1)
    means = filter_statistics(classifier, target, "mean")
    means["block1_conv"].shape  # (32,)
    ```

    Reference:
        Jung & Kim, "Selective filter transfer", 2019.
    """
    _check_statistic(statistic)
    return _responses(model, layers).statistics(
        data,
        statistic,
        source_data=source_data,
        num_bins=num_bins,
        fine_bins=fine_bins,
        strategy=strategy,
    )


def filter_relevance(model, data, statistic="mean", **kwargs):
    """Per-filter relevance to the target data: higher is more relevant.

    The statistic of `filter_statistics` times `RELEVANCE_SIGN`: a filter
    is more relevant the stronger ("mean") or the more often ("frequency")
    it responds to the target images, and the *less* its response
    distribution on the target images diverges from the one on the source
    images ("kl") [inferred: a filter that sees the target data as it saw
    the data it was trained on keeps doing what it learned, and what the
    next layers learned to expect of it; a filter whose target responses
    are constant has infinite divergence, so it ranks last].

    Args:
        model: as in `filter_statistics`.
        data: as in `filter_statistics`.
        statistic: one of `STATISTICS`.
        **kwargs: the other `filter_statistics` arguments.

    Returns:
        A dict `{conv_layer_name: np.float64 array [filters]}`.

    Raises:
        ValueError: as `filter_statistics`.
    """
    _check_statistic(statistic)
    return _responses(model, kwargs.pop("layers", None)).relevance(data, statistic, **kwargs)


def _check_scores(scores, name="scores"):
    try:
        array = np.asarray(scores, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(
            f"`{name}` must be a 1-D array of numbers. Received: {name} of type "
            f"{type(scores).__name__}"
        ) from None
    if array.ndim != 1:
        raise ValueError(f"`{name}` must be 1-D [filters]. Received: {name}.shape={array.shape}")
    if np.isnan(array).any():
        raise ValueError(
            f"`{name}` must not contain NaN. Received: NaN at positions "
            f"{np.flatnonzero(np.isnan(array))[:10].tolist()}"
        )
    return array


def _check_fraction(value, name, low_open=False, high_open=False):
    ok = isinstance(value, (int, float, np.number)) and not isinstance(value, bool)
    if ok:
        value = float(value)
        ok = (value > 0 if low_open else value >= 0) and (value < 1 if high_open else value <= 1)
    if not ok:
        interval = f"{'(' if low_open else '['}0, 1{')' if high_open else ']'}"
        raise ValueError(f"`{name}` must be a number in {interval}. Received: {name}={value!r}")
    return value


def kept_count(num_filters, ratio):
    """How many of `num_filters` filters a ratio keeps: `ceil(ratio * n)`
    (after rounding the product to 9 decimals, so 0.3 of 10 is 3), so any
    positive ratio keeps at least one filter and the kept share is never
    below `ratio`."""
    ratio = _check_fraction(ratio, "ratio")
    return int(math.ceil(round(ratio * num_filters, _RATIO_DECIMALS)))


def _ranking(scores):
    # Descending score; `kind="stable"` on the negated scores puts, among
    # equal scores, the lower index first.
    return np.argsort(-scores, kind="stable")


def select_top_fraction(scores, ratio):
    """The filters of one layer with the highest scores.

    Keeps `kept_count(n, ratio)` = ceil(ratio * n) filters: ratio 0 keeps
    none, any positive ratio at least one, ratio 1 all. Ties: among equal
    scores the filter with the lower index is kept first, so the result is
    deterministic; infinite scores rank as usual (-inf last).

    Args:
        scores: 1-D array `[filters]` of relevance scores (no NaN).
        ratio: fraction to keep, in [0, 1].

    Returns:
        A bool array `[filters]`, True for kept filters.

    Raises:
        ValueError: for NaN scores, scores that are not 1-D, or a ratio
            outside [0, 1].

    Example:

    >>> select_top_fraction([0.1, 0.5, 0.5, 0.2], 0.5)
    array([False,  True,  True, False])
    """
    scores = _check_scores(scores)
    keep = np.zeros(scores.shape, bool)
    keep[_ranking(scores)[: kept_count(len(scores), ratio)]] = True
    return keep


def select_above_threshold(scores, threshold):
    """The filters whose score is at or above `threshold` (ties are kept).

    Args:
        scores: 1-D array `[filters]` of relevance scores (no NaN).
        threshold: a finite or infinite number (not NaN).

    Returns:
        A bool array `[filters]`, True for kept filters; it may keep none
        or all.

    Raises:
        ValueError: for NaN scores or threshold, or scores that are not 1-D.

    Example:

    >>> select_above_threshold([0.1, 0.5, 0.2], 0.2)
    array([False,  True,  True])
    """
    scores = _check_scores(scores)
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float, np.number)) or (
        math.isnan(threshold)
    ):
        raise ValueError(f"`threshold` must be a number. Received: threshold={threshold!r}")
    return scores >= float(threshold)


def select_filters(relevance, *, ratio=None, threshold=None):
    """Applies one selection rule to every layer.

    Args:
        relevance: `{layer_name: scores}` as `filter_relevance` returns.
        ratio: keep the top `ratio` of every layer (`select_top_fraction`).
        threshold: keep the filters scoring at least `threshold`
            (`select_above_threshold`). Exactly one of `ratio` and
            `threshold` must be given.

    Returns:
        A dict `{layer_name: bool array [filters]}`, True for kept filters.

    Raises:
        ValueError: unless exactly one rule is given, or as the rules do.
    """
    if (ratio is None) == (threshold is None):
        raise ValueError(
            "Pass exactly one of `ratio` and `threshold`. "
            f"Received: ratio={ratio!r}, threshold={threshold!r}"
        )
    if ratio is not None:
        _check_fraction(ratio, "ratio")
        return {name: select_top_fraction(s, ratio) for name, s in relevance.items()}
    return {name: select_above_threshold(s, threshold) for name, s in relevance.items()}


def prune_lowest(scores, pruned, fraction):
    """Grows a layer's pruned set to `fraction` of its filters, lowest scores first.

    Pruning is monotone: filters already pruned stay pruned, and the new
    ones are the lowest-scoring of the others until
    `n - kept_count(n, 1 - fraction)` = floor(fraction * n) filters are
    pruned (at least one filter always survives, as fraction < 1). When
    more are already pruned, nothing changes. Ties: among equal scores the
    filter with the higher index is pruned first (the mirror of
    `select_top_fraction`).

    Args:
        scores: 1-D array `[filters]` of relevance scores (no NaN; the
            scores of pruned filters are ignored).
        pruned: bool array `[filters]`, the filters pruned so far.
        fraction: the share of filters to have pruned, in [0, 1).

    Returns:
        The new bool array `[filters]` of pruned filters (a superset of
        `pruned`).

    Raises:
        ValueError: for bad scores, a `pruned` of another shape, or a
            fraction outside [0, 1).

    Example:

    >>> prune_lowest([0.3, 0.1, 0.2, 0.4], [False, False, False, True], 0.5)
    array([False,  True, False,  True])
    """
    scores = _check_scores(scores)
    pruned = np.asarray(pruned, dtype=bool)
    if pruned.shape != scores.shape:
        raise ValueError(
            f"`pruned` must have the shape of `scores` {scores.shape}. "
            f"Received: pruned.shape={pruned.shape}"
        )
    fraction = _check_fraction(fraction, "fraction", high_open=True)
    keep_count = kept_count(len(scores), 1.0 - fraction)
    # Unpruned filters first, by descending score, lower index first among
    # ties; pruned filters after all of them (whatever their score, even
    # when unpruned ones score -inf).
    order = np.lexsort(
        (np.arange(len(scores)), -np.where(pruned, 0.0, scores), pruned)
    )
    keep = np.zeros(scores.shape, bool)
    keep[order[:keep_count]] = True
    return pruned | ~keep


__all__ = [
    "CONV_TYPES",
    "FilterResponses",
    "RELEVANCE_SIGN",
    "STATISTICS",
    "conv_layer_names",
    "filter_relevance",
    "filter_statistics",
    "kept_count",
    "prune_lowest",
    "response_chains",
    "response_points",
    "select_above_threshold",
    "select_filters",
    "select_top_fraction",
]
