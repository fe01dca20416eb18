"""The samplers of selective joint fine-tuning and of its controls.

Ge & Yu (CVPR 2017, Table 4) compare the selective method with joint
training on all source images, on as many random source images, and without
neighbour growth. Those ablations differ from the full method in growth and
in how often a hard target image is drawn as well as in selection, so two
controls isolate selection:

- `random_neighbours`: every target gets a list of random source images
  (from a random pool as large as the selected union), grown and sampled
  exactly as the selected lists are: only the selection differs.
- `target_draws="uniform"` on the `selected` sampler: lists grow, but
  every target image is drawn equally often (no repetition of hard images).
"""

import numpy as np

from keras_seltransfer.data.joint_sampler import JointSampler
from keras_seltransfer.utils.validation import check_int
from keras_seltransfer.utils.validation import check_int_array

# Ablation variants of the paper (Table 4 of Ge & Yu), the random-neighbour
# control, and what they sample.
VARIANTS = ("selected", "selected_nogrowth", "all", "random", "random_neighbours")


def random_pool(num_source, size, seed=0):
    """`size` distinct source positions chosen uniformly (the random-source ablation).

    Args:
        num_source: number of source images (int >= 1).
        size: number of positions to choose, at most `num_source`.
        seed: seed of the choice.

    Returns:
        A sorted int array of `size` distinct positions in `[0, num_source)`.

    Raises:
        ValueError: for a non-positive `num_source` or `size`, or a `size`
            above `num_source`.

    Example:

    >>> random_pool(10, 3, seed=0).tolist()
    [5, 6, 9]
    """
    num_source = check_int(num_source, "num_source", 1)
    size = check_int(size, "size", 1)
    if size > num_source:
        raise ValueError(f"Cannot choose {size} of {num_source} source images.")
    return np.sort(np.random.default_rng(seed).choice(num_source, size, replace=False))


def make_sampler(
    variant, neighbour_ids, source_labels, *, k0, k_max=None, seed=0, max_level=None,
    target_draws="neighbours",
):
    """The sampler of one of `VARIANTS` from a target's neighbour lists.

    - `selected`, `selected_nogrowth`: neighbour lists (growth is the
      callback's business; the sampler is the same), capped at `max_level`
      (see `JointSampler`).
    - `all`: every source image, uniformly.
    - `random`: as many uniformly chosen source images as the lists select
      (distinct ids in the columns a list can reach: the first `k_max`, and
      at most `max_level * k0`), drawn uniformly.
    - `random_neighbours`: lists as long as the selected ones, each of
      distinct random images of such a random pool, nearest-first order
      replaced by a random one: grown and sampled as `selected`.

    Args:
        variant: one of `VARIANTS`.
        neighbour_ids: `[num_targets, K]` source positions, each row
            nearest first.
        source_labels: `[num_source]` labels of the whole source set.
        k0, k_max, seed, max_level, target_draws: as
            `JointSampler.from_neighbours` (`target_draws` applies to the
            neighbour variants: `selected`, `selected_nogrowth`,
            `random_neighbours`).

    Returns:
        A `JointSampler`.

    Raises:
        ValueError: for an unknown `variant` or arguments the sampler
            rejects.

    Example:

    >>> neighbour_ids = np.array([[4, 2, 7], [2, 9, 4]])
    >>> sampler = make_sampler("random", neighbour_ids, np.arange(10) % 5, k0=2)
    >>> sampler.uses_neighbours, len(sampler.candidate_ids)
    (False, 4)
    """
    if variant not in VARIANTS:
        raise ValueError(f"Expected `variant` in {VARIANTS}. Received: variant={variant!r}")
    source_labels = check_int_array(source_labels, "source_labels", 1)
    ids = check_int_array(neighbour_ids, "neighbour_ids", 2)
    if variant in ("selected", "selected_nogrowth"):
        return JointSampler.from_neighbours(
            ids, source_labels, k0=k0, k_max=k_max, seed=seed, max_level=max_level,
            target_draws=target_draws,
        )
    if variant == "all":
        return JointSampler.from_pool(np.arange(len(source_labels)), source_labels, ids.shape[0], seed=seed)
    columns = k_max
    if max_level is not None:
        cap = check_int(k0, "k0", 1) * check_int(max_level, "max_level", 1)
        columns = cap if columns is None else min(columns, cap)
    selected = len(np.unique(ids[:, :columns] if columns else ids))
    pool = random_pool(len(source_labels), selected, seed=seed)
    if variant == "random":
        return JointSampler.from_pool(pool, source_labels, ids.shape[0], seed=seed)
    width = ids.shape[1] if columns is None else min(columns, ids.shape[1])
    random_ids = random_lists(pool, ids.shape[0], width, seed=seed)
    return JointSampler.from_neighbours(
        random_ids, source_labels, k0=k0, k_max=k_max, seed=seed, max_level=max_level,
        target_draws=target_draws,
    )


def random_lists(pool, num_targets, width, seed=0):
    """Per-target lists of distinct random images of a pool (the random-neighbour control).

    Args:
        pool: source positions to draw from (at least `width` distinct ones).
        num_targets: number of lists (int >= 1).
        width: entries per list (int >= 1).
        seed: seed of the draws.

    Returns:
        An int `[num_targets, width]` array; each row holds distinct pool
        entries in random order.

    Raises:
        ValueError: for a pool smaller than `width`.

    Example:

    >>> lists = random_lists(np.array([3, 5, 8, 9]), num_targets=2, width=3, seed=0)
    >>> lists.shape, all(len(set(row)) == 3 for row in lists)
    ((2, 3), True)
    """
    pool = np.unique(np.asarray(pool, dtype=np.int64))
    num_targets = check_int(num_targets, "num_targets", 1)
    width = check_int(width, "width", 1)
    if width > len(pool):
        raise ValueError(
            f"Cannot draw lists of {width} distinct images from a pool of {len(pool)}. "
            f"Received: width={width}"
        )
    rng = np.random.default_rng(seed)
    return np.stack([rng.choice(pool, width, replace=False) for _ in range(num_targets)])


__all__ = ["VARIANTS", "make_sampler", "random_lists", "random_pool"]
