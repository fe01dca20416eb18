"""Which filters to keep, from their relevance scores: pure selection rules.

Selective filter transfer (Jung & Kim, 2019) keeps, per conv layer, the
pretrained filters most relevant to the target data
(`keras_seltransfer.models.relevance`) and re-initialises or masks the rest.
These rules take the scores as NumPy arrays, so they are tested without a
model: `select_top_fraction` (keep the best `ratio` of a layer),
`select_above_threshold`, `select_filters` (per layer, from a relevance
dict) and `prune_lowest` (grow a pruned set, for `RelevancePruning`).

Reference:
    Jung & Kim, "Selective filter transfer", 2019.
"""

import math

import numpy as np

from keras_seltransfer.utils.validation import check_fraction


# Ratios are compared after rounding to this many decimals, so that
# `0.3 * 10` (3.0000000000000004 in binary) counts as 3 filters, not 4.
_RATIO_DECIMALS = 9


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


def kept_count(num_filters, ratio):
    """How many of `num_filters` filters a ratio keeps: `ceil(ratio * n)`
    (after rounding the product to 9 decimals, so 0.3 of 10 is 3), so any
    positive ratio keeps at least one filter and the kept share is never
    below `ratio`.

    Example:

    >>> from keras_seltransfer.relevance import kept_count
    >>> kept_count(10, 0.3), kept_count(4, 0.1), kept_count(4, 0.0)
    (3, 1, 0)
    """
    ratio = check_fraction(ratio, "ratio")
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

    Example:

    >>> from keras_seltransfer.relevance import select_filters
    >>> select_filters({"conv1": [0.1, 0.9, 0.5], "conv2": [0.3, 0.2]}, ratio=0.5)
    {'conv1': array([False,  True,  True]), 'conv2': array([ True, False])}
    >>> select_filters({"conv1": [0.1, 0.9, 0.5]}, threshold=0.5)
    {'conv1': array([False,  True,  True])}
    """
    if (ratio is None) == (threshold is None):
        raise ValueError(
            "Pass exactly one of `ratio` and `threshold`. "
            f"Received: ratio={ratio!r}, threshold={threshold!r}"
        )
    if ratio is not None:
        check_fraction(ratio, "ratio")
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
    fraction = check_fraction(fraction, "fraction", high_open=True)
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
    "kept_count",
    "prune_lowest",
    "select_above_threshold",
    "select_filters",
    "select_top_fraction",
]
