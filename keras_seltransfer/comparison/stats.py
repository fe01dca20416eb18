"""Paired statistics of the comparison tables: per-seed differences with
Student-t intervals, and the verdict they allow."""

import numpy as np
from scipy import stats


def paired_interval(differences, confidence=0.95):
    """`(mean, low, high)` of the Student-t interval of paired differences.

    Args:
        differences: per-seed differences (at least 2).
        confidence: the interval's coverage.

    Returns:
        Three floats: the mean difference and the interval's bounds.

    Raises:
        ValueError: for fewer than 2 differences.

    Example:

    >>> paired_interval([1.0, 2.0, 3.0])[0]
    2.0
    """
    d = np.asarray(differences, dtype=np.float64)
    if d.size < 2:
        raise ValueError(f"Need at least 2 paired differences. Received: {d.size}")
    half = stats.t.ppf(0.5 + confidence / 2, d.size - 1) * d.std(ddof=1) / np.sqrt(d.size)
    return float(d.mean()), float(d.mean() - half), float(d.mean() + half)


def verdict(low, high):
    """`"better"`, `"worse"` or `"no difference"`: a difference is real only
    when its interval excludes zero.

    Example:

    >>> verdict(0.01, 0.05), verdict(-0.02, 0.03)
    ('better', 'no difference')
    """
    if low > 0:
        return "better"
    if high < 0:
        return "worse"
    return "no difference"


def paired_differences(results, row, reference, fraction, metric):
    """Per-seed differences `row - reference` at one fraction.

    Args:
        results: cells, dicts with `row`, `fraction`, `seed` and `metric`.
        row, reference: row names.
        fraction: the target fraction.
        metric: e.g. `"balanced_accuracy"`.

    Returns:
        `(seeds, differences)`: the seeds both rows have, and the differences.

    Example:

    >>> cells = [{"row": "a", "fraction": 0.15, "seed": s, "acc": 0.7 + s / 100} for s in (0, 1)]
    >>> cells += [{"row": "b", "fraction": 0.15, "seed": s, "acc": 0.7} for s in (0, 1)]
    >>> paired_differences(cells, "a", "b", 0.15, "acc")[1]
    [0.0, 0.01]
    """
    def by_seed(name):
        return {r["seed"]: r[metric] for r in results if r["row"] == name and r["fraction"] == fraction}

    ours, theirs = by_seed(row), by_seed(reference)
    seeds = sorted(set(ours) & set(theirs))
    return seeds, [round(ours[s] - theirs[s], 12) for s in seeds]


__all__ = ["paired_differences", "paired_interval", "verdict"]
