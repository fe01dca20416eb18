"""Symmetric-KL distances between filter-bank descriptors and top-k search.

A descriptor is an array `[channels, bins]`: for every filter channel, a
normalised histogram of the channel's responses over one image. Two images
are compared with the channel-weighted symmetric Kullback-Leibler divergence
of the selective joint fine-tuning paper's code:

    D(p, q) = sum_h w_h * 0.5 * [KL(p_h || q_h) + KL(q_h || p_h)]
    KL(p || q) = sum_b p_b * (log(p_b + eps) - log(q_b + eps))

The symmetric sum expands to `sum p log p + sum q log q - sum p log q -
sum q log p`; the cross terms are matrix products, so the distances from
every target to a block of source images cost two GEMMs (`tf.matmul`, on
whatever device TensorFlow places them) plus row and column terms.
`nearest_sources` streams the source in blocks through that GEMM and has two
search modes. "exact" keeps a running top-k per target and re-scores the few
candidates near the k-th distance exactly in float64 (see its docstring),
so its results are exactly those of a double loop over `symmetric_kl`
(`keras_seltransfer.utils.divergence`, with the shared argument checks).
"fast" keeps the `k + margin` nearest by float32 GEMM distance
(`tf.math.top_k` per block, merged across blocks) and re-scores only those
survivors, so its cost is the GEMMs; it may miss a neighbour whose float32
distance ranks beyond `k + margin`. "auto" picks fast from
`AUTO_FAST_MIN_SOURCES` sources. Both modes re-score through
`rescore.PairRescorer`: NumPy's float64 arithmetic, run by an XLA kernel
over a thread pool for large pair sets, with bit-identical results.

Reference:
    Ge and Yu, "Borrowing Treasures from the Wealthy: Deep Transfer Learning
    through Selective Joint Fine-Tuning", CVPR 2017.
"""

import math

import keras
import numpy as np
import tensorflow as tf

from keras_seltransfer.retrieval.rescore import PairRescorer
from keras_seltransfer.retrieval.topk import top_k_rows
from keras_seltransfer.utils.divergence import as_histograms
from keras_seltransfer.utils.divergence import check_channel_weights
from keras_seltransfer.utils.divergence import check_eps
from keras_seltransfer.utils.divergence import check_histograms
from keras_seltransfer.utils.divergence import DEFAULT_EPS
from keras_seltransfer.utils.validation import check_choice
from keras_seltransfer.utils.validation import check_int


_DTYPES = ("float32", "float64")
# GEMM precisions of the fast mode (bfloat16 operands, float32 products).
_FAST_DTYPES = ("bfloat16", "float32", "float64")

# The search modes of `nearest_sources` (see its docstring).
SEARCH_MODES = ("auto", "exact", "fast")

# From this many sources, `mode="auto"` searches in the fast mode. Below it
# the exact search takes at most a few minutes for a few thousand targets on
# two CPU cores (Fashion-MNIST's 60,000 training images stay exact), and
# above it the exact re-scoring, which grows with log(sources / block_size),
# dominates the GEMMs.
AUTO_FAST_MIN_SOURCES = 100_000

# Extra survivors per target the fast mode re-scores beyond `k` (see
# `nearest_sources`).
DEFAULT_MARGIN = 32

# Marks the empty slots of a running top-k before enough sources were seen:
# an infinite distance sorts after every real one, the largest index after
# every real index.
_EMPTY_INDEX = np.iinfo(np.int64).max


def pairwise_distances(
    target, source, channel_weights=None, eps=DEFAULT_EPS, dtype="float64"
):
    """All-pairs symmetric-KL distances through the GEMM expansion.

    With `L = log(p + eps)` flattened to `[N, C * B]`, `P_w = w_h * p`,
    `L_w = w_h * L` and `r = sum(P_w * L)` per row,
    `D = 0.5 * (r_t[:, None] + r_s[None, :] - P_w_t @ L_s^T - L_w_t @ P_s^T)`
    (the weights act per channel, so they can all sit on the target side).
    The products run as two `tf.matmul`s on the device TensorFlow places
    them on. The expansion subtracts terms of size about `log(bins)` to get
    distances that may be much smaller, so float64 results differ from
    `symmetric_kl` by about 1e-14 and float32 ones by about 1e-6; negative
    results of that rounding are clipped to 0.

    Args:
        target: descriptors `[T, channels, bins]`.
        source: descriptors `[S, channels, bins]`.
        channel_weights: non-negative weights `[channels]`; None gives
            `1 / channels` each (see `symmetric_kl`).
        eps: positive constant added inside the logarithms.
        dtype: `"float64"` or `"float32"`, the precision of the computation
            and of the result.

    Returns:
        NumPy array `[T, S]` of `dtype`.

    Raises:
        ValueError: as `nearest_sources`.

    Example:

    >>> x = np.full((2, 3, 4), 0.25)
    >>> pairwise_distances(x, x).shape
    (2, 2)
    """
    target = as_histograms(target, "target")
    check_histograms(target, "target")
    source = as_histograms(source, "source")
    _check_same_layout(target, source, "target", "source")
    check_histograms(source, "source")
    weights = check_channel_weights(channel_weights, target.shape[1])
    eps = check_eps(eps)
    dtype = _check_dtype(dtype)
    target_terms = _weighted_terms(_gemm_terms(target, eps, dtype), weights)
    source_terms = _gemm_terms(source, eps, dtype)
    distances = _gemm_distances(target_terms, source_terms)
    return np.maximum(distances.numpy(), 0).astype(dtype)


def nearest_sources(
    target_descriptors,
    source_descriptors,
    k,
    channel_weights=None,
    block_size=4096,
    eps=DEFAULT_EPS,
    dtype=None,
    progress=False,
    mode="auto",
    margin=DEFAULT_MARGIN,
):
    """The `k` source descriptors nearest to every target descriptor.

    Brute force, as in the authors' code: the source is read in blocks of
    `block_size` rows, the distances from all targets to a block come from
    GEMMs (see `pairwise_distances`), and each target keeps a running
    top-k. Memory is bounded by about `T * block_size` distances plus the
    `T * k` running results, never `T * S`, and `source_descriptors` may be
    any object with `len()` and row slicing (a memory-mapped array, say),
    so a source larger than memory is fine.

    The GEMM expansion cancels large terms, so its distances carry rounding
    that could swap near-equal neighbours or split exact ties. Candidates
    are therefore taken from the GEMM with a margin: every source whose GEMM
    distance lies within a worst-case bound on that rounding of a target's
    current k-th distance is re-scored exactly in float64 with the
    arithmetic of `symmetric_kl` (`rescore.PairRescorer`: bit-identical
    results, in NumPy or an XLA kernel spread over threads). The result is then exactly what a
    double loop over `symmetric_kl` gives (same indices, same order, same
    distances), whatever the block size or device, and the distance of a
    pair does not depend on the other rows in its block, so searching
    shards and merging with `merge_topk` equals one search. Only sources
    near the k-th distance are re-scored (about `k * (1 + log(S / block_size))`
    per target in all), so the GEMM dominates the cost.

    That is the `"exact"` mode. The `"fast"` mode (`mode="fast"`, or
    `"auto"` from `AUTO_FAST_MIN_SOURCES` sources) keeps, per target, the
    `k + margin` sources nearest by GEMM distance (`tf.math.top_k` on every
    block, merged with the running survivors, ties to the lower index), then
    re-scores only those survivors exactly in float64, as the exact mode
    re-scores, and returns the `k` nearest of them. The re-scoring then
    costs `T * (k + margin)` exact distances whatever the source size, so
    the GEMMs dominate. Returned distances are exactly the exact mode's for
    the returned indices, in the same order and tie rule, but a true
    neighbour is missed when rounding pushes its GEMM distance beyond rank
    `k + margin` (see `tools/bench_retrieval.py` for measured recall, and
    the README). Sharded fast searches merged with `merge_topk` may differ
    from one fast search in the same way.

    With `dtype="float32"` the exact mode's GEMM runs in float32 (faster,
    half the memory) with a margin sized for typical rather than worst-case
    float32 rounding. Returned distances are still exact `symmetric_kl` values, but
    neighbours whose GEMM distances err by more than the margin may then be
    missed or ordered differently. On recent NVIDIA GPUs TensorFlow runs
    float32 matmuls in TF32 (10-bit mantissa) by default, whose rounding
    often exceeds the margin: there, disable it with
    `tf.config.experimental.enable_tensor_float_32_execution(False)` or use
    float64 when exactness matters.

    Args:
        target_descriptors: array `[T, channels, bins]`; every
            `[channels, bins]` slice is one histogram per channel (entries
            >= 0, rows summing to 1 within 1e-3).
        source_descriptors: array `[S, channels, bins]` of the same kind,
            or any object supporting `len()` and slicing by row ranges
            (`source_descriptors[i:j]`), such as `np.load(path,
            mmap_mode="r")`. Each block is checked as it is read.
        k: number of neighbours per target, in `[1, S]`.
        channel_weights: non-negative weights `[channels]`; None gives
            `1 / channels` each, so the distance is the mean over channels
            of the per-channel symmetric divergence.
        block_size: source rows per block.
        eps: positive constant added inside the logarithms.
        dtype: `"float64"` or `"float32"`, the precision of the GEMM;
            None (the default) gives float64 in the exact mode (exact
            results) and float32 in the fast mode. In the exact mode,
            float32 may order near-ties differently.
        progress: show a `keras.utils.Progbar` over the blocks.
        mode: `"exact"`, `"fast"` or `"auto"` (the default): fast when the
            source has at least `AUTO_FAST_MIN_SOURCES` rows, exact
            otherwise (see `resolve_search_mode`).
        margin: int >= 0, survivors kept per target beyond `k` in the fast
            mode (at most the source size in all); ignored by the exact
            mode. A larger margin raises recall and the re-scoring cost.

    Returns:
        `(indices, distances)`: int64 source row indices `[T, k]` and their
        float64 distances `[T, k]`, for every target sorted by increasing
        distance, ties broken by the lower source index.

    Raises:
        ValueError: for descriptors of another rank, different channel or
            bin counts in target and source, entries that are NaN,
            infinite or negative, rows not summing to 1, `k` outside
            `[1, S]`, `channel_weights` of the wrong length, negative,
            non-finite or all zero, `block_size < 1`, a non-positive `eps`,
            an unknown `dtype` or `mode`, or a negative `margin`.

    Example:

    >>> rng = np.random.default_rng(0)
    >>> target = rng.dirichlet(np.ones(8), size=(3, 2))
    >>> source = rng.dirichlet(np.ones(8), size=(10, 2))
    >>> indices, distances = nearest_sources(target, source, k=4)
    >>> indices.shape, distances.shape
    ((3, 4), (3, 4))
    """
    target = as_histograms(target_descriptors, "target_descriptors")
    check_histograms(target, "target_descriptors")
    try:
        num_sources = len(source_descriptors)
    except TypeError:
        raise ValueError(
            "Expected `source_descriptors` to be an array or an object with "
            "len() and row slicing. "
            f"Received: source_descriptors={type(source_descriptors).__name__}"
        ) from None
    source_shape = getattr(source_descriptors, "shape", None)
    if source_shape is not None:
        _check_layout(tuple(source_shape), target.shape, "source_descriptors")
    k = check_int(
        k, "k", 1, num_sources, f"an int in [1, {num_sources}] (the number of sources)"
    )
    weights = check_channel_weights(channel_weights, target.shape[1])
    block_size = check_int(block_size, "block_size", 1)
    eps = check_eps(eps)
    mode = resolve_search_mode(mode, num_sources)
    margin = check_int(margin, "margin", 0, expected="an int >= 0")
    if dtype is None:
        dtype = fast_gemm_dtype() if mode == "fast" else _MODE_DTYPES[mode]
    dtype = _check_dtype(dtype, _FAST_DTYPES if mode == "fast" else _DTYPES, mode)

    if mode == "fast":
        return _fast_search(
            target, source_descriptors, num_sources, k, weights, block_size, eps,
            dtype, margin, progress,
        )
    num_targets = target.shape[0]
    best_indices = np.full((num_targets, k), _EMPTY_INDEX, np.int64)
    best_distances = np.full((num_targets, k), np.inf)
    if num_targets == 0:
        return best_indices, best_distances

    rescorer = PairRescorer(
        target, eps, 0.5 * weights, source_rows=min(block_size, num_sources)
    )
    target_terms = _weighted_terms(_gemm_terms(target, eps, dtype), weights)
    margin_scale = _margin_scale(target.shape[1], target.shape[2], weights, dtype)
    num_blocks = math.ceil(num_sources / block_size)
    progbar = keras.utils.Progbar(num_blocks, unit_name="block") if progress else None
    for block_index, start in enumerate(range(0, num_sources, block_size)):
        stop = min(start + block_size, num_sources)
        block = _read_block(source_descriptors, start, stop, target.shape)
        pairs = _candidate_pairs(
            target_terms,
            _gemm_terms(block, eps, dtype),
            best_distances,
            k,
            margin_scale,
        )
        if pairs.shape[0]:
            rows, columns = pairs[:, 0], pairs[:, 1]
            distances = rescorer.rescore(block, rows, columns)
            _merge_candidates(
                best_indices, best_distances, rows, columns + start, distances, k
            )
        if progbar is not None:
            progbar.update(block_index + 1)
    return best_indices, best_distances


def resolve_search_mode(mode, num_sources):
    """The search mode `nearest_sources` runs for `mode` and a source size.

    Args:
        mode: one of `SEARCH_MODES`: `"exact"`, `"fast"`, or `"auto"`,
            which is `"fast"` from `AUTO_FAST_MIN_SOURCES` sources and
            `"exact"` below.
        num_sources: the number of source rows searched.

    Returns:
        `"exact"` or `"fast"`.

    Raises:
        ValueError: for a `mode` not in `SEARCH_MODES`.

    Example:

    >>> resolve_search_mode("auto", 1000), resolve_search_mode("auto", 10**6)
    ('exact', 'fast')
    """
    check_choice(mode, "mode", SEARCH_MODES)
    if mode == "auto":
        return "fast" if num_sources >= AUTO_FAST_MIN_SOURCES else "exact"
    return mode


# The GEMM precision of each mode when `dtype` is None.
_MODE_DTYPES = {"exact": "float64", "fast": "float32"}


def _read_block(source_descriptors, start, stop, target_shape):
    """Rows `[start, stop)` of the source, checked as histograms."""
    # Float32 blocks stay float32: converting every row to float64 would
    # cost a pass over the block, and only re-scored rows need it.
    block = as_histograms(
        source_descriptors[start:stop], "source_descriptors", keep_float=True
    )
    _check_layout(block.shape, target_shape, "source_descriptors")
    if block.shape[0] != stop - start:
        raise ValueError(
            f"Expected `source_descriptors[{start}:{stop}]` to have "
            f"{stop - start} rows. Received: shape={block.shape}"
        )
    check_histograms(block, "source_descriptors", row_offset=start)
    return block


def _fast_search(
    target, source_descriptors, num_sources, k, weights, block_size, eps, dtype,
    margin, progress,
):
    """The fast mode of `nearest_sources` (arguments checked there).

    First pass: GEMM distances per block and a running `tf.math.top_k` of
    the `k + margin` nearest per target. Once a target holds `k + margin`
    survivors, only a block's sources scoring above its last survivor can
    enter, so each block's `top_k` takes just as many as the target with the
    most such sources needs (counted with the scores): few, once many blocks
    were seen. Second pass: the survivors are re-scored exactly, block by
    block (only blocks holding survivors are read again), by a
    `PairRescorer`, so any source that supports row slicing works and
    memory stays bounded by a block.
    """
    num_targets = target.shape[0]
    if num_targets == 0:
        return np.zeros((0, k), np.int64), np.zeros((0, k))
    keep = min(k + margin, num_sources)
    # Terms in float32 (float64 when asked), operands rounded after: the
    # logarithms of bfloat16 values would lose more than the operands do.
    term_dtype = "float64" if dtype == "float64" else "float32"
    target_terms = _weighted_terms(_gemm_terms(target, eps, term_dtype, bounds=False), weights)
    target_operand = _fast_operands(target_terms, dtype, "target")
    target_self = target_terms["self"]
    block_scores = _bfloat16_scores if dtype == "bfloat16" else _float_scores
    num_blocks = math.ceil(num_sources / block_size)
    progbar = keras.utils.Progbar(num_blocks, unit_name="block") if progress else None
    # Negated GEMM distances and global indices of the running survivors.
    # New blocks are appended after them, so `top_k`'s rule (equal values:
    # the lower position first) breaks ties to the lower source index.
    running_scores = running_indices = None
    no_floor = tf.fill([num_targets], tf.constant(-np.inf, target_self.dtype))
    for block_index, start in enumerate(range(0, num_sources, block_size)):
        stop = min(start + block_size, num_sources)
        block = _read_block(source_descriptors, start, stop, target.shape)
        source_terms = _gemm_terms(block, eps, term_dtype, bounds=False)
        # A block source enters a full survivor list only by scoring above
        # its last survivor: one that ties it comes later, so loses the tie.
        full = running_scores is not None and running_scores.shape[1] == keep
        floor = running_scores[:, -1] if full else no_floor
        scores, entering = block_scores(
            target_operand,
            _fast_operands(source_terms, dtype, "source"),
            target_self,
            tf.linalg.matvec(source_terms["channel_self"], target_terms["weights"]),
            floor,
        )
        take = min(keep, stop - start, int(entering))
        if take:
            scores, columns = tf.math.top_k(scores, k=take)
            indices = tf.cast(columns, tf.int64) + start
            if running_scores is not None:
                scores = tf.concat([running_scores, scores], axis=1)
                indices = tf.concat([running_indices, indices], axis=1)
                scores, positions = tf.math.top_k(scores, k=min(keep, scores.shape[1]))
                indices = tf.gather(indices, positions, batch_dims=1)
            running_scores, running_indices = scores, indices
        if progbar is not None:
            progbar.update(block_index + 1)

    survivors = running_indices.numpy()
    flat = survivors.reshape(-1)
    flat_distances = np.empty(flat.shape)
    order = np.argsort(flat, kind="stable")
    rows = np.repeat(np.arange(num_targets), keep)[order]
    sorted_indices = flat[order]
    rescorer = PairRescorer(target, eps, 0.5 * weights, source_rows=min(block_size, num_sources))
    bounds = np.searchsorted(
        sorted_indices, np.arange(0, num_sources + block_size, block_size)
    )
    for block_index, start in enumerate(range(0, num_sources, block_size)):
        low, high = bounds[block_index], bounds[block_index + 1]
        if low == high:
            continue
        stop = min(start + block_size, num_sources)
        # Checked in the first pass.
        block = np.asarray(source_descriptors[start:stop])
        flat_distances[order[low:high]] = rescorer.rescore(
            block, rows[low:high], sorted_indices[low:high] - start
        )
    return top_k_rows(survivors, flat_distances.reshape(survivors.shape), k)


def _merge_candidates(best_indices, best_distances, rows, indices, distances, k):
    """Merges re-scored `(row, index, distance)` triples into the running
    top-k in place. `rows` are ascending (from `tf.where`)."""
    touched, starts, counts = np.unique(rows, return_index=True, return_counts=True)
    width = counts.max()
    slot = np.arange(rows.shape[0]) - np.repeat(starts, counts)
    position = np.searchsorted(touched, rows)
    new_indices = np.full((touched.shape[0], width), _EMPTY_INDEX, np.int64)
    new_distances = np.full((touched.shape[0], width), np.inf)
    new_indices[position, slot] = indices
    new_distances[position, slot] = distances
    merged = top_k_rows(
        np.concatenate([best_indices[touched], new_indices], axis=1),
        np.concatenate([best_distances[touched], new_distances], axis=1),
        k,
    )
    best_indices[touched], best_distances[touched] = merged


def _gemm_terms(descriptors, eps, dtype, bounds=True):
    """The per-row GEMM operands of `descriptors` `[N, C, B]`, unweighted.

    `values` and `logs` are `p` and `log(p + eps)` flattened to `[N, C * B]`
    in `dtype`; `channel_self` (per-channel `sum_b p log p`) and `log_bound`
    are what `_gemm_distances` and `_margin_scale` need per row (the fast
    mode, which needs no bound, passes `bounds=False`). The source
    side is used as returned, the target side through `_weighted_terms`, so
    each source block is converted once and never weighted or concatenated.
    """
    num = descriptors.shape[0]
    x = tf.reshape(tf.constant(descriptors, dtype=dtype), [num, -1])
    logs = tf.math.log(x + tf.constant(eps, dtype=dtype))
    channels = descriptors.shape[1]
    terms = {
        "values": x,
        "logs": logs,
        # `sum_h w_h sum_b p log p` needs the weights, which `_weighted_terms`
        # applies: keep the per-channel sums until then.
        "channel_self": tf.reduce_sum(tf.reshape(x * logs, [num, channels, -1]), axis=2),
    }
    if bounds:
        # Largest |log(p + eps)| of the row: bounds every term of the row's
        # products (see `_margin_scale`).
        terms["log_bound"] = tf.cast(tf.reduce_max(tf.abs(logs), axis=1), tf.float64)
    return terms


def _weighted_terms(terms, weights):
    """`_gemm_terms` with the channel weights applied to both operands.

    Only one side of each product needs the weights (they act per channel),
    so the target, with few rows, carries them and the source blocks do not.
    """
    dtype = terms["values"].dtype
    channels = weights.shape[0]
    flat = tf.constant(np.repeat(weights, terms["values"].shape[1] // channels), dtype=dtype)
    return {
        "values": terms["values"] * flat,
        "logs": terms["logs"] * flat,
        "log_bound": terms.get("log_bound"),
        "weights": tf.constant(weights, dtype=dtype),
        "self": tf.linalg.matvec(terms["channel_self"], tf.constant(weights, dtype=dtype)),
    }


def _gemm_distances(target_terms, source_terms):
    """GEMM-expansion distances `[T, S]` from weighted target terms (see
    `_weighted_terms`) to unweighted source terms."""
    weights = target_terms["weights"]
    # Two products instead of one on concatenated operands: the same
    # arithmetic without a copy of every source block.
    cross = tf.matmul(
        target_terms["values"], source_terms["logs"], transpose_b=True
    ) + tf.matmul(target_terms["logs"], source_terms["values"], transpose_b=True)
    source_self = tf.linalg.matvec(source_terms["channel_self"], weights)
    return 0.5 * (target_terms["self"][:, None] + source_self[None, :] - cross)


def _margin_scale(channels, bins, weights, dtype):
    """`mu` such that `mu * (a_t + a_s)` bounds |GEMM distance - exact one|.

    `a` is a row's largest |log(p + eps)|. With `W = sum(w)` and histogram
    rows summing to at most 1.001, every sum in the expansion is bounded by
    `1.001 * W * (a_t + a_s)`. Summing `n` terms in any order errs by at
    most `n * u` times the sum of magnitudes (Higham, "Accuracy and
    Stability of Numerical Algorithms", 3.1), and the expansion sums `3n`
    products (`n = C * B`); the exact re-scoring sums `B + C`; a few more
    `u` cover the logarithms (TensorFlow's and NumPy's may differ by an ulp)
    and the final additions. A factor 2 on top makes the float64 bound
    safe. Worst-case float32 bounds would re-score most of every block, so
    float32 uses `sqrt(n)` growth, the typical rather than the worst case.
    """
    n = channels * bins
    if dtype == "float64":
        growth = 3 * n + bins + channels + 24
        unit = np.finfo(np.float64).eps / 2
    else:
        growth = math.sqrt(3 * n) + bins + channels + 24
        unit = np.finfo(np.float32).eps / 2
    return 2.0 * growth * unit * 1.001 * float(np.sum(weights))


def _candidate_pairs(target_terms, block_terms, best_distances, k, margin_scale):
    """`[P, 2]` (target row, block column) pairs that may enter the top-k.

    With `m(t, s) = mu * (a_t + a_s)` bounding the GEMM error and `K` the
    k-th smallest of the running exact distances and the block's GEMM
    distances, the k-th exact distance after the block is at most
    `K + max_s m(t, s)`, so a source can only enter if its GEMM distance is
    at most `K + max_s m(t, s) + m(t, s)`. Ascending rows, then columns.
    """
    approximate = tf.cast(_gemm_distances(target_terms, block_terms), tf.float64)
    running = tf.constant(best_distances)
    kth = -tf.math.top_k(-tf.concat([running, approximate], axis=1), k=k).values[:, -1]
    target_bound = target_terms["log_bound"]
    block_bound = block_terms["log_bound"]
    threshold = kth + margin_scale * (2.0 * target_bound + tf.reduce_max(block_bound))
    mask = approximate <= threshold[:, None] + margin_scale * block_bound[None, :]
    return tf.where(mask).numpy()


def _check_layout(shape, target_shape, name):
    if len(shape) != 3:
        raise ValueError(
            f"Expected `{name}` to have rank 3, [N, channels, bins]. "
            f"Received: {name}.shape={shape}"
        )
    if tuple(shape[1:]) != tuple(target_shape[1:]):
        raise ValueError(
            f"Expected `{name}` to have the target's channels and bins "
            f"{tuple(target_shape[1:])}. Received: {name}.shape={shape}"
        )


def _check_same_layout(target, source, target_name, source_name):
    if target.shape[1:] != source.shape[1:]:
        raise ValueError(
            f"Expected `{target_name}` and `{source_name}` to have the same "
            f"channels and bins. Received: {target_name}.shape={target.shape}, "
            f"{source_name}.shape={source.shape}"
        )


def _check_dtype(dtype, allowed=_DTYPES, mode="exact"):
    try:
        name = "bfloat16" if str(dtype) == "bfloat16" else np.dtype(dtype).name
    except TypeError:
        name = None
    if name not in allowed:
        raise ValueError(
            f"Expected `dtype` to be one of {allowed} in the {mode} mode. Received: dtype={dtype!r}"
        )
    return name


def _has_fast_bfloat16():
    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        capability = tf.config.experimental.get_device_details(gpus[0]).get(
            "compute_capability", (0, 0)
        )
        return tuple(capability) >= (8, 0)
    try:
        with open("/proc/cpuinfo") as f:
            flags = set(next((line for line in f if line.startswith("flags")), "").split())
    except OSError:
        return False
    return bool(flags & {"amx_bf16", "avx512_bf16"})


_FAST_GEMM_DTYPE = []


def fast_gemm_dtype():
    """The fast mode's default GEMM precision on this machine.

    `"bfloat16"` (bfloat16 operands, products summed in float32) where the
    hardware multiplies bfloat16 natively: x86 CPUs with AMX or
    AVX512-BF16, NVIDIA GPUs of compute capability 8.0 or later; else
    `"float32"`. Rounding the operands to bfloat16 only changes which
    sources survive to the exact re-scoring, never the returned distances.

    Example:

    >>> fast_gemm_dtype() in ("bfloat16", "float32")
    True
    """
    if not _FAST_GEMM_DTYPE:
        _FAST_GEMM_DTYPE.append("bfloat16" if _has_fast_bfloat16() else "float32")
    return _FAST_GEMM_DTYPE[0]


@tf.function(jit_compile=True)
def _bfloat16_scores(target_operand, source_operand, target_self, source_self, floor):
    """Negated GEMM distances `[T, N]` of the fast mode, and the largest
    number of them above `floor` `[T]` in any row."""
    # bfloat16 x bfloat16 products summed in float32, as XLA compiles them
    # (TensorFlow's own kernels return bfloat16 sums, too coarse to rank).
    cross = tf.raw_ops.BatchMatMulV3(
        x=target_operand, y=source_operand, Tout=tf.float32, adj_y=True
    )
    return _scores_and_entering(cross, target_self, source_self, floor)


@tf.function
def _float_scores(target_operand, source_operand, target_self, source_self, floor):
    """`_bfloat16_scores` for float32 and float64 operands."""
    cross = tf.matmul(target_operand, source_operand, transpose_b=True)
    return _scores_and_entering(cross, target_self, source_self, floor)


def _scores_and_entering(cross, target_self, source_self, floor):
    scores = -0.5 * (target_self[:, None] + source_self[None, :] - cross)
    entering = tf.reduce_sum(tf.cast(scores > floor[:, None], tf.int32), axis=1)
    return scores, tf.reduce_max(entering)


def _fast_operands(terms, dtype, side):
    """The fast mode's GEMM operand of one side: `[values, logs]` for the
    target, `[logs, values]` for the source, so one product gives both cross
    terms."""
    parts = [terms["values"], terms["logs"]] if side == "target" else [terms["logs"], terms["values"]]
    return tf.cast(tf.concat(parts, axis=1), dtype)
