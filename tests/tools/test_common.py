"""tools/common.py: the start-up and error reporting every tool shares."""

import os
import re
import subprocess
import sys

import pytest
from absl import app

from tools import common

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_fail_prints_the_tool_and_exits_2(capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["tools/some_tool.py"])
    with pytest.raises(SystemExit) as exit_info:
        common.fail("the backbone is missing")
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == "some_tool: error: the backbone is missing\n"


def test_errors_reported_turns_only_the_given_kinds_into_fail(capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["reproduce.py"])
    with pytest.raises(SystemExit) as exit_info:
        with common.errors_reported(ValueError):
            raise ValueError("cached run differs")
    assert exit_info.value.code == 2
    assert "reproduce: error: cached run differs" in capsys.readouterr().err
    with pytest.raises(KeyError):
        with common.errors_reported(ValueError):
            raise KeyError("a bug, not a user error")


def test_reject_arguments():
    common.reject_arguments(["tool.py"])
    with pytest.raises(app.UsageError, match=r"Unexpected arguments: \['stray'\]"):
        common.reject_arguments(["tool.py", "stray"])


def test_repeatable_cpu_arithmetic_refuses_after_tensorflow(monkeypatch):
    import tensorflow  # noqa: F401  (the test session has it loaded)

    monkeypatch.delenv("TF_ENABLE_ONEDNN_OPTS", raising=False)
    with pytest.raises(RuntimeError, match="before TensorFlow is imported"):
        common.repeatable_cpu_arithmetic()
    monkeypatch.setenv("TF_ENABLE_ONEDNN_OPTS", "1")
    common.repeatable_cpu_arithmetic()  # the caller's choice stands
    assert os.environ["TF_ENABLE_ONEDNN_OPTS"] == "1"


def test_a_tool_runs_from_the_root_without_pythonpath():
    """`python tools/x.py` finds the package through tools/common.py alone
    (no PYTHONPATH); a stray argument is a usage error."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run(
        [sys.executable, "tools/show_neighbours.py", "--index_dir=/nonexistent"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 1, result.stderr[-2000:]
    assert "ModuleNotFoundError" not in result.stderr and "Traceback" not in result.stderr
    assert "/nonexistent" in result.stderr
    stray = subprocess.run(
        [sys.executable, "tools/show_neighbours.py", "stray"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )
    assert stray.returncode == 1 and "Unexpected arguments: ['stray']" in stray.stderr


def test_describe_device_on_cpu_names_the_cores_and_tensorflow(monkeypatch):
    import tensorflow as tf

    monkeypatch.setattr(tf.config, "list_physical_devices", lambda kind=None: [])
    line = common.describe_device()
    assert line == f"device: CPU ({os.cpu_count()} cores), TensorFlow {tf.__version__}"


def test_describe_device_names_each_gpu(monkeypatch):
    import tensorflow as tf

    gpus = [tf.config.PhysicalDevice(f"/physical_device:GPU:{i}", "GPU") for i in range(2)]
    details = {gpus[0]: {"device_name": "NVIDIA H100 80GB HBM3"}, gpus[1]: {}}
    monkeypatch.setattr(
        tf.config, "list_physical_devices", lambda kind=None: gpus if kind == "GPU" else []
    )
    monkeypatch.setattr(tf.config.experimental, "get_device_details", details.__getitem__)
    assert common.describe_device() == (
        "device: 2 GPUs (NVIDIA H100 80GB HBM3, /physical_device:GPU:1), "
        f"TensorFlow {tf.__version__}"
    )


def test_describe_device_here_is_the_real_cpu_line():
    """No mock: on this machine (no GPU in the test environment) the line is the CPU's."""
    import tensorflow as tf

    if tf.config.list_physical_devices("GPU"):
        pytest.skip("a GPU is visible")
    assert re.fullmatch(r"device: CPU \(\d+ cores\), TensorFlow \S+", common.describe_device())


def test_precision_scope_sets_the_policy_and_rejects_unknown_names(capsys, monkeypatch):
    import keras

    with common.precision_scope("mixed_bfloat16"):
        assert keras.layers.Conv2D(2, 3).compute_dtype == "bfloat16"
    assert keras.config.dtype_policy().name == "float32"
    monkeypatch.setattr(sys, "argv", ["tools/bench_x.py"])
    with pytest.raises(SystemExit) as exit_info:
        common.precision_scope("float16")
    assert exit_info.value.code == 2
    assert "--precision must be one of ('float32', 'mixed_float16', 'mixed_bfloat16'). " \
        "Received: 'float16'" in capsys.readouterr().err


def test_load_backbone_casts_a_saved_backbone_to_the_precision(tmp_path):
    """A saved .keras keeps its own policy under a global one; load_backbone casts it."""
    from keras_seltransfer import models
    from keras_seltransfer.utils.io import save_model_atomic

    path = str(tmp_path / "backbone.keras")
    save_model_atomic(models.load_backbone("small_cnn", (16, 16, 1)), path)

    def conv_dtype(model):
        return next(l for l in model.layers if "Conv" in type(l).__name__).compute_dtype

    with common.precision_scope("mixed_bfloat16"):
        assert conv_dtype(models.load_backbone(path, (16, 16, None))) == "float32"
        assert conv_dtype(common.load_backbone(path, (16, 16, None), "mixed_bfloat16")) == "bfloat16"
        assert conv_dtype(common.load_backbone("small_cnn", (16, 16, 1), "mixed_bfloat16")) == "bfloat16"


def test_benchmark_results_leave_out_the_output_argument(monkeypatch):
    monkeypatch.setattr(
        sys, "argv", ["bench_x.py", "--rounds=1", "--output", "a.json", "--output=b.json", "--k=2"]
    )
    results = common.benchmark_results("small_cnn", 32, "float32", "device: CPU (2 cores)")
    assert results["argv"] == ["--rounds=1", "--k=2"]
    assert results["benchmark"] == "bench_x" and results["headline"] == []
    assert common.goal("m", 1.5, at_most=2.2) == {"measure": "m", "value": 1.5, "goal": {"at_most": 2.2}}
    assert common.goal("m", 1.5)["goal"] is None
