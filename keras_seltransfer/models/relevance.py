"""Filter relevance: how each pretrained conv filter responds to the target data.

Selective filter transfer (Jung & Kim, 2019) transfers only the pretrained
filters that are relevant to the target data, relevance being measured
statistically; the paper's abstract does not say how. This module runs a
pretrained network over a `tf.data` pipeline of (target) images and scores
every filter of every `Conv2D` and `DepthwiseConv2D` layer with one of
these statistics [inferred: this package's choices, not the paper's]:

- `"mean"`: the mean of the filter's response over all images and spatial
  positions.
- `"frequency"`: the fraction of those responses that are positive (how
  often the filter fires).
- `"kl"`: the symmetric KL divergence between the distribution of the
  filter's responses on source images and on target images, over
  equal-mass bins fitted on the target data (the histograms of the
  selective joint fine-tuning descriptors: `utils.histograms`).

Where a filter's response is read: see `models.response_points` (after the
conv's BatchNormalization and activation when it has them).

Every conv layer is measured at once: one `keras.Model` from the input to
all response points (`response_tensors`) runs once per batch, and per batch
only sums are kept (per-filter sums and counts, or `[filters, bins]`
histogram sums, in float32, accumulated over the batches in float64 on the
host), so memory does not grow with the data. With N images, L scored layers, F filters in all and one
forward pass costing C:

- "mean", "frequency": one pass over the data, N * C time; O(F) host
  memory, plus the device memory of one batch's forward pass with every
  response kept until its sums are taken.
- "kl": three passes over the target data (range, fine counts: the bin
  fitting of `utils.histograms`; then the histograms) and one over the
  source data, (3 N_target + N_source) * C time; O(F * fine_bins) host
  memory for the fitting, O(F * num_bins) after.

L does not multiply the time: the layers share the forward pass (a model
per layer would cost about L / 2 forward passes per image and one trace
per layer). The network's graph is traced once for "mean" and
"frequency" and three times for "kl" (a few seconds each for a deep
network on a CPU; a `FilterResponses` keeps its traces for later calls),
except that data sets known to hold at most `EAGER_BATCHES` batches are
summed eagerly. The passes run
through `strategy.run` and are reduced with `strategy.reduce`, so they
work plainly and under any `tf.distribute` strategy (the model's own by
default).

Selection is separate and pure (`models.filter_selection`):
`select_top_fraction` (keep the best `ratio` of a layer),
`select_above_threshold`, `select_filters` (per layer) and `prune_lowest`
(grow a pruned set, for `RelevancePruning`).

Reference:
    Jung & Kim, "Selective filter transfer", 2019.
"""

import keras
import numpy as np
import tensorflow as tf

from keras_seltransfer.models.response_points import response_chains
from keras_seltransfer.models.response_points import response_tensors
from keras_seltransfer.utils.divergence import DEFAULT_EPS
from keras_seltransfer.utils.divergence import symmetric_kl
from keras_seltransfer.utils.histograms import describe_batch
from keras_seltransfer.utils.histograms import fit_bin_edges
from keras_seltransfer.utils.histograms import image_batches
from keras_seltransfer.utils.validation import check_choice
from keras_seltransfer.utils.validation import check_int

STATISTICS = ("mean", "frequency", "kl")

# Data sets known to hold at most this many batches are summed eagerly:
# tracing a deep network's forward pass costs about as much as running it
# eagerly on 4 to 8 batches (DenseNet121 at 64x64 on a CPU: a trace of about
# 6 s against about 1 s an eager batch of 8), so short passes skip the trace.
EAGER_BATCHES = 4

# The sign that turns a statistic into a relevance (higher is more relevant).
RELEVANCE_SIGN = {"mean": 1.0, "frequency": 1.0, "kl": -1.0}


def check_statistic(statistic):
    """Returns `statistic` if it is one of `STATISTICS`, else raises ValueError.

    Example:

    >>> check_statistic("kl")
    'kl'
    """
    check_choice(statistic, "statistic", STATISTICS)
    return statistic


class FilterResponses:
    """The responses of a model's conv filters, read where `response_points` says.

    One `keras.Model` from the model's input to every response point
    (`response_tensors`, which also reads conv layers inside nested
    sub-models, in the graph `surgery.flatten` makes of them) computes all
    layers' responses in one pass, sharing the layers of that graph (so it
    follows the weights as they train); the model runs in
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

    Example:

    >>> import numpy as np
    >>> from keras_seltransfer import models, relevance
    >>> classifier = models.build_classifier(models.small_cnn((16, 16, 1), widths=(4, 8)), 3)
    >>> responses = relevance.FilterResponses(classifier)
    >>> [tuple(r.shape) for r in responses(np.zeros((2, 16, 16, 1), "float32"))]
    [(2, 8, 8, 4), (2, 4, 4, 8)]

    Reference:
        Jung & Kim, "Selective filter transfer", 2019.
    """

    def __init__(self, model, layers=None):
        inputs, tensors = response_tensors(model, layers, channels_last=True)
        if len(inputs) != 1:
            raise ValueError(
                "FilterResponses needs a model with exactly one (image) input. "
                f"Received: a model with {len(inputs)} inputs"
            )
        taps = list(tensors.values())
        self.model = model
        self._model = keras.Model(inputs[0], taps, name=f"{model.name}_filter_responses")
        self._groups = [(name, int(tap.shape[-1])) for name, tap in tensors.items()]
        strategy = getattr(model, "distribute_strategy", None)
        self.strategy = strategy or tf.distribute.get_strategy()
        self._functions = {}

    @property
    def layers(self):
        """The scored conv layer names, in output order."""
        return [name for name, _ in self._groups]

    @property
    def chains(self):
        """`{conv_name: chain}` (see `response_chains`)."""
        return response_chains(self.model, self.layers)

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

        def step(x, *args):
            outputs = strategy.run(replica_fn, args=(x, *args))
            return tf.nest.map_structure(
                lambda v: strategy.reduce(tf.distribute.ReduceOp.SUM, v, axis=None), outputs
            )

        batches = int(dataset.cardinality())
        if not 0 <= batches <= EAGER_BATCHES:
            # A signature from the data's spec (batch size unknown) traces
            # each function once, not once per batch shape.
            signature = [distributed.element_spec] + [
                tf.TensorSpec(e.shape, e.dtype) for e in extra
            ]
            key = (kind, id(strategy), str(signature))
            if key not in self._functions:
                # The strategy is kept with its function so that its id is not reused.
                self._functions[key] = (tf.function(step, input_signature=signature), strategy)
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
        check_statistic(statistic)
        strategy = strategy or self.strategy
        images = image_batches(data, "data")
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
        sources = image_batches(source_data, "source_data")
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

    Cost: every conv layer is measured from the same forward pass, so
    "mean" and "frequency" read `data` once and "kl" reads `data` three
    times and `source_data` once, whatever the number of layers; memory
    does not grow with the data (see the module docstring).

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
    check_statistic(statistic)
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

    Example:

    >>> import numpy as np
    >>> import tensorflow as tf
    >>> from keras_seltransfer import models, relevance
    >>> classifier = models.build_classifier(models.small_cnn((16, 16, 1), widths=(4, 8)), 3)
    >>> images = np.random.default_rng(0).uniform(0, 255, (8, 16, 16, 1)).astype("float32")
    >>> data = tf.data.Dataset.from_tensor_slices(images).batch(4)
    >>> scores = relevance.filter_relevance(classifier, data)
    >>> {name: s.shape for name, s in scores.items()}
    {'block1_conv': (4,), 'block2_conv': (8,)}
    >>> keep = relevance.select_filters(scores, ratio=0.5)
    >>> [int(k.sum()) for k in keep.values()]
    [2, 4]
    """
    check_statistic(statistic)
    return _responses(model, kwargs.pop("layers", None)).relevance(data, statistic, **kwargs)


__all__ = [
    "FilterResponses",
    "RELEVANCE_SIGN",
    "STATISTICS",
    "check_statistic",
    "filter_relevance",
    "filter_statistics",
]
