"""Paired differences of a reproduction's rows, with 95% intervals.

Reads the `results.json` of `tools/reproduce.py` and prints, per ablation,
the per-seed difference parent row minus ablation (test balanced accuracy
and accuracy) with a Student-t 95% interval, and per row the difference to
a reference row at the ablation fraction (default: fine-tuning with
BatchNorm trained, the strongest fine-tuning baseline of the table). A
difference is called real only when its interval excludes zero.

  python tools/paired_ablations.py docs/results/rerun_issue14.json
"""

import common  # noqa: F401  (tools/common.py: environment, repository root on sys.path)

import json
import sys

from keras_seltransfer.comparison.stats import paired_interval


def _line(label, differences):
    mean, low, high = paired_interval(differences)
    verdict = "real" if low > 0 or high < 0 else "interval includes 0"
    return f"| {label} | {mean:+.3f} [{low:+.3f}, {high:+.3f}] | {verdict} |"


def paired_table(results, reference="baseline_bntrain"):
    """Markdown lines of the paired differences of `results` (a loaded
    `results.json`)."""
    cells = {(r["row"], r["fraction"], r["seed"]): r for r in results["runs"]}
    groups = {}
    for run in results["investigations"]:
        groups.setdefault((run["row"], run["parent"]), []).append(run)
    lines = [
        "| parent minus ablation (balanced accuracy / accuracy) | mean [95% interval] | |",
        "|---|---|---|",
    ]
    for (row, parent), runs in groups.items():
        for metric in ("balanced_accuracy", "accuracy"):
            differences = [
                cells[(parent, r["fraction"], r["seed"])][metric] - r[metric]
                for r in runs
                if (parent, r["fraction"], r["seed"]) in cells
            ]
            if len(differences) >= 2:
                lines.append(_line(f"{parent} - {row}, {metric}", differences))
    ref = [r for r in results["investigations"] if r["row"] == reference]
    if ref:
        lines += ["", f"| row minus {reference} (balanced accuracy) | mean [95% interval] | |",
                  "|---|---|---|"]
        for row in sorted({r["row"] for r in results["runs"]}):
            differences = [
                cells[(row, r["fraction"], r["seed"])]["balanced_accuracy"] - r["balanced_accuracy"]
                for r in ref
                if (row, r["fraction"], r["seed"]) in cells
            ]
            if len(differences) >= 2:
                lines.append(_line(f"{row} - {reference}", differences))
    return lines


def main(argv):
    if len(argv) != 2:
        common.fail("usage: python tools/paired_ablations.py RESULTS_JSON")
    with common.errors_reported(ValueError, OSError, KeyError):
        with open(argv[1]) as f:
            results = json.load(f)
        print("\n".join(paired_table(results)))


if __name__ == "__main__":
    main(sys.argv)
