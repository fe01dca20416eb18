"""tools/results/plots.py: which plots are written from a fake result set."""

import json

import pytest

from tools.results import plots

pytest.importorskip("matplotlib")


def test_write_plots_skips_what_has_no_runs(tmp_path, make_settings):
    settings = make_settings(rows=("baseline", "adafilter"), fractions=[0.15, 1.0])
    run_dir = tmp_path / "runs" / "adafilter" / "lr0.001-f0.15-seed0"
    run_dir.mkdir(parents=True)
    (run_dir / "report.json").write_text(json.dumps(
        {"adafilter": {"val_gate_usage_per_layer": {"conv1": 0.4, "conv2": 0.7}}}
    ))
    results = [
        {"row": "baseline", "fraction": f, "seed": 0, "accuracy": 0.7, "balanced_accuracy": 0.5}
        for f in (0.15, 1.0)
    ] + [{"row": "adafilter", "fraction": 0.15, "seed": 0, "accuracy": 0.7,
          "balanced_accuracy": 0.6, "run_dir": str(run_dir)}]
    shift = {("baseline", 0.15, 0): {"consistency": 0.9,
                                     "sweep": {"shifts": [-1, 0, 1], "accuracy": [0.6, 0.7, 0.6]}}}
    written = plots.write_plots(settings, results, shift)
    assert written == ["accuracy_vs_fraction.png", "adafilter_gate_usage.png", "shift_consistency.png"]
    for name in written:
        assert (tmp_path / name).read_bytes().startswith(b"\x89PNG")
    assert plots.write_plots(settings, [], {}) == []
