"""The command-line apps, run as a user runs them: in their own processes."""

import dataclasses
import os
import subprocess
import sys

import pytest
import tensorflow as tf

from keras_seltransfer import training
from tests import helpers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
    result = _run("apps.finetune", "--helpfull")
    assert result.returncode == 0, result.stderr
    for field in dataclasses.fields(training.FinetuneConfig):
        assert f"--{field.name}" in result.stdout or f"--[no]{field.name}" in result.stdout, field.name


@pytest.mark.parametrize(
    "args, message",
    [
        (["--fraction=2"], "fraction"),
        (["--method=magic"], "method"),
        (["--no_such_flag=1"], "no_such_flag"),
        (["stray"], "Unexpected positional arguments"),
        (["--backbone=/nonexistent/model.keras"], "Backbone file not found"),
        (["--target=mnist_typo"], "Unknown data set spec"),
    ],
)
def test_finetune_rejects_bad_input_clearly(args, message, tmp_path):
    result = _run("apps.finetune", *args, f"--output_dir={tmp_path / 'run'}")
    assert result.returncode != 0
    assert message in result.stderr
    assert "Traceback" not in result.stderr


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
