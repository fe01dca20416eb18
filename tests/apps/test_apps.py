"""The command-line apps, run as a user runs them: in their own processes."""

import dataclasses
import json
import os
import re
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_seltransfer import training
from tests import helpers

ROOT = helpers.REPO_ROOT


def _run(*args, cwd=ROOT, timeout=300):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=ROOT)
    return subprocess.run(
        [sys.executable, "-m", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_finetune_help_documents_every_config_field():
    result = _run("apps.finetune", "--help")
    assert result.returncode in (0, 1), result.stderr  # absl exits 1 after help
    assert "Fine-tunes a pretrained backbone" in result.stdout
    for field in dataclasses.fields(training.FinetuneConfig):
        assert f"--{field.name}" in result.stdout or f"--[no]{field.name}" in result.stdout, field.name


def test_pretrain_finetune_evaluate_export_end_to_end(tmp_path):
    source = helpers.write_npz(tmp_path / "source.npz", num_classes=3)
    target = helpers.write_npz(tmp_path / "target.npz", num_per_class=30, seed=1)
    common = ["--image_size=16", "--batch_size=16", "--verbose=0", "--notensorboard"]
    pre = _run(
        "apps.pretrain", f"--source=numpy:{source}", f"--output_dir={tmp_path / 'pre'}",
        "--epochs=1", *common,
    )
    assert pre.returncode == 0, pre.stderr
    assert "backbone:" in pre.stdout
    backbone = tmp_path / "pre" / "model.keras"
    assert backbone.is_file()

    ft = _run(
        "apps.finetune", f"--target=numpy:{target}", f"--backbone={backbone}",
        f"--output_dir={tmp_path / 'ft'}", "--epochs=3", "--method=l2sp", *common,
    )
    assert ft.returncode == 0, ft.stderr
    assert "test accuracy" in ft.stdout and "SavedModel:" in ft.stdout
    model = tmp_path / "ft" / "model.keras"

    ev = _run("apps.evaluate", f"--model={model}", f"--data=numpy:{target}")
    assert ev.returncode == 0, ev.stderr
    assert (tmp_path / "ft" / "evaluation.json").is_file()

    ex = _run("apps.export", f"--model={model}", f"--output={tmp_path / 'exported'}")
    assert ex.returncode == 0, ex.stderr
    served = tf.saved_model.load(str(tmp_path / "exported"))
    images = helpers.easy_images(2, seed=3)[0]
    assert served.serve(tf.constant(images))["probabilities"].shape == (4, 2)

    again = _run("apps.export", f"--model={model}", f"--output={tmp_path / 'exported'}")
    assert again.returncode == 2 and "Refusing to overwrite" in again.stderr


@pytest.mark.slow
def test_finetune_resumes_after_sigkill_to_the_uninterrupted_result(tmp_path):
    """SIGKILL in the middle of an epoch, rerun the same command: the run resumes
    from its last checkpoint and, with op determinism, ends with exactly the
    weights and history of a run that was never interrupted (same batches,
    flips and dropout masks after the resume)."""
    import json
    import signal
    import time

    target = helpers.write_npz(tmp_path / "target.npz", num_per_class=80)
    backbone = helpers.saved_backbone(tmp_path / "backbone.keras")

    def args(run_dir):
        return [
            sys.executable, "-m", "apps.finetune", f"--target=numpy:{target}",
            f"--backbone={backbone}", f"--output_dir={run_dir}", "--image_size=16",
            "--batch_size=8", "--epochs=24", "--patience=24", "--verbose=2", "--dropout=0.3",
            "--deterministic", "--notensorboard", "--noexport",
        ]

    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=ROOT)
    run_dir = tmp_path / "run"
    log = open(tmp_path / "first.log", "w")
    first = subprocess.Popen(args(run_dir), cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and first.poll() is None:
            if "Epoch 4/24" in (tmp_path / "first.log").read_text():
                break
            time.sleep(0.05)
        assert first.poll() is None, "the run ended before it could be interrupted"
        time.sleep(0.1)  # into the epoch's steps
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
    finally:
        if first.poll() is None:
            first.kill()
        log.close()
    assert not (run_dir / "report.json").exists()
    assert (run_dir / "backup").is_dir()

    second = subprocess.run(args(run_dir), cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr
    assert "Resuming from the checkpoint after epoch" in second.stdout
    epochs = [line for line in second.stdout.splitlines() if line.startswith("Epoch ")]
    assert epochs and epochs[0] != "Epoch 1/24", epochs[:3]
    resumed = json.load(open(run_dir / "report.json"))
    assert resumed["resumed_from_epoch"] >= 2
    assert not (run_dir / "backup").exists()

    reference_dir = tmp_path / "reference"
    reference = subprocess.run(
        args(reference_dir), cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert reference.returncode == 0, reference.stderr
    expected = json.load(open(reference_dir / "report.json"))
    start = resumed["resumed_from_epoch"]
    for key, values in expected["history"].items():
        np.testing.assert_allclose(resumed["history"][key], values[start:], rtol=1e-6, err_msg=key)
    a = keras.saving.load_model(str(run_dir / "model.keras"))
    b = keras.saving.load_model(str(reference_dir / "model.keras"))
    for wa, wb in zip(a.get_weights(), b.get_weights()):
        np.testing.assert_array_equal(wa, wb)


@pytest.mark.slow
def test_finetune_sjft_end_to_end(tmp_path):
    source = helpers.write_npz(tmp_path / "source.npz", num_per_class=30, num_classes=3, seed=4)
    target = helpers.write_npz(tmp_path / "target.npz", num_per_class=24, seed=1)
    backbone = helpers.saved_backbone(tmp_path / "backbone.keras")
    run = tmp_path / "sjft"
    result = _run(
        "apps.finetune", "--method=sjft", f"--source=numpy:{source}", f"--target=numpy:{target}",
        f"--backbone={backbone}", f"--index_dir={tmp_path / 'index'}", f"--output_dir={run}",
        "--image_size=16", "--batch_size=8", "--epochs=2", "--k0=2", "--k_max=8",
        "--growth_period=1", "--verbose=0", "--notensorboard",
    )
    assert result.returncode == 0, result.stderr
    assert "sjft on numpy:" in result.stdout and "two-head model:" in result.stdout
    for name in ("model.keras", "multitask.keras", "saved_model", "report.json"):
        assert (run / name).exists(), name
    assert (tmp_path / "index" / "neighbours.npz").is_file()

    odd = _run(
        "apps.finetune", "--method=sjft", f"--source=numpy:{source}", f"--target=numpy:{target}",
        f"--backbone={backbone}", f"--output_dir={tmp_path / 'odd'}", "--batch_size=7",
    )
    assert odd.returncode == 2
    assert "batch_size" in odd.stderr and "Traceback" not in odd.stderr


@pytest.mark.slow  # the default run keeps its cheaper sibling
def test_finetune_sjft_on_a_keras_application_without_a_saved_backbone(tmp_path):
    # The most common user path: a keras.applications name, then SJFT; the
    # conv bank comes from that backbone (random weights here, no download),
    # the index into the default directory named after the network.
    source = helpers.write_npz(tmp_path / "source.npz", num_per_class=12, num_classes=3, seed=4)
    target = helpers.write_npz(tmp_path / "target.npz", num_per_class=12, seed=1)
    result = _run(
        "apps.finetune", "--method=sjft", f"--source=numpy:{source}", f"--target=numpy:{target}",
        "--backbone=MobileNetV2", "--output_dir=run", "--image_size=32", "--batch_size=8",
        "--epochs=1", "--k0=2", "--k_max=4", "--verbose=0", "--notensorboard", "--noexport",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert "sjft on numpy:" in result.stdout
    (index,) = (tmp_path / "runs" / "index").iterdir()
    assert re.fullmatch(r".*-conv-mobilenetv2-[0-9a-f]{8}", index.name)
    with np.load(index / "neighbours.npz") as stored:
        config = json.loads(str(stored["config"]))
    assert config["backbone"] == "MobileNetV2" and config["channels"] is None
    model = keras.saving.load_model(str(tmp_path / "run" / "model.keras"))
    assert tuple(model.input.shape) == (None, 32, 32, 3)
