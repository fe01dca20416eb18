"""The run cache of a comparison: finished runs are reused, never redone.

Every run is one `apps.finetune`-style run directory (`search.run_dir`) with
the run's `config.json` and, once it finished, its `report.json`. A finished
run is reused only when its stored configuration matches the one asked for
in every field that changes what the run computes; otherwise the cache is
refused with an error, never silently reused. Fields a newer library added
are compared only when the cache has them, so a cache written before a new
option existed (with the option's default behaviour) is still reused.
"""

import dataclasses
import json
import os

# Fields that do not change what a run computes.
NOT_COMPARED = frozenset({"output_dir", "verbose", "tensorboard", "export", "index_dir", "force"})


def changed_fields(stored, wanted):
    """The configuration fields in which a cached run differs from the asked one.

    Args:
        stored: the cached run's `config.json` (a dict).
        wanted: the asked configuration (a dict of `FinetuneConfig` fields).

    Returns:
        The sorted names of the fields of `wanted` outside `NOT_COMPARED`
        whose stored value differs; a field the cache lacks is not a
        difference.

    Example:

    >>> changed_fields({"epochs": 3, "verbose": 2}, {"epochs": 20, "verbose": 0})
    ['epochs']
    """
    return sorted(
        k for k in wanted if k not in NOT_COMPARED and stored.get(k, wanted[k]) != wanted[k]
    )


def cached_report(config):
    """The report of a finished run of `config`, or None.

    Args:
        config: the cell's `FinetuneConfig`; its `output_dir` is the cache
            directory.

    Returns:
        The run's `report.json` as a dict, or None when the run has not
        finished.

    Raises:
        ValueError: if the cache holds a run of a different configuration.

    Example:

    >>> config = FinetuneConfig(output_dir="runs/compare/elpv/baseline/defaults-f0.15-seed0")
    >>> cached_report(config) is None  # not run yet
    True
    """
    report_path = os.path.join(config.output_dir, "report.json")
    if not os.path.isfile(report_path):
        return None
    with open(os.path.join(config.output_dir, "config.json")) as f:
        stored = json.load(f)
    wanted = dataclasses.asdict(config)
    changed = changed_fields(stored, wanted)
    if changed:
        details = ", ".join(f"{k}: cached {stored.get(k)!r}, asked {wanted[k]!r}" for k in changed)
        raise ValueError(
            f"The cached run in {config.output_dir} was made with other settings ({details}); "
            "pass another --runs_dir or remove it."
        )
    with open(report_path) as f:
        return json.load(f)


def read_json(path):
    """A cached JSON file (a measurement stored beside a run), or None when absent.

    Args:
        path: the file.

    Returns:
        The parsed JSON, or None.

    Example:

    >>> read_json("runs/compare/elpv/never_written.json") is None
    True
    """
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


__all__ = ["NOT_COMPARED", "cached_report", "changed_fields", "read_json"]
