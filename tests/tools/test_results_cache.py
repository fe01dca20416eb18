"""keras_seltransfer.comparison.cache: a finished run is reused only with the same settings."""

import dataclasses
import json
import os

import pytest

from keras_seltransfer.comparison import cache
from tools.results import grid


@pytest.fixture
def config_of(make_settings):
    """The baseline cell's config under settings with the given overrides."""

    def config(**overrides):
        settings = make_settings(**overrides)
        return grid.run_config(settings, grid.ROWS_BY_NAME["baseline"], 0.15, 0, 1e-3)

    return config


def _finish(config, stored=None, report=None):
    """Writes the two files a finished run leaves in its directory."""
    os.makedirs(config.output_dir, exist_ok=True)
    fields = dataclasses.asdict(config) if stored is None else stored
    with open(os.path.join(config.output_dir, "config.json"), "w") as f:
        json.dump(fields, f)
    with open(os.path.join(config.output_dir, "report.json"), "w") as f:
        json.dump(report or {"accuracy": 0.75, "seconds": 3.0}, f)


def test_unfinished_run_is_none(config_of):
    assert cache.cached_report(config_of()) is None


def test_finished_run_with_the_same_settings_is_reused(config_of):
    config = config_of()
    _finish(config)
    assert cache.cached_report(config) == {"accuracy": 0.75, "seconds": 3.0}


def test_mismatch_is_an_error_naming_every_changed_field(config_of):
    _finish(config_of())
    asked = config_of(epochs=20, batch_size=16)
    with pytest.raises(ValueError, match="other settings") as error:
        cache.cached_report(asked)
    message = str(error.value)
    assert "batch_size: cached 32, asked 16" in message
    assert "epochs: cached 3, asked 20" in message
    assert asked.output_dir in message and "--runs_dir" in message


def test_fields_that_do_not_change_the_run_are_not_compared(config_of):
    config = config_of()
    stored = dataclasses.asdict(config)
    stored.update(verbose=2, tensorboard=True, export=True, index_dir="elsewhere", output_dir="old")
    _finish(config, stored=stored)
    assert cache.cached_report(config) is not None
    assert cache.changed_fields(stored, dataclasses.asdict(config)) == []


def test_a_cache_older_than_a_new_option_is_still_reused(config_of):
    config = config_of()
    stored = dataclasses.asdict(config)
    del stored["joint_bn_stats"]  # an option added after the run was cached
    _finish(config, stored=stored)
    assert cache.cached_report(config) is not None


def test_changed_fields():
    assert cache.changed_fields({"epochs": 3, "verbose": 2}, {"epochs": 20, "verbose": 0}) == ["epochs"]
    assert cache.changed_fields({}, {"epochs": 20}) == []
    assert cache.changed_fields({"b": 1, "a": 1}, {"b": 2, "a": 2}) == ["a", "b"]


def test_read_json(tmp_path):
    assert cache.read_json(str(tmp_path / "absent.json")) is None
    (tmp_path / "shift.json").write_text('{"consistency": 0.9}')
    assert cache.read_json(str(tmp_path / "shift.json")) == {"consistency": 0.9}
