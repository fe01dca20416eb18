"""tools/paired_ablations.py: paired intervals of a reproduction's ablations."""

import json
import os
import subprocess
import sys

import pytest

from tests import helpers

TOOL = os.path.join(helpers.REPO_ROOT, "tools", "paired_ablations.py")


@pytest.fixture
def tool(monkeypatch):
    monkeypatch.syspath_prepend(os.path.join(helpers.REPO_ROOT, "tools"))
    import paired_ablations

    return paired_ablations


def test_interval_is_the_student_t_interval(tool):
    mean, low, high = tool.paired_interval([1.0, 2.0, 3.0])
    # std 1 (ddof 1), t(0.975, 2) = 4.302653: half-width 4.302653 / sqrt(3).
    assert mean == 2.0
    assert high - mean == pytest.approx(4.302653 / 3**0.5, rel=1e-6)
    assert mean - low == pytest.approx(high - mean)
    with pytest.raises(ValueError, match="at least 2 paired differences"):
        tool.paired_interval([1.0])


def _results():
    runs = [
        {"row": row, "fraction": 0.15, "seed": s, "accuracy": acc + 0.01 * s,
         "balanced_accuracy": acc + 0.01 * s}
        for row, acc in (("sjft", 0.8), ("baseline", 0.7))
        for s in range(3)
    ]
    investigations = [
        {"row": "sjft_before", "parent": "sjft", "fraction": 0.15, "seed": s,
         "accuracy": 0.8 + 0.01 * s + (0.01, -0.01, 0.0)[s],
         "balanced_accuracy": 0.8 + 0.01 * s + (0.01, -0.01, 0.0)[s]}
        for s in range(3)
    ] + [
        {"row": "baseline_bntrain", "parent": "baseline", "fraction": 0.15, "seed": s,
         "accuracy": 0.75, "balanced_accuracy": 0.75 + 0.001 * s}
        for s in range(3)
    ]
    return {"runs": runs, "investigations": investigations}


def test_table_calls_a_difference_real_only_when_its_interval_excludes_zero(tool):
    lines = tool.paired_table(_results())
    text = "\n".join(lines)
    assert "| sjft - sjft_before, balanced_accuracy | +0.000 [" in text
    assert "interval includes 0" in text.split("sjft - sjft_before, balanced_accuracy")[1].split("\n")[0]
    sjft_line = [line for line in lines if line.startswith("| sjft - baseline_bntrain")][0]
    assert sjft_line.endswith("| real |")  # +0.05 every seed
    baseline_line = [line for line in lines if line.startswith("| baseline - baseline_bntrain")][0]
    assert "-0.04" in baseline_line and baseline_line.endswith("| real |")


@pytest.mark.slow
def test_command_line(tmp_path):
    path = tmp_path / "results.json"
    path.write_text(json.dumps(_results()))
    ok = subprocess.run([sys.executable, TOOL, str(path)], capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert "sjft - baseline_bntrain" in ok.stdout
    bad = subprocess.run([sys.executable, TOOL, str(tmp_path / "missing.json")],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "paired_ablations: error:" in bad.stderr
    assert "missing.json" in bad.stderr
