"""The README's code runs as written."""

import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _readme():
    with open(os.path.join(ROOT, "README.md")) as f:
        return f.read()


def test_ci_runs_the_readme_test_command():
    readme = _readme()
    command = re.search(r"<!-- test-command -->\n```bash\n(.+)\n```", readme).group(1)
    assert "pytest" in command
    with open(os.path.join(ROOT, ".ci", "run")) as f:
        ci = f.read()
    assert "<!-- test-command -->" in ci
    assert f"#   {command}\n" in ci  # the comment naming the command is current


@pytest.mark.slow
def test_model_fit_example_runs(tmp_path, monkeypatch):
    from keras_seltransfer import training

    backbone = os.path.join(ROOT, training.DEFAULT_BACKBONE)
    if not os.path.isfile(backbone):
        pytest.skip("needs the pretrained backbone: run `python -m apps.pretrain` first")
    code = re.search(r"## `model.fit` in 20 lines\n\n```python\n(.+?)```", _readme(), re.S).group(1)
    assert len(code.strip().splitlines()) <= 20
    monkeypatch.chdir(ROOT)
    code = code.replace('"exported/elpv"', repr(str(tmp_path / "exported")))
    exec(compile(code, "README.md", "exec"), {})
    assert (tmp_path / "exported" / "saved_model.pb").is_file()
