import os
import subprocess
import sys

import numpy as np
import pytest

from keras_seltransfer.retrieval import IndexConfig
from keras_seltransfer.retrieval import build_neighbours
from keras_seltransfer.retrieval import symmetric_kl
from tests import helpers

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture
def specs(tmp_path):
    source = helpers.write_npz(tmp_path / "source.npz", num_per_class=20, num_classes=3, seed=4)
    target = helpers.write_npz(tmp_path / "target.npz", num_per_class=8, seed=5)
    backbone = helpers.saved_backbone(tmp_path / "b.keras", pretrain_epochs=0)
    return "numpy:" + source, "numpy:" + target, backbone


def _config(specs, out, **kw):
    source, target, backbone = specs
    base = dict(
        source=source, target=target, backbone=backbone, image_size=16, num_bins=8,
        k_max=5, batch_size=16, output_dir=str(out), progress=False,
    )
    base.update(kw)
    return IndexConfig(**base)


def _load(path):
    with np.load(path) as data:
        return {k: data[k] for k in data.files}


@pytest.mark.parametrize("bank", ["conv", "gabor"])
def test_neighbours_are_the_nearest_sources(specs, tmp_path, bank):
    out = build_neighbours(_config(specs, tmp_path / bank, bank=bank))
    n = _load(out["neighbours"])
    target = _load(tmp_path / bank / "target_descriptors.npz")
    edges = _load(tmp_path / bank / "bin_edges.npz")
    from keras_seltransfer.retrieval import SourceIndex

    index = SourceIndex.load(str(tmp_path / bank / "index"))
    # 25% of 16 target images are held out; the rest are described.
    assert n["neighbour_ids"].shape == (12, 5)
    assert np.all(np.diff(n["distances"], axis=1) >= 0)
    # Independent check of one row with the pairwise formula.
    row = 3
    d = np.array([symmetric_kl(target["descriptors"][row], s, edges["channel_weights"])
                  for s in index.descriptors])
    expected = index.ids[np.lexsort((index.ids, d))[:5]]
    np.testing.assert_array_equal(n["neighbour_ids"][row], expected)
    source_labels = dict(zip(index.ids.tolist(), index.labels.tolist()))
    assert [source_labels[i] for i in n["neighbour_ids"][row]] == n["neighbour_labels"][row].tolist()


def test_sharded_run_equals_unsharded_and_skips_finished_work(specs, tmp_path):
    whole = _load(build_neighbours(_config(specs, tmp_path / "whole"))["neighbours"])
    sharded = tmp_path / "sharded"
    for i in range(3):
        out = build_neighbours(_config(specs, sharded, num_shards=3, shard_index=i))
        if i < 2:
            assert "neighbours" not in out and out["missing_shards"]
    parts = _load(sharded / "neighbours.npz")
    np.testing.assert_array_equal(parts["neighbour_ids"], whole["neighbour_ids"])
    np.testing.assert_array_equal(parts["distances"], whole["distances"])
    np.testing.assert_array_equal(parts["neighbour_labels"], whole["neighbour_labels"])

    shard_file = sharded / "shards" / "shard-1-of-3" / "arrays.npz"
    before = os.stat(shard_file).st_mtime_ns
    build_neighbours(_config(specs, sharded, num_shards=3, shard_index=1))
    assert os.stat(shard_file).st_mtime_ns == before  # a finished shard is not recomputed


def test_merge_with_missing_shards_is_a_clear_error(specs, tmp_path):
    out = tmp_path / "run"
    build_neighbours(_config(specs, out, num_shards=2, shard_index=0))
    with pytest.raises(ValueError, match="1 of 2 shards are not finished"):
        build_neighbours(_config(specs, out, num_shards=2), merge_only=True)


def test_more_shards_than_sources_leaves_empty_shards_that_merge(specs, tmp_path):
    cfg = dict(max_source=3, num_shards=4, k_max=3)
    for i in range(4):
        out = build_neighbours(_config(specs, tmp_path / "run", shard_index=i, **cfg))
    assert _load(out["neighbours"])["neighbour_ids"].shape == (12, 3)


def test_config_errors(specs, tmp_path):
    with pytest.raises(ValueError, match="shard_index"):
        _config(specs, tmp_path / "run", num_shards=2, shard_index=2)
    with pytest.raises(ValueError, match="bank"):
        _config(specs, tmp_path, bank="wavelet")
    with pytest.raises(FileNotFoundError, match="apps.pretrain"):
        build_neighbours(_config(specs, tmp_path, backbone=str(tmp_path / "none.keras")))


def test_changing_the_bank_in_an_existing_run_is_refused(specs, tmp_path):
    build_neighbours(_config(specs, tmp_path / "run", bank="gabor"))
    with pytest.raises(ValueError, match="fitted for another bank"):
        build_neighbours(_config(specs, tmp_path / "run", bank="conv"))


def test_descriptors_of_another_target_subset_are_refused(specs, tmp_path):
    build_neighbours(_config(specs, tmp_path / "run", bank="gabor"))
    with pytest.raises(ValueError, match="other target images"):
        build_neighbours(_config(specs, tmp_path / "run", bank="gabor", target_fraction=0.5))


def test_build_index_app(specs, tmp_path):
    source, target, _ = specs
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=ROOT)
    args = [sys.executable, "-m", "apps.build_index", f"--source={source}", f"--target={target}",
            "--bank=gabor", "--image_size=16", "--num_bins=8", "--k_max=4",
            f"--output_dir={tmp_path / 'app'}", "--noprogress"]
    result = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "neighbours:" in result.stdout
    bad = subprocess.run(args + ["--num_shards=2", "--shard_index=3"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "shard_index" in bad.stderr and "Traceback" not in bad.stderr
