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
`nearest_sources` streams the source in blocks through that GEMM, keeps a
running top-k per target, and re-scores the few candidates near the k-th
distance exactly in NumPy float64 (see its docstring), so its results are
exactly those of a double loop over `symmetric_kl`.

Reference:
    Ge and Yu, "Borrowing Treasures from the Wealthy: Deep Transfer Learning
    through Selective Joint Fine-Tuning", CVPR 2017.
"""

import math

import keras
import numpy as np
import tensorflow as tf

from keras_seltransfer.utils.validation import check_int

DEFAULT_EPS = 2.2e-16

# Rows of a histogram must sum to 1 within this tolerance: descriptors stored
# as float32 carry rounding, while a histogram that was never normalised is
# off by far more.
_SUM_TOLERANCE = 1e-3

_DTYPES = ("float32", "float64")

# Descriptor values gathered per chunk of re-scored pairs (512 KiB of float64).
_RESCORE_CHUNK_VALUES = 1 << 16

# Marks the empty slots of a running top-k before enough sources were seen:
# an infinite distance sorts after every real one, the largest index after
# every real index.
_EMPTY_INDEX = np.iinfo(np.int64).max


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
    p = _as_descriptors(p, "p", rank=2)
    q = _as_descriptors(q, "q", rank=2)
    if p.shape != q.shape:
        raise ValueError(
            "Expected `p` and `q` to have the same shape [channels, bins]. "
            f"Received: p.shape={p.shape}, q.shape={q.shape}"
        )
    _check_histograms(p, "p")
    _check_histograms(q, "q")
    eps = _check_eps(eps)
    half_weights = 0.5 * _channel_weights(channel_weights, p.shape[0])
    # Same routine, on a batch of one, as the exact re-scoring in
    # `nearest_sources`, so that both give bit-identical distances.
    distance = _rescore(
        p[None], np.log(p + eps)[None], q[None], np.log(q + eps)[None], half_weights
    )
    return float(distance[0])


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
    target = _as_descriptors(target, "target")
    _check_histograms(target, "target")
    source = _as_descriptors(source, "source")
    _check_same_layout(target, source, "target", "source")
    _check_histograms(source, "source")
    weights = _channel_weights(channel_weights, target.shape[1])
    eps = _check_eps(eps)
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
    dtype="float64",
    progress=False,
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
    current k-th distance is re-scored exactly, in NumPy float64, with the
    same arithmetic as `symmetric_kl`. The result is then exactly what a
    double loop over `symmetric_kl` gives (same indices, same order, same
    distances), whatever the block size or device, and the distance of a
    pair does not depend on the other rows in its block, so searching
    shards and merging with `merge_topk` equals one search. Only sources
    near the k-th distance are re-scored (about `k * (1 + log(S / block_size))`
    per target in all), so the GEMM dominates the cost.

    With `dtype="float32"` the GEMM runs in float32 (faster, half the
    memory) with a margin sized for typical rather than worst-case float32
    rounding. Returned distances are still exact `symmetric_kl` values, but
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
        dtype: `"float64"` (exact, the default) or `"float32"` (faster
            GEMM, near-ties may order differently) for the GEMM.
        progress: show a `keras.utils.Progbar` over the blocks.

    Returns:
        `(indices, distances)`: int64 source row indices `[T, k]` and their
        float64 distances `[T, k]`, for every target sorted by increasing
        distance, ties broken by the lower source index.

    Raises:
        ValueError: for descriptors of another rank, different channel or
            bin counts in target and source, entries that are NaN,
            infinite or negative, rows not summing to 1, `k` outside
            `[1, S]`, `channel_weights` of the wrong length, negative,
            non-finite or all zero, `block_size < 1`, a non-positive `eps` or an
            unknown `dtype`.

    Example:

    >>> rng = np.random.default_rng(0)
    >>> target = rng.dirichlet(np.ones(8), size=(3, 2))
    >>> source = rng.dirichlet(np.ones(8), size=(10, 2))
    >>> indices, distances = nearest_sources(target, source, k=4)
    >>> indices.shape, distances.shape
    ((3, 4), (3, 4))
    """
    target = _as_descriptors(target_descriptors, "target_descriptors")
    _check_histograms(target, "target_descriptors")
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
    weights = _channel_weights(channel_weights, target.shape[1])
    block_size = check_int(block_size, "block_size", 1)
    eps = _check_eps(eps)
    dtype = _check_dtype(dtype)

    num_targets = target.shape[0]
    best_indices = np.full((num_targets, k), _EMPTY_INDEX, np.int64)
    best_distances = np.full((num_targets, k), np.inf)
    if num_targets == 0:
        return best_indices, best_distances

    half_weights = 0.5 * weights
    target_logs = np.log(target + eps)
    target_terms = _weighted_terms(_gemm_terms(target, eps, dtype), weights)
    margin_scale = _margin_scale(target.shape[1], target.shape[2], weights, dtype)
    num_blocks = math.ceil(num_sources / block_size)
    progbar = keras.utils.Progbar(num_blocks, unit_name="block") if progress else None
    for block_index, start in enumerate(range(0, num_sources, block_size)):
        stop = min(start + block_size, num_sources)
        # Float32 blocks stay float32: converting every row to float64 would
        # cost a pass over the block, and only re-scored rows need it.
        block = _as_descriptors(
            source_descriptors[start:stop], "source_descriptors", keep_float=True
        )
        _check_layout(block.shape, target.shape, "source_descriptors")
        if block.shape[0] != stop - start:
            raise ValueError(
                f"Expected `source_descriptors[{start}:{stop}]` to have "
                f"{stop - start} rows. Received: shape={block.shape}"
            )
        _check_histograms(block, "source_descriptors", row_offset=start)

        pairs = _candidate_pairs(
            target_terms,
            _gemm_terms(block, eps, dtype),
            best_distances,
            k,
            margin_scale,
        )
        if pairs.shape[0]:
            rows, columns = pairs[:, 0], pairs[:, 1]
            distances = _rescore_pairs(
                target, target_logs, block, rows, columns, half_weights, eps
            )
            _merge_candidates(
                best_indices, best_distances, rows, columns + start, distances, k
            )
        if progbar is not None:
            progbar.update(block_index + 1)
    return best_indices, best_distances


def merge_topk(parts, k):
    """Merges per-shard top-k results into the global top-k.

    Args:
        parts: sequence of `(indices, distances)` pairs, each of shape
            `[T, k_i]` for the same T, with indices already global source
            ids (a shard's row `j` mapped to its global id). The shards
            must be disjoint.
        k: number of neighbours to keep, at most `sum(k_i)`.

    Returns:
        `(indices, distances)`, int64 and float64 `[T, k]`, sorted by
        increasing distance, ties broken by the lower index: the same order
        as `nearest_sources`, so searching shards and merging equals
        searching the whole source (when every shard was searched with
        `k_i = min(k, shard size)`).

    Raises:
        ValueError: for no parts, parts that are not pairs of equally shaped
            2-D arrays with the same number of rows, NaN distances, an index
            present in two parts for the same target, or `k` outside
            `[1, sum(k_i)]`.

    Example:

    >>> a = (np.array([[0, 2]]), np.array([[0.1, 0.3]]))
    >>> b = (np.array([[1, 3]]), np.array([[0.1, 0.2]]))
    >>> merge_topk([a, b], k=3)[0]
    array([[0, 1, 3]])
    """
    parts = list(parts)
    if not parts:
        raise ValueError(
            "Expected `parts` to hold at least one (indices, distances) pair. "
            "Received: parts=[]"
        )
    all_indices, all_distances = [], []
    for i, part in enumerate(parts):
        if not isinstance(part, (tuple, list)) or len(part) != 2:
            raise ValueError(
                "Expected every entry of `parts` to be an (indices, distances) "
                f"pair. Received: parts[{i}]={type(part).__name__}"
            )
        indices, distances = np.asarray(part[0]), np.asarray(part[1], np.float64)
        if (
            indices.ndim != 2
            or indices.shape != distances.shape
            or (indices.size and not np.issubdtype(indices.dtype, np.integer))
        ):
            raise ValueError(
                f"Expected `parts[{i}]` to hold integer indices and distances "
                "of the same shape [T, k_i]. "
                f"Received: indices.shape={indices.shape}, "
                f"indices.dtype={indices.dtype}, distances.shape={distances.shape}"
            )
        if indices.shape[0] != np.shape(parts[0][0])[0]:
            raise ValueError(
                "Expected every part to have the same number of targets. "
                f"Received: parts[0] rows={np.shape(parts[0][0])[0]}, "
                f"parts[{i}] rows={indices.shape[0]}"
            )
        if np.isnan(distances).any():
            raise ValueError(f"Expected `parts[{i}]` distances without NaN.")
        all_indices.append(indices.astype(np.int64))
        all_distances.append(distances)
    indices = np.concatenate(all_indices, axis=1)
    distances = np.concatenate(all_distances, axis=1)
    total = indices.shape[1]
    k = check_int(k, "k", 1, total, f"an int in [1, {total}] (the neighbours in all parts)")
    ordered = np.sort(indices, axis=1)
    repeated = np.argwhere(ordered[:, 1:] == ordered[:, :-1])
    if repeated.size:
        row, column = repeated[0]
        raise ValueError(
            "Expected disjoint shards, but a source index appears in two parts "
            f"for the same target. Received: target {row}, "
            f"index={ordered[row, column]}"
        )
    return _top_k_rows(indices, distances, k)


def _top_k_rows(indices, distances, k):
    # lexsort's last key is the primary one: distance, then index, which
    # makes ties resolve to the lower index whatever the input order.
    order = np.lexsort((indices, distances), axis=1)[:, :k]
    return (
        np.take_along_axis(indices, order, axis=1),
        np.take_along_axis(distances, order, axis=1),
    )


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
    merged = _top_k_rows(
        np.concatenate([best_indices[touched], new_indices], axis=1),
        np.concatenate([best_distances[touched], new_distances], axis=1),
        k,
    )
    best_indices[touched], best_distances[touched] = merged


def _rescore(p, log_p, q, log_q, half_weights):
    # The one place exact distances are computed (for `symmetric_kl` and the
    # re-scoring alike): element-wise products and sums over the last axis
    # of contiguous float64 arrays, whose rounding does not depend on the
    # other rows of the batch.
    per_channel = np.sum((p - q) * (log_p - log_q), axis=-1)
    return np.sum(per_channel * half_weights, axis=-1)


def _rescore_pairs(target, target_logs, block, rows, columns, half_weights, eps):
    """Exact distances of the `(rows[i], columns[i])` target/block pairs."""
    used, inverse = np.unique(columns, return_inverse=True)
    # Float32 to float64 is exact, so converting only the re-scored rows
    # gives the values `symmetric_kl` sees.
    sources = block[used].astype(np.float64)
    # One logarithm per re-scored source row, not per pair, computed in
    # place: a fresh block-sized temporary costs as much again in page faults.
    source_logs = sources + eps
    np.log(source_logs, out=source_logs)
    distances = np.empty(rows.shape[0])
    # Gathered pairs take `C * B` values each: small chunks keep the
    # temporaries in cache (several times faster than block-sized ones) and
    # the memory bounded even when many candidates tie.
    chunk = max(1, _RESCORE_CHUNK_VALUES // (target.shape[1] * target.shape[2]))
    for start in range(0, rows.shape[0], chunk):
        r = rows[start : start + chunk]
        c = inverse[start : start + chunk]
        distances[start : start + chunk] = _rescore(
            target[r], target_logs[r], sources[c], source_logs[c], half_weights
        )
    return distances


def _gemm_terms(descriptors, eps, dtype):
    """The per-row GEMM operands of `descriptors` `[N, C, B]`, unweighted.

    `values` and `logs` are `p` and `log(p + eps)` flattened to `[N, C * B]`
    in `dtype`; `channel_self` (per-channel `sum_b p log p`) and `log_bound`
    are what `_gemm_distances` and `_margin_scale` need per row. The source
    side is used as returned, the target side through `_weighted_terms`, so
    each source block is converted once and never weighted or concatenated.
    """
    num = descriptors.shape[0]
    x = tf.reshape(tf.constant(descriptors, dtype=dtype), [num, -1])
    logs = tf.math.log(x + tf.constant(eps, dtype=dtype))
    channels = descriptors.shape[1]
    return {
        "values": x,
        "logs": logs,
        # `sum_h w_h sum_b p log p` needs the weights, which `_weighted_terms`
        # applies: keep the per-channel sums until then.
        "channel_self": tf.reduce_sum(tf.reshape(x * logs, [num, channels, -1]), axis=2),
        # Largest |log(p + eps)| of the row: bounds every term of the row's
        # products (see `_margin_scale`).
        "log_bound": tf.cast(tf.reduce_max(tf.abs(logs), axis=1), tf.float64),
    }


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
        "log_bound": terms["log_bound"],
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


def _as_descriptors(value, name, rank=3, keep_float=False):
    """`value` as a contiguous float64 array of rank `rank`; with
    `keep_float`, float32 arrays stay float32 (half the memory traffic)."""
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


def _check_histograms(array, name, row_offset=0):
    """Finite, non-negative histogram rows summing to 1; `row_offset` makes
    the reported index global for a block of a larger array."""
    # Two reductions decide the common, valid case: a NaN makes the minimum
    # NaN, a negative entry makes it negative, an infinity makes the sum
    # non-finite. Only then is the offending entry searched for.
    sums = np.sum(array, axis=-1, dtype=np.float64)
    lowest = np.min(array, axis=-1, initial=np.inf)
    if not (np.isfinite(sums).all() and (lowest >= 0).all()):
        _raise_bad_entry(array, name, row_offset)
    off = np.abs(sums - 1.0) > _SUM_TOLERANCE
    if off.any():
        where = tuple(int(i) for i in np.argwhere(off)[0])
        index = (where[0] + row_offset,) + where[1:] if array.ndim == 3 else where
        raise ValueError(
            f"Expected every channel histogram of `{name}` to sum to 1 "
            f"(tolerance {_SUM_TOLERANCE}). "
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


def _channel_weights(channel_weights, channels):
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


def _check_eps(eps):
    if isinstance(eps, bool) or not isinstance(eps, (int, float, np.floating)) or not (
        0 < eps < 1
    ):
        raise ValueError(
            "Expected `eps` to be a positive float below 1 (it keeps the logs "
            f"of empty bins finite). Received: eps={eps!r}"
        )
    return float(eps)


def _check_dtype(dtype):
    try:
        name = np.dtype(dtype).name
    except TypeError:
        name = None
    if name not in _DTYPES:
        raise ValueError(f"Expected `dtype` to be one of {_DTYPES}. Received: dtype={dtype!r}")
    return name
