"""Stratified splits and the low-data subsets of the transfer protocol.

All functions take the label array of a source (`ImageSource.labels`) and
return sorted int64 index arrays into it, so the same indices select images,
labels and metadata through `ImageSource.subset`. Randomness comes only from
the `seed` argument: the same labels and seed always give the same indices.

The usual protocol uses three independent seeds: `holdout_split` fixes the
test images once per data set (its seed never changes with the training
seed), `low_data_subset` draws the training fraction, and `train_val_split`
carves a validation set out of what remains.
"""

import math
import warnings

import numpy as np
from sklearn.model_selection import StratifiedShuffleSplit

from keras_seltransfer.utils.validation import check_fraction
from keras_seltransfer.utils.validation import is_int


def _check_labels(labels):
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.size == 0:
        raise ValueError(
            "Expected `labels` to be a non-empty 1-D array. "
            f"Received: labels.shape={labels.shape}"
        )
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(
            f"Expected integer `labels`. Received: labels.dtype={labels.dtype}"
        )
    return labels.astype(np.int64, copy=False)


def _check_seed(seed):
    if not is_int(seed) or not (
        0 <= seed < 2**32
    ):
        raise ValueError(
            f"Expected `seed` to be an int in [0, 2**32). Received: seed={seed!r}"
        )
    return int(seed)


def _stratified_split(labels, fraction, seed, name):
    """Splits off `fraction` of the examples, stratified by label.

    Classes with a single example cannot be in both parts; they stay in the
    first (larger) part, with a warning.
    """
    labels = _check_labels(labels)
    fraction = check_fraction(fraction, name, low_open=True, high_open=True)
    seed = _check_seed(seed)
    classes, counts = np.unique(labels, return_counts=True)
    singletons = classes[counts == 1]
    if singletons.size:
        warnings.warn(
            f"{singletons.size} class(es) have a single example (e.g. class "
            f"{int(singletons[0])}); they stay in the training part and are "
            "absent from the other.",
            stacklevel=3,
        )
    kept = np.flatnonzero(~np.isin(labels, singletons))
    forced = np.flatnonzero(np.isin(labels, singletons))
    num_classes = classes.size - singletons.size
    # StratifiedShuffleSplit rounds the split-off part up, like this.
    num_split = math.ceil(fraction * kept.size)
    if kept.size == 0 or num_split < num_classes or kept.size - num_split < num_classes:
        raise ValueError(
            f"Cannot split {kept.size} examples of {num_classes} classes "
            f"(with at least two examples each) with `{name}`={fraction}: both "
            "parts need at least one example per class. Use more data or a "
            f"different fraction. Received: {name}={fraction}"
        )
    splitter = StratifiedShuffleSplit(n_splits=1, test_size=num_split, random_state=seed)
    first, second = next(splitter.split(np.zeros(kept.size), labels[kept]))
    first = np.concatenate([kept[first], forced])
    return np.sort(first).astype(np.int64), np.sort(kept[second]).astype(np.int64)


def holdout_split(labels, test_fraction=0.25, seed=0):
    """Splits a data set once into a training pool and a fixed test set.

    Stratified: every class keeps its share in both parts, to within one
    image (scikit-learn's `StratifiedShuffleSplit`). Keep `seed` fixed per
    data set, independent of the training seed, so every run and every
    low-data fraction is evaluated on the same held-out images.

    Args:
        labels: integer class labels, shape `[N]`.
        test_fraction: share of the examples held out, in `(0, 1)`.
        seed: the split's seed.

    Returns:
        `(train_idx, test_idx)`: sorted, disjoint int64 arrays that together
        cover `range(N)`.

    Raises:
        ValueError: for empty or non-integer labels, `test_fraction` outside
            `(0, 1)`, or too few examples to give both parts every class.

    Example:

    >>> train_idx, test_idx = holdout_split(np.array([0, 0, 0, 0, 1, 1, 1, 1]), 0.25)
    >>> len(train_idx), len(test_idx)
    (6, 2)
    """
    return _stratified_split(labels, test_fraction, seed, "test_fraction")


def train_val_split(labels, val_fraction=0.2, seed=0):
    """Splits training examples into a training and a validation part.

    Stratified like `holdout_split`. A class with a single example stays in
    the training part (with a warning), since it cannot be in both.

    Args:
        labels: integer class labels, shape `[N]`.
        val_fraction: share of the examples used for validation, in `(0, 1)`.
        seed: the split's seed (usually the training seed).

    Returns:
        `(train_idx, val_idx)`: sorted, disjoint int64 arrays that together
        cover `range(N)`.

    Raises:
        ValueError: for empty or non-integer labels, `val_fraction` outside
            `(0, 1)`, or too few examples to give both parts every class.

    Example:

    >>> train_idx, val_idx = train_val_split(np.repeat([0, 1], 5), val_fraction=0.2)
    >>> len(train_idx), len(val_idx)
    (8, 2)
    """
    return _stratified_split(labels, val_fraction, seed, "val_fraction")


def low_data_subset(labels, fraction=None, per_class=None, seed=0):
    """Selects a class-balanced low-data subset, as in transfer benchmarks.

    Mirrors the low-data protocol of the Transfer-Learning-Library (training
    on 15%, 30%, 50% or 100% of each class) and the "N images per class"
    protocol (e.g. Caltech-256 at 15/30/45/60). Each class is shuffled once
    with `seed` and its first images are kept, so for one seed the subsets
    are nested: the 15% subset is contained in the 30% subset, and so on.
    Different seeds give different subsets.

    Args:
        labels: integer class labels, shape `[N]`.
        fraction: share of each class to keep, in `(0, 1]`, rounded to the
            nearest count with at least one image per class. 1 keeps all.
        per_class: number of images to keep from every class.
        seed: the subset's seed.

    Returns:
        Sorted int64 indices into `labels`.

    Raises:
        ValueError: unless exactly one of `fraction` and `per_class` is set,
            for a `fraction` outside `(0, 1]` or a non-positive `per_class`,
            or when a class has fewer than `per_class` images (the message
            names the class).

    Example:

    >>> labels = np.repeat([0, 1], 10)
    >>> low_data_subset(labels, fraction=0.3, seed=0).size
    6
    """
    labels = _check_labels(labels)
    seed = _check_seed(seed)
    if (fraction is None) == (per_class is None):
        raise ValueError(
            "Expected exactly one of `fraction` and `per_class`. "
            f"Received: fraction={fraction}, per_class={per_class}"
        )
    if fraction is not None:
        if isinstance(fraction, bool) or not isinstance(
            fraction, (int, float, np.integer, np.floating)
        ) or not 0 < fraction <= 1:
            raise ValueError(
                "Expected `fraction` to be a number in (0, 1]. "
                f"Received: fraction={fraction!r}"
            )
        if fraction == 1:
            return np.arange(labels.size, dtype=np.int64)
    elif (
        isinstance(per_class, bool)
        or not isinstance(per_class, (int, np.integer))
        or per_class <= 0
    ):
        raise ValueError(
            f"Expected `per_class` to be a positive int. Received: per_class={per_class!r}"
        )

    rng = np.random.default_rng(seed)
    chosen = []
    # One permutation per class, drawn in class order whatever the size:
    # this is what makes subsets of different sizes nested for one seed.
    for cls in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == cls))
        if fraction is not None:
            keep = max(1, math.floor(fraction * members.size + 0.5))
        else:
            if members.size < per_class:
                raise ValueError(
                    f"Class {int(cls)} has only {members.size} example(s); cannot "
                    f"keep {per_class} per class. Received: per_class={per_class}"
                )
            keep = per_class
        chosen.append(members[:keep])
    return np.sort(np.concatenate(chosen)).astype(np.int64)
