"""Symmetric KL divergence between per-channel histograms, and its checks.

A descriptor is an array `[channels, bins]`: for every channel, a normalised
histogram (the equal-mass filter-response histograms of
`keras_seltransfer.utils.histograms`). Two descriptors are compared with the
channel-weighted symmetric Kullback-Leibler divergence of the selective joint
fine-tuning paper's code:

    D(p, q) = sum_h w_h * 0.5 * [KL(p_h || q_h) + KL(q_h || p_h)]
    KL(p || q) = sum_b p_b * (log(p_b + eps) - log(q_b + eps))

This module holds the exact float64 formula (`symmetric_kl`,
`weighted_symmetric_kl`) and the argument checks shared by every user of it:
the retrieval search (`keras_seltransfer.retrieval.similarity`), the source
index and the `"kl"` filter relevance statistic.

Reference:
    Ge and Yu, "Borrowing Treasures from the Wealthy: Deep Transfer Learning
    through Selective Joint Fine-Tuning", CVPR 2017.
"""

import numpy as np

DEFAULT_EPS = 2.2e-16


# Rows of a histogram must sum to 1 within this tolerance: descriptors stored
# as float32 carry rounding, while a histogram that was never normalised is
# off by far more.
SUM_TOLERANCE = 1e-3


def symmetric_kl(p, q, channel_weights=None, eps=DEFAULT_EPS):
    """Channel-weighted symmetric KL divergence between two descriptors.

    Computes, in NumPy float64,
    `D = sum_h w_h * 0.5 * [KL(p_h || q_h) + KL(q_h || p_h)]` with
    `KL(p || q) = sum_b p_b * (log(p_b + eps) - log(q_b + eps))`, `eps`
    inside the logarithms as in the authors' code so that empty bins give
    finite terms. The two divergences are summed as
    `sum_b (p_b - q_b) * (log(p_b + eps) - log(q_b + eps))`, which equals
    their sum and makes `D(p, q) == D(q, p)` exactly.

    Args:
        p: descriptor `[channels, bins]`: one normalised histogram per
            channel (entries >= 0, each row summing to 1).
        q: descriptor of the same shape.
        channel_weights: non-negative weights `[channels]`. None gives
            uniform weights `1 / channels`, so the distance is the mean of
            the per-channel symmetric divergences. (The paper weights each
            channel by `0.5 / channels in its layer`, so that two conv
            layers count equally: pass those weights explicitly.)
        eps: positive constant added inside the logarithms.

    Returns:
        The distance, a Python float (>= 0, and 0 for identical inputs).

    Raises:
        ValueError: for descriptors of another rank or of different shapes,
            entries that are not finite or negative, rows not summing to 1,
            bad `channel_weights` or a non-positive `eps`.

    Example:

    >>> p = np.array([[0.5, 0.5], [1.0, 0.0]])
    >>> symmetric_kl(p, p)
    0.0
    """
    p = as_histograms(p, "p", rank=2)
    q = as_histograms(q, "q", rank=2)
    if p.shape != q.shape:
        raise ValueError(
            "Expected `p` and `q` to have the same shape [channels, bins]. "
            f"Received: p.shape={p.shape}, q.shape={q.shape}"
        )
    check_histograms(p, "p")
    check_histograms(q, "q")
    eps = check_eps(eps)
    half_weights = 0.5 * check_channel_weights(channel_weights, p.shape[0])
    # Same routine, on a batch of one, as the exact re-scoring in
    # `nearest_sources`, so that both give bit-identical distances.
    distance = weighted_symmetric_kl(
        p[None], np.log(p + eps)[None], q[None], np.log(q + eps)[None], half_weights
    )
    return float(distance[0])


def weighted_symmetric_kl(p, log_p, q, log_q, half_weights):
    """Exact symmetric KL of aligned batches of descriptors, in float64.

    `sum_h half_weights_h * sum_b (p_b - q_b) * (log_p_b - log_q_b)` per row,
    the sum of both divergences (see the module docstring). Inputs are not
    checked: callers pass checked descriptors and their logarithms.

    Args:
        p: float64 array `[..., channels, bins]`.
        log_p: `log(p + eps)`, same shape.
        q: float64 array broadcastable against `p`.
        log_q: `log(q + eps)`, same shape as `q`.
        half_weights: `0.5 * channel weights`, `[channels]`.

    Returns:
        float64 array `[...]` of distances.

    Example:

    >>> p = np.array([[[0.5, 0.5]]])
    >>> float(weighted_symmetric_kl(p, np.log(p), p, np.log(p), np.array([0.5]))[0])
    0.0
    """
    # The one place exact distances are computed (for `symmetric_kl` and the
    # re-scoring alike): element-wise products and sums over the last axis
    # of contiguous float64 arrays, whose rounding does not depend on the
    # other rows of the batch.
    per_channel = np.sum((p - q) * (log_p - log_q), axis=-1)
    return np.sum(per_channel * half_weights, axis=-1)


def as_histograms(value, name, rank=3, keep_float=False):
    """`value` as a contiguous float64 array of descriptors of rank `rank`.

    Args:
        value: array-like, `[channels, bins]` (rank 2) or
            `[N, channels, bins]` (rank 3).
        name: the argument's name, used in the error.
        rank: 2 or 3.
        keep_float: whether float32 arrays stay float32 (half the memory
            traffic) instead of becoming float64.

    Returns:
        A C-contiguous NumPy array (values are not checked: see
        `check_histograms`).

    Raises:
        ValueError: for non-numeric input or another rank.

    Example:

    >>> as_histograms([[0.5, 0.5]], "p", rank=2).dtype
    dtype('float64')
    """
    try:
        array = np.asarray(value)
        if not (keep_float and array.dtype == np.float32):
            array = np.asarray(array, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(
            f"Expected `{name}` to be a numeric array. "
            f"Received: {name}={type(value).__name__}"
        ) from None
    if array.ndim != rank:
        layout = "[channels, bins]" if rank == 2 else "[N, channels, bins]"
        raise ValueError(
            f"Expected `{name}` to have rank {rank}, {layout}. "
            f"Received: {name}.shape={array.shape}"
        )
    # Contiguous, so that NumPy reduces every row in the same way.
    return np.ascontiguousarray(array)


def check_histograms(array, name, row_offset=0):
    """Checks that every row of `array` is a normalised histogram.

    Entries must be finite and non-negative and each row (last axis) must
    sum to 1 within `SUM_TOLERANCE`.

    Args:
        array: NumPy array `[channels, bins]` or `[N, channels, bins]`.
        name: the argument's name, used in the error.
        row_offset: added to the reported first index, for a block that
            starts at that row of a larger array.

    Raises:
        ValueError: naming the first offending entry or row.

    Example:

    >>> check_histograms(np.array([[0.25, 0.75]]), "p")
    """
    # Two reductions decide the common, valid case: a NaN makes the minimum
    # NaN, a negative entry makes it negative, an infinity makes the sum
    # non-finite. Only then is the offending entry searched for.
    sums = np.sum(array, axis=-1, dtype=np.float64)
    lowest = np.min(array, axis=-1, initial=np.inf)
    if not (np.isfinite(sums).all() and (lowest >= 0).all()):
        _raise_bad_entry(array, name, row_offset)
    off = np.abs(sums - 1.0) > SUM_TOLERANCE
    if off.any():
        where = tuple(int(i) for i in np.argwhere(off)[0])
        index = (where[0] + row_offset,) + where[1:] if array.ndim == 3 else where
        raise ValueError(
            f"Expected every channel histogram of `{name}` to sum to 1 "
            f"(tolerance {SUM_TOLERANCE}). "
            f"Received: {name}[{', '.join(map(str, index))}].sum()={float(sums[where])!r}"
        )


def _raise_bad_entry(array, name, row_offset):
    bad = ~np.isfinite(array)
    what = "finite values"
    if not bad.any():
        bad = array < 0
        what = "non-negative values"
    if not bad.any():
        # Finite entries whose sum overflows: the sum check reports them.
        return
    where = tuple(int(i) for i in np.argwhere(bad)[0])
    index = (where[0] + row_offset,) + where[1:]
    raise ValueError(
        f"Expected `{name}` to hold {what} (normalised histograms). "
        f"Received: {name}[{', '.join(map(str, index))}]={float(array[where])!r}"
    )


def check_channel_weights(channel_weights, channels):
    """The channel weights of the distance, as a float64 array `[channels]`.

    Args:
        channel_weights: non-negative weights, one per channel, not all zero;
            or None for uniform weights `1 / channels`.
        channels: the number of channels.

    Returns:
        np.float64 array `[channels]`.

    Raises:
        ValueError: for another shape, or negative, non-finite or all-zero
            weights.

    Example:

    >>> check_channel_weights(None, 4).tolist()
    [0.25, 0.25, 0.25, 0.25]
    """
    if channel_weights is None:
        return np.full(channels, 1.0 / channels)
    weights = np.asarray(channel_weights, dtype=np.float64)
    if weights.shape != (channels,):
        raise ValueError(
            f"Expected `channel_weights` to have shape ({channels},), one "
            f"weight per channel. Received: channel_weights.shape={weights.shape}"
        )
    if not np.all(np.isfinite(weights)) or np.any(weights < 0) or not weights.any():
        raise ValueError(
            "Expected `channel_weights` to be finite, non-negative and not all "
            f"zero. Received: channel_weights={weights.tolist()}"
        )
    return weights


def check_eps(eps):
    """Returns `eps` as a float if it is in (0, 1), else raises ValueError.

    `eps` is added inside the logarithms so that empty bins give finite
    terms.

    Example:

    >>> check_eps(DEFAULT_EPS)
    2.2e-16
    """
    if isinstance(eps, bool) or not isinstance(eps, (int, float, np.floating)) or not (
        0 < eps < 1
    ):
        raise ValueError(
            "Expected `eps` to be a positive float below 1 (it keeps the logs "
            f"of empty bins finite). Received: eps={eps!r}"
        )
    return float(eps)


__all__ = [
    "DEFAULT_EPS",
    "SUM_TOLERANCE",
    "as_histograms",
    "check_channel_weights",
    "check_eps",
    "check_histograms",
    "symmetric_kl",
    "weighted_symmetric_kl",
]
