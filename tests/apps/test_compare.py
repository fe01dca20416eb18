"""apps.compare end to end on tiny data: its help, flag errors, the
comparison, its outputs, and resuming from the run cache. Every command line runs in one
process (tests/apps/app_driver.py), as a user would run it."""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from scipy import stats as scipy_stats

from tests import helpers

ROOT = helpers.REPO_ROOT


def _drive(cases, work):
    """Runs `cases` (id, argv) of apps.compare in one process; results by id."""
    cases = [{"id": i, "app": "apps.compare", "argv": argv, "timeout": 300} for i, argv in cases]
    (work / "cases.json").write_text(json.dumps(cases))
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=ROOT)
    done = subprocess.run(
        [sys.executable, "-m", "tests.apps.app_driver", str(work / "cases.json"),
         str(work / "out.json")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return {r["id"]: r for r in json.loads((work / "out.json").read_text())}


@pytest.mark.slow
def test_compare_runs_tabulates_resumes_and_rejects_bad_flags(tmp_path):
    target = helpers.write_npz(tmp_path / "target.npz", num_per_class=20)
    backbone = helpers.saved_backbone(tmp_path / "backbone.keras")
    out = tmp_path / "out"
    args = [
        f"--target=numpy:{target}", f"--backbone={backbone}", f"--output_dir={out}",
        "--methods=baseline,linear_probe", "--fractions=1", "--seeds=0,1", "--tune_seeds=0",
        "--trials=4", "--epochs=1", "--image_size=16", "--batch_size=8",
    ]
    results = _drive([
        ("help", ["--helpfull"]),
        ("bad_method", [*args, "--methods=baseline,nonsense"]),
        ("bad_fraction", [*args, "--fractions=0.5,1.5"]),
        ("not_a_fraction", [*args, "--fractions=half"]),
        ("first", args),
        ("again", args),
        ("table_only", [*args, "--table_only", "--noplot"]),
        ("changed", [*args, "--epochs=2"]),
    ], tmp_path)

    shown = results["help"]["stdout"]
    assert "Compares fine-tuning methods on your own data" in shown
    for flag in ("--target", "--methods", "--fractions", "--seeds", "--trials", "--quick",
                 "--table_only", "--output_dir", "--backbone_weights", "--runs_dir"):
        assert flag in shown, flag
    assert "antialias_ft" in shown and "KTFT" in shown  # the rows are listed

    bad = results["bad_method"]
    assert bad["rc"] == 2 and "Traceback" not in bad["stderr"]
    assert "Unknown: ['nonsense']" in bad["stderr"] and "'lp_ft'" in bad["stderr"]
    assert "Received: methods=baseline,nonsense" in bad["stderr"]
    assert results["bad_fraction"]["rc"] == 2
    assert "Received: fractions=0.5,1.5" in results["bad_fraction"]["stderr"]
    assert "Received: fractions=half" in results["not_a_fraction"]["stderr"]

    first = results["first"]
    assert first["rc"] == 0, first["stderr"][-3000:]
    # In table order: linear_probe: 1 search run at seed 0 (also the grid's
    # seed-0 cell), then seed 1; baseline: 4 search runs, then seed 1. Every
    # run is numbered.
    training = re.findall(r"\[(\d+)/(\d+)\] (\S+) 1 seed (\d) \[[^]]*\]: training", first["stdout"])
    assert [(int(k), int(n)) for k, n, _, _ in training] == [(k, 7) for k in range(1, 8)]
    assert [row for _, _, row, _ in training] == ["linear_probe"] * 2 + ["baseline"] * 5
    # (The rejected command lines before it trained nothing: all 7 are new.)
    assert "7 runs trained now" in first["stdout"]

    document = json.loads((out / "results.json").read_text())
    choices = document["choices"]
    assert [t["stage"] for t in choices["baseline"]["trials"]] == [1, 1, 1, 1]
    for name, choice in choices.items():
        best = min(choice["trials"], key=lambda t: t["validation_loss"])
        assert choice["overrides"] == best["overrides"], name
    baselines = {n: c["validation_loss"] for n, c in choices.items() if c["kind"] == "baseline"}
    assert document["best_baseline"] == min(baselines, key=baselines.get)
    assert {(r["row"], r["seed"]) for r in document["runs"]} == {
        (row, seed) for row in ("baseline", "linear_probe") for seed in (0, 1)
    }
    # The paired differences, recomputed from the runs.
    best = document["best_baseline"]
    other = ({"baseline", "linear_probe"} - {best}).pop()
    by = {(r["row"], r["seed"]): r for r in document["runs"]}
    for p in document["paired"]:
        assert (p["row"], p["reference"]) == (other, best)
        d = np.array([by[other, s][p["metric"]] - by[best, s][p["metric"]] for s in (0, 1)])
        assert abs(p["mean"] - d.mean()) < 1e-9
        if d.std() > 0:
            interval = scipy_stats.ttest_1samp(d, 0.0).confidence_interval(0.95)
            assert abs(p["low"] - interval.low) < 1e-9 and abs(p["high"] - interval.high) < 1e-9
    table = (out / "results_table.md").read_text()
    assert "| Fine-tuning | - | baseline |" in table and "Paired differences" in table
    assert table.strip() in first["stdout"].replace("\r", "")
    assert (out / "accuracy_vs_fraction.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # Rerunning trains nothing: everything comes from the cache.
    again = results["again"]
    assert again["rc"] == 0, again["stderr"][-3000:]
    assert ": training" not in again["stdout"] and "0 runs trained now" in again["stdout"]
    assert json.loads((out / "results.json").read_text())["runs"] == document["runs"]
    table_only = results["table_only"]
    assert table_only["rc"] == 0 and ": training" not in table_only["stdout"]
    assert (out / "results_table.md").read_text().split("\n\n", 1)[1] == table.split("\n\n", 1)[1]

    # A cache made with another budget is refused, not silently reused.
    changed = results["changed"]
    assert changed["rc"] == 2 and "other settings" in changed["stderr"]
    assert "epochs: cached 1, asked 2" in changed["stderr"]
