import json

import pytest

from tests import helpers


@pytest.mark.slow
def test_times_each_transform_per_checkout_and_prints_a_table():
    done = helpers.run_tool(
        "bench_transforms.py",
        "--backbone=MobileNet",
        "--image_size=32",
        "--transforms=antialias,adafilter",
        "--checkouts=.",
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("device: ")
    row = json.loads(lines[1])
    assert row["checkout"] == "." and row["package"].endswith("keras_seltransfer")
    assert all(isinstance(row[t], float) and row[t] > 0 for t in ("antialias", "adafilter"))
    assert "| . | " in done.stdout


def test_backbone_must_be_a_keras_application():
    done = helpers.run_tool("bench_transforms.py", "--backbone=small_cnn")
    assert done.returncode == 2
    assert "--backbone must name a keras.applications constructor" in done.stderr
    assert "Received: 'small_cnn'" in done.stderr


def test_unknown_transform_is_a_clear_error():
    done = helpers.run_tool("bench_transforms.py", "--transforms=prune")
    assert done.returncode == 2
    assert "--transforms must be among" in done.stderr and "['prune']" in done.stderr
