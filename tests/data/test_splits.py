"""Tests for keras_seltransfer.data.splits."""

import numpy as np
import pytest

from keras_seltransfer.data.splits import holdout_split
from keras_seltransfer.data.splits import low_data_subset
from keras_seltransfer.data.splits import train_val_split

# Imbalanced, like ELPV: 70 / 23 / 7 examples, in a shuffled order.
LABELS = np.random.default_rng(0).permutation(np.repeat([0, 1, 2], [70, 23, 7]))


def _check_partition(first, second, num):
    for part in (first, second):
        assert part.dtype == np.int64
        assert np.all(np.diff(part) > 0)  # sorted, no repeats
    assert np.intersect1d(first, second).size == 0
    np.testing.assert_array_equal(np.union1d(first, second), np.arange(num))


@pytest.mark.parametrize("split_fn", [holdout_split, train_val_split])
def test_stratified_splits(split_fn):
    fraction = 0.3
    first, second = split_fn(LABELS, fraction, seed=3)
    _check_partition(first, second, LABELS.size)
    assert second.size == 30  # ceil(0.3 * 100)
    counts = np.bincount(LABELS, minlength=3)
    second_counts = np.bincount(LABELS[second], minlength=3)
    # Every class keeps its share of the split-off part to within one image.
    expected = counts * second.size / LABELS.size
    np.testing.assert_array_less(np.abs(second_counts - expected), 1 + 1e-9)
    assert np.all(second_counts >= 1)

    again = split_fn(LABELS, fraction, seed=3)
    np.testing.assert_array_equal(again[1], second)
    other = split_fn(LABELS, fraction, seed=4)
    assert not np.array_equal(other[1], second)


def test_holdout_split_defaults():
    train, test = holdout_split(LABELS)
    _check_partition(train, test, LABELS.size)
    assert test.size == 25
    np.testing.assert_array_equal(holdout_split(LABELS)[1], test)


@pytest.mark.parametrize(
    "split_fn, name", [(holdout_split, "test_fraction"), (train_val_split, "val_fraction")]
)
def test_split_fraction_errors(split_fn, name):
    for bad in (0, 1, 1.5, -0.1, True, "0.2"):
        with pytest.raises(ValueError, match=rf"number in \(0, 1\). Received: {name}={bad!r}"):
            split_fn(LABELS, bad)
    with pytest.raises(ValueError, match="non-empty 1-D"):
        split_fn(np.array([], np.int64), 0.2)
    with pytest.raises(ValueError, match="integer `labels`"):
        split_fn(np.array([0.0, 1.0, 0.0, 1.0]), 0.5)
    with pytest.raises(ValueError, match="seed=-1"):
        split_fn(LABELS, 0.2, seed=-1)
    # Two classes of two: a 10% split cannot hold both classes.
    with pytest.raises(ValueError, match=rf"at least one example per class.*{name}=0.1"):
        split_fn(np.array([0, 0, 1, 1]), 0.1)


def test_train_val_split_keeps_singletons_in_train():
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 1, 2])
    with pytest.warns(UserWarning, match="1 class\\(es\\) have a single example.*class 2"):
        train, val = train_val_split(labels, val_fraction=0.25, seed=0)
    _check_partition(train, val, labels.size)
    assert 8 in train
    assert set(labels[val]) == {0, 1}


def test_low_data_subset_fraction():
    subset = low_data_subset(LABELS, fraction=0.2, seed=0)
    assert subset.dtype == np.int64
    assert np.all(np.diff(subset) > 0)
    # round(0.2 * [70, 23, 7]) = [14, 5, 1].
    np.testing.assert_array_equal(np.bincount(LABELS[subset], minlength=3), [14, 5, 1])
    # At least one image per class, even where the share rounds to zero.
    np.testing.assert_array_equal(
        np.bincount(LABELS[low_data_subset(LABELS, fraction=0.01)], minlength=3), [1, 1, 1]
    )
    np.testing.assert_array_equal(low_data_subset(LABELS, fraction=1), np.arange(LABELS.size))
    np.testing.assert_array_equal(
        low_data_subset(LABELS, fraction=1.0, seed=9), np.arange(LABELS.size)
    )


def test_low_data_subset_seeds_and_nesting():
    first = low_data_subset(LABELS, fraction=0.3, seed=1)
    np.testing.assert_array_equal(low_data_subset(LABELS, fraction=0.3, seed=1), first)
    assert not np.array_equal(low_data_subset(LABELS, fraction=0.3, seed=2), first)
    # For one seed, smaller fractions are subsets of larger ones.
    small = low_data_subset(LABELS, fraction=0.15, seed=1)
    large = low_data_subset(LABELS, fraction=0.5, seed=1)
    assert set(small) <= set(first) <= set(large)
    assert len(small) < len(first) < len(large)


def test_low_data_subset_per_class():
    subset = low_data_subset(LABELS, per_class=5, seed=0)
    np.testing.assert_array_equal(np.bincount(LABELS[subset]), [5, 5, 5])
    np.testing.assert_array_equal(low_data_subset(LABELS, per_class=5, seed=0), subset)
    assert not np.array_equal(low_data_subset(LABELS, per_class=5, seed=1), subset)
    everything = low_data_subset(LABELS, per_class=7)
    np.testing.assert_array_equal(np.bincount(LABELS[everything]), [7, 7, 7])
    with pytest.raises(ValueError, match="Class 2 has only 7 example.*per_class=8"):
        low_data_subset(LABELS, per_class=8)


def test_low_data_subset_errors():
    with pytest.raises(ValueError, match="exactly one of `fraction` and `per_class`"):
        low_data_subset(LABELS)
    with pytest.raises(ValueError, match="exactly one of `fraction` and `per_class`"):
        low_data_subset(LABELS, fraction=0.5, per_class=3)
    for bad in (0, 1.5, -0.2, True):
        with pytest.raises(ValueError, match=rf"\(0, 1\]. Received: fraction={bad!r}"):
            low_data_subset(LABELS, fraction=bad)
    for bad in (0, -3, 2.5):
        with pytest.raises(ValueError, match=rf"positive int. Received: per_class={bad!r}"):
            low_data_subset(LABELS, per_class=bad)
    with pytest.raises(ValueError, match="non-empty 1-D"):
        low_data_subset(np.zeros((2, 2), np.int64), fraction=0.5)
