"""tools/ktft_same_task.py end to end on a tiny 10-class network."""

import json
import os
import subprocess
import sys

import pytest

from tests import helpers

ROOT = helpers.REPO_ROOT
TOOL = os.path.join(ROOT, "tools", "ktft_same_task.py")


def _run(tmp_path, backbone):
    return subprocess.run(
        [
            sys.executable, TOOL, f"--backbone={backbone}", "--seeds=0,1", "--learning_rates=1e-3",
            "--epochs=1", "--per_class=3", "--shift_images=20", "--filt_size=3",
            f"--results={tmp_path / 'k.json'}", f"--table={tmp_path / 'k.md'}",
        ],
        cwd=ROOT, capture_output=True, text=True, timeout=900,
    )


@pytest.mark.slow  # the default run keeps its cheaper sibling
def test_scores_every_row_caches_cells_and_writes_the_table(tmp_path):
    backbone = helpers.saved_backbone(tmp_path / "b.keras", num_classes=10, pretrain_epochs=1)
    first = _run(tmp_path, backbone)
    assert first.returncode == 0, first.stderr[-2000:]
    cells = json.load(open(tmp_path / "k.json"))["cells"]
    assert len(cells) == 2 * 10
    for cell in cells.values():
        assert 0.0 <= cell["accuracy"] <= 1.0 and 0.0 <= cell["shift_consistency"] <= 1.0
    # Untrained rows have no validation loss; trained rows do.
    assert cells["original|0"]["val_crossentropy"] is None
    assert cells["KTFT recal|1"]["val_crossentropy"] > 0
    # The original is scored as it is: the same accuracy for every seed.
    assert cells["original|0"]["accuracy"] == cells["original|1"]["accuracy"]
    table = open(tmp_path / "k.md").read()
    assert "| KTFT recal + logit |" in table and "| original |" in table
    # A rerun trains nothing: every cell comes from the cache.
    again = _run(tmp_path, backbone)
    assert again.returncode == 0, again.stderr[-2000:]
    assert " seed " not in again.stdout.split("Fashion-MNIST")[0]
    assert json.load(open(tmp_path / "k.json"))["cells"] == cells


def test_missing_backbone_is_a_clear_error(tmp_path):
    result = _run(tmp_path, tmp_path / "absent.keras")
    assert result.returncode == 2
    assert "absent.keras does not exist" in result.stderr
