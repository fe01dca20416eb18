"""tools/diagnose_filter_transfer.py on one tiny filter-transfer run."""

import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from keras_seltransfer import training
from tests import helpers

ROOT = helpers.REPO_ROOT
TOOL = os.path.join(ROOT, "tools", "diagnose_filter_transfer.py")


def _tool_module(monkeypatch):
    # Load the tool as `python tools/x.py` runs it: with tools/ first on
    # sys.path, where its start-up helper (tools/common.py) is found.
    monkeypatch.syspath_prepend(os.path.dirname(TOOL))
    spec = importlib.util.spec_from_file_location("diagnose_filter_transfer", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_measures_validation_test_and_gap_of_a_run(tmp_path, monkeypatch):
    backbone = helpers.saved_backbone(tmp_path / "backbone.keras", pretrain_epochs=1)
    target = "numpy:" + helpers.write_npz(tmp_path / "target.npz", num_per_class=40)
    run = tmp_path / "runs" / "ft-seed0"
    config = helpers.small_run_config(
        method="filter_transfer", target=target, backbone=backbone, output_dir=str(run),
        export=False,
    )
    training.finetune(config)
    result = _tool_module(monkeypatch).measure_run(str(run))
    report = json.load(open(run / "report.json"))
    history = report["history"]
    best = int(np.argmin(history["val_crossentropy"]))
    # The saved model is the kept epoch's, so its accuracy on the run's own
    # validation images is the one Keras logged for that epoch.
    np.testing.assert_allclose(result["val_accuracy"], history["val_accuracy"][best], atol=1e-6)
    assert result["val_crossentropy"] == history["val_crossentropy"][best]
    assert 0 <= result["val_balanced_accuracy"] <= 1
    assert result["test_accuracy"] == report["accuracy"]
    assert sorted(result["gap_layers"]) == ["block1_conv", "block2_conv"]
    assert result["gap_reinit_mean"] >= 0 and result["gap_transferred_mean"] >= 0

    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=ROOT)
    output = tmp_path / "compare.json"
    done = subprocess.run(
        [sys.executable, TOOL, "--seeds=0", f"--runs=a={tmp_path}/runs/ft-seed{{seed}}",
         f"--output={output}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| a | " in done.stdout
    saved = json.load(open(output))
    assert saved["a"]["0"]["val_accuracy"] == result["val_accuracy"]
    bad = subprocess.run(
        [sys.executable, TOOL, "--runs=a=runs/no-seed-here"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )
    assert bad.returncode != 0 and "with {seed} in the pattern" in bad.stderr
    assert "Traceback" not in bad.stderr
