"""Top-k merging: combining the neighbours of source shards into one top-k.

A source searched in shards (see `keras_seltransfer.retrieval.index`) gives
one top-k per shard; `merge_topk` combines them into exactly the neighbours
of one search over the whole source, in the same order as
`similarity.nearest_sources` (increasing distance, ties to the lower index).
"""

import numpy as np

from keras_seltransfer.utils.validation import check_int


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
    return top_k_rows(indices, distances, k)


def top_k_rows(indices, distances, k):
    """The `k` nearest entries of every row, ties to the lower index.

    Args:
        indices: int array `[T, n]` of source indices.
        distances: float array `[T, n]` of their distances.
        k: how many to keep, at most `n` (not checked).

    Returns:
        `(indices, distances)` `[T, k]`, by increasing distance, ties broken
        by the lower index whatever the input order.

    Example:

    >>> top_k_rows(np.array([[3, 1, 2]]), np.array([[0.5, 0.5, 0.1]]), 2)[0]
    array([[2, 1]])
    """
    # lexsort's last key is the primary one: distance, then index.
    order = np.lexsort((indices, distances), axis=1)[:, :k]
    return (
        np.take_along_axis(indices, order, axis=1),
        np.take_along_axis(distances, order, axis=1),
    )


__all__ = ["merge_topk", "top_k_rows"]
