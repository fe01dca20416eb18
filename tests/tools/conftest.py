"""Fixtures of the tools/ tests."""

import pytest

from tools.results import grid


@pytest.fixture
def make_settings(tmp_path):
    """Builds `grid.Settings` of a small invocation writing under `tmp_path`;
    keyword arguments override fields, `rows` takes row names."""

    def make(rows=None, **overrides):
        values = dict(
            rows=list(grid.ROWS) if rows is None else [grid.ROWS_BY_NAME[n] for n in rows],
            fractions=[0.15], seeds=[0], lrs=[1e-3], epochs=3, patience=3,
            output_dir=str(tmp_path), runs_dir=str(tmp_path / "runs"), backbone="b.keras",
            max_source=None, quick=True, target="elpv", source="fashion_mnist", image_size=64,
            batch_size=32, tune_fraction=0.15, table_only=False,
        )
        values.update(overrides)
        return grid.Settings(**values)

    return make
