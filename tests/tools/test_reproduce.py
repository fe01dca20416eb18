"""Smoke test of tools/reproduce.py on tiny data (the full run is not a test)."""

import json
import os
import re
import subprocess
import sys

import pytest

from tests import helpers

ROOT = helpers.REPO_ROOT


def _reproduce(*args, timeout=600):
    return helpers.run_tool("reproduce.py", "--protocol=paper", *args, timeout=timeout)


# The papers' protocol (`--protocol=paper`) end to end; the default run
# covers the deconfounded protocol end to end (tests/tools/test_protocol.py).
@pytest.mark.slow
def test_reproduce_tunes_caches_resumes_and_tabulates(tmp_path):
    target = helpers.write_npz(tmp_path / "target.npz", num_per_class=40)
    source = helpers.write_npz(tmp_path / "source.npz", num_per_class=20, num_classes=3, seed=4)
    backbone = helpers.saved_backbone(tmp_path / "backbone.keras")
    out = tmp_path / "results"
    args = [
        f"--target=numpy:{target}", f"--source=numpy:{source}", f"--backbone={backbone}",
        f"--output_dir={out}", "--rows=baseline,sjft_nogrowth", "--fractions=0.5,1",
        "--seeds=0", "--epochs=1", "--tune_lrs=0.01,0.001", "--tune_fraction=0.5",
        "--image_size=16", "--batch_size=8", "--noplots", "--noinvestigations",
    ]
    first = _reproduce(*args)
    assert first.returncode == 0, first.stderr[-3000:]
    # Two tuning runs per row, one of which is also the grid's 50% cell.
    assert first.stdout.count(": training") == 2 * 3
    results = json.load(open(out / "results.json"))
    assert {r["row"] for r in results["runs"]} == {"baseline", "sjft_nogrowth"}
    assert len(results["runs"]) == 4
    for row, choice in results["choices"].items():
        losses = choice["validation_loss"]
        assert set(losses) == {"0.01", "0.001"}
        assert choice["learning_rate"] == float(min(losses, key=losses.get)), row
    table = (out / "results_table.md").read_text()
    assert "Fine-tuning (no source)" in table and "SJFT without iterative neighbour growth" in table
    assert (out / "runs" / "index" / "conv" / "neighbours.npz").is_file()

    # The discussion around the table in RESULTS.md survives a rebuild.
    results_md = out / "RESULTS.md"
    results_md.write_text(
        "intro\n" + results_md.read_text().strip() + "\ndiscussion\n"
    )
    second = _reproduce(*args)
    assert second.returncode == 0, second.stderr[-3000:]
    assert ": training" not in second.stdout  # everything came from the cache
    assert json.load(open(out / "results.json"))["runs"] == results["runs"]
    text = results_md.read_text()
    assert text.startswith("intro\n") and text.endswith("discussion\n")
    assert "Fine-tuning (no source)" in text

    # --table_only trains nothing and rebuilds the same tables from the cache.
    table_only = _reproduce(*args, "--table_only")
    assert table_only.returncode == 0, table_only.stderr[-3000:]
    assert ": training" not in table_only.stdout
    assert json.load(open(out / "results.json"))["runs"] == results["runs"]
    assert (out / "results_table.md").read_text() == table

    # A cache made with another budget is refused, not silently reused.
    changed = _reproduce(*[a if a != "--epochs=1" else "--epochs=2" for a in args])
    assert changed.returncode == 2
    assert "other settings" in changed.stderr and "epochs" in changed.stderr

    # The diagnostics read the same cache: no AdaFilter row here, and the
    # anti-aliased pretrained backbone measured on the source's test images.
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=ROOT)
    diagnosis = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tools", "diagnose_results.py"),
         f"--results={out / 'results.json'}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert diagnosis.returncode == 0, diagnosis.stderr[-3000:]
    assert "adafilter: no runs" in diagnosis.stdout
    accuracies = re.findall(r"(as trained|antialias filt_size=\d[^:]*): accuracy (\d\.\d+)", diagnosis.stdout)
    assert [name for name, _ in accuracies] == [
        "as trained", "antialias filt_size=2", "antialias filt_size=4", "antialias filt_size=4, stem kept",
    ]
    assert all(0 <= float(a) <= 1 for _, a in accuracies)
    missing = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tools", "diagnose_results.py"),
         f"--results={tmp_path / 'nothing.json'}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )
    assert missing.returncode != 0 and "run tools/reproduce.py first" in missing.stderr
    bad = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tools", "diagnose_results.py"),
         f"--results={out / 'results.json'}", "--fractions=half"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )
    assert bad.returncode != 0 and "--fractions must be numbers" in bad.stderr
    assert "Traceback" not in bad.stderr
