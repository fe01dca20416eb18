"""tools/results/grid.py: rows, the methods they name, one cell's configuration."""

import pytest

from keras_seltransfer import training
from tools.results import grid


def test_every_row_builds_a_valid_finetune_config(make_settings):
    settings = make_settings(target="numpy:t.npz", source="numpy:s.npz", image_size=16)
    rows = [row for row in grid.all_rows() if row.overrides]
    assert len(rows) == len(grid.all_rows()) - 1  # only "combo" is chosen, not configured
    for row in rows:
        config = grid.run_config(settings, row, 0.15, 1, 3e-4)
        assert isinstance(config, training.FinetuneConfig), row.name
        assert config.method in grid.known_methods()
        for field, value in row.overrides.items():
            if field != "index_bank":
                assert getattr(config, field) == value, (row.name, field)
        assert (config.target, config.image_size, config.learning_rate) == ("numpy:t.npz", 16, 3e-4)
        assert (config.export, config.tensorboard, config.verbose) == (False, False, 0)


def test_names_are_unique_and_rows_validate():
    names = [row.name for row in grid.all_rows()]
    assert len(names) == len(set(names))
    grid.validate_rows()


def test_validate_rows_names_the_row_and_the_method():
    bad = grid.Row("typo", "A misspelt method", "-", {"method": "sjtf"})
    with pytest.raises(ValueError, match=r"Row 'typo' must name a method in .*Received: method='sjtf'"):
        grid.validate_rows([bad])


def test_is_joint_and_the_index_of_joint_rows(tmp_path, make_settings):
    assert grid.is_joint("sjft") and grid.is_joint("sjft_random")
    assert not grid.is_joint("baseline") and not grid.is_joint("ktft")
    with pytest.raises(ValueError, match=r"`method` must be one of .*Received: method='nope'"):
        grid.is_joint("nope")
    settings = make_settings()
    gabor = grid.run_config(settings, grid.ROWS_BY_NAME["sjft_gabor"], 0.3, 0, 1e-3)
    assert gabor.index_dir == str(tmp_path / "runs" / "index" / "gabor")
    assert grid.run_config(settings, grid.ROWS_BY_NAME["sjft"], 0.3, 0, 1e-3).index_dir.endswith(
        "index/conv"
    )
    assert grid.run_config(settings, grid.ROWS_BY_NAME["baseline"], 0.3, 0, 1e-3).index_dir != (
        gabor.index_dir
    )


def test_run_directories_keep_the_cache_layout(tmp_path, make_settings):
    """An existing run cache is found again only if this layout never changes."""
    settings = make_settings()
    config = grid.run_config(settings, grid.ROWS_BY_NAME["baseline"], 0.15, 2, 0.001)
    assert config.output_dir == str(tmp_path / "runs" / "baseline" / "lr0.001-f0.15-seed2")
    assert grid.run_dir(settings, grid.ROWS_BY_NAME["l2sp"], 1.0, 0, 3e-4).endswith(
        "l2sp/lr0.0003-f1-seed0"
    )
