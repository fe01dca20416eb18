"""tools/common.py: the start-up and error reporting every tool shares."""

import os
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
