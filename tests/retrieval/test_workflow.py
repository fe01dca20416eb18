import json
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
    with pytest.raises(ValueError, match="other settings: bank='gabor' \\(this command: 'conv'\\)"):
        build_neighbours(_config(specs, tmp_path / "run", bank="conv"))
    # A run directory without its settings record (written before it
    # existed) is still checked stage by stage.
    os.remove(tmp_path / "run" / "config.json")
    with pytest.raises(ValueError, match="fitted for another bank"):
        build_neighbours(_config(specs, tmp_path / "run", bank="conv"))


def test_conv_bank_of_a_named_backbone_and_its_weights_are_part_of_the_run(specs, tmp_path):
    from keras_seltransfer.retrieval import run_record

    out = tmp_path / "run"
    build_neighbours(_config(specs, out, backbone="small_cnn", channels=1))
    with open(out / "config.json") as f:
        recorded = json.load(f)
    assert recorded["backbone"] == "small_cnn" and recorded["backbone_weights"] is None
    weights = str(tmp_path / "small.weights.h5")
    with pytest.raises(ValueError, match=r"backbone_weights=None \(this command: '.*small"):
        build_neighbours(_config(specs, out, backbone="small_cnn", channels=1,
                                 backbone_weights=weights))
    # A record written before `backbone_weights` was recorded stands for None.
    del recorded["backbone_weights"]
    with open(out / "config.json", "w") as f:
        json.dump(recorded, f)
    assert run_record.recorded_settings(str(out))["backbone_weights"] is None
    assert "reused" in build_neighbours(_config(specs, out, backbone="small_cnn", channels=1))


def test_descriptors_of_another_target_subset_are_refused(specs, tmp_path):
    build_neighbours(_config(specs, tmp_path / "run", bank="gabor"))
    with pytest.raises(ValueError, match="target_fraction=1.0 \\(this command: 0.5\\)"):
        build_neighbours(_config(specs, tmp_path / "run", bank="gabor", target_fraction=0.5))
    os.remove(tmp_path / "run" / "config.json")
    with pytest.raises(ValueError, match="other target images"):
        build_neighbours(_config(specs, tmp_path / "run", bank="gabor", target_fraction=0.5))


@pytest.mark.slow
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


# Shards as separate processes -------------------------------------------------


def _index_app_args(specs, out, *extra):
    source, target, backbone = specs
    return [
        sys.executable, "-m", "apps.build_index", f"--source={source}", f"--target={target}",
        f"--backbone={backbone}", "--image_size=16", "--num_bins=8", "--k_max=5",
        "--batch_size=16", "--noprogress", f"--output_dir={out}", *extra,
    ]


_ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", TF_ENABLE_ONEDNN_OPTS="0", PYTHONPATH=ROOT)


def _shard_files(out, shard, names=("arrays.npz", "index.json", "topk.npz")):
    directory = out / "shards" / f"shard-{shard}-of-2"
    return {name: os.stat(directory / name).st_mtime_ns for name in names}


@pytest.mark.slow
def test_shards_built_by_concurrent_processes_merge_to_the_single_process_index(specs, tmp_path):
    """`--shard_index=0` and `=1` run at the same time as two processes into
    one directory; a merge given only the directory and shard count (as
    `--merge` with every other flag at its default; the app itself merges in
    the slow test below) combines them, and the neighbours and the merged
    index equal those of one unsharded build exactly. A rerun then reuses
    every finished stage."""
    from keras_seltransfer.retrieval import SourceIndex

    out = tmp_path / "sharded"
    shards = [
        subprocess.Popen(
            _index_app_args(specs, out, "--num_shards=2", f"--shard_index={i}"),
            cwd=ROOT, env=_ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for i in range(2)
    ]
    try:
        # The reference, built here while the shard processes start.
        whole = build_neighbours(_config(specs, tmp_path / "whole"))
        finished = [shard.communicate(timeout=300) for shard in shards]
    finally:
        for shard in shards:
            if shard.poll() is None:
                shard.kill()
    for shard, (stdout, stderr) in zip(shards, finished):
        assert shard.returncode == 0, stderr
        assert "index:" in stdout

    # What `--merge --num_shards=2 --output_dir=...` passes: defaults elsewhere.
    merge = build_neighbours(IndexConfig(output_dir=str(out), num_shards=2), merge_only=True)
    assert merge["neighbours"] == str(out / "neighbours.npz")
    merged, single = _load(out / "neighbours.npz"), _load(whole["neighbours"])
    for name in ("target_ids", "target_labels", "neighbour_ids", "neighbour_labels", "distances"):
        np.testing.assert_array_equal(merged[name], single[name], err_msg=name)
    # The merge recorded the shards' data sets, not its own flag defaults.
    recorded = json.loads(str(merged["config"]))
    assert recorded["source"] == specs[0] and recorded["target"] == specs[1]

    index = SourceIndex.merge(
        [SourceIndex.load(out / "shards" / f"shard-{i}-of-2") for i in range(2)]
    )
    reference = SourceIndex.load(tmp_path / "whole" / "index")
    for name in ("descriptors", "labels", "ids", "bin_edges", "channel_weights"):
        np.testing.assert_array_equal(getattr(index, name), getattr(reference, name), err_msg=name)

    before = {shard: _shard_files(out, shard) for shard in range(2)}
    again = build_neighbours(_config(specs, out, num_shards=2, shard_index=1))
    assert again["reused"] == "bin_edges, target_descriptors, index, topk"
    assert {shard: _shard_files(out, shard) for shard in range(2)} == before
    np.testing.assert_array_equal(_load(again["neighbours"])["neighbour_ids"], single["neighbour_ids"])


def test_half_written_shards_are_never_used(specs, tmp_path):
    """What a process killed while writing shard 1 can leave behind: the
    temporary directory of its index (arrays, no index.json), a temporary
    top-k file, and a shard directory without index.json (the commit marker
    of `SourceIndex.save`). None of it counts as a finished shard: the merge
    refuses, the rerun computes the shard again, and the result equals the
    unsharded build. A shard killed after its index but before its top-k
    keeps the index and computes only the top-k."""
    whole = _load(build_neighbours(_config(specs, tmp_path / "whole"))["neighbours"])
    out = tmp_path / "run"
    build_neighbours(_config(specs, out, num_shards=2, shard_index=0))
    shards = out / "shards"
    (shards / ".shard-1-of-2.k1ll3d").mkdir()
    (shards / ".shard-1-of-2.k1ll3d" / "arrays.npz").write_bytes(b"PK\x03\x04 half an archive")
    (shards / "shard-1-of-2").mkdir()
    (shards / "shard-1-of-2" / "arrays.npz").write_bytes(b"PK\x03\x04 half an archive")
    (shards / "shard-1-of-2" / ".topk.npz.x7.tmp").write_bytes(b"PK\x03\x04")

    with pytest.raises(ValueError, match=r"Cannot merge: 1 of 2 shards are not finished: .*shard-1-of-2"):
        build_neighbours(_config(specs, out, num_shards=2), merge_only=True)
    rerun = build_neighbours(_config(specs, out, num_shards=2, shard_index=1))
    assert rerun["reused"] == "bin_edges, target_descriptors"
    assert sorted(os.listdir(shards / "shard-1-of-2")) == ["arrays.npz", "index.json", "topk.npz"]
    np.testing.assert_array_equal(_load(rerun["neighbours"])["neighbour_ids"], whole["neighbour_ids"])
    np.testing.assert_array_equal(_load(rerun["neighbours"])["distances"], whole["distances"])

    os.remove(shards / "shard-1-of-2" / "topk.npz")
    index_written = _shard_files(out, 1, ("arrays.npz", "index.json"))
    rerun = build_neighbours(_config(specs, out, num_shards=2, shard_index=1))
    assert rerun["reused"] == "bin_edges, target_descriptors, index"
    assert _shard_files(out, 1, ("arrays.npz", "index.json")) == index_written
    np.testing.assert_array_equal(_load(rerun["neighbours"])["neighbour_ids"], whole["neighbour_ids"])


_KILLED_WHILE_WRITING = """
import json, os, signal, sys, types
from keras_seltransfer.retrieval import index

def die(*args, **kwargs):
    # SourceIndex.save has written arrays.npz into its temporary directory
    # and is about to write index.json: the process dies here.
    os.kill(os.getpid(), signal.SIGKILL)

index.json = types.SimpleNamespace(dump=die, dumps=json.dumps, load=json.load, loads=json.loads)
from keras_seltransfer.apps import build_index
sys.argv = ["build_index", *sys.argv[1:]]
build_index.run()
"""


@pytest.mark.slow
def test_shard_process_sigkilled_while_writing_is_recomputed(specs, tmp_path):
    """A shard process SIGKILLed inside `SourceIndex.save` publishes nothing;
    the rerun computes the shard, and `apps.build_index --merge` then gives
    the neighbours of an unsharded build."""
    out = tmp_path / "run"
    args = _index_app_args(specs, out, "--num_shards=2", "--shard_index=1")[3:]
    killed = subprocess.run(
        [sys.executable, "-c", _KILLED_WHILE_WRITING, *args],
        cwd=ROOT, env=_ENV, capture_output=True, text=True, timeout=300,
    )
    assert killed.returncode == -9, killed.stderr
    shards = out / "shards"
    # The temporary directory holds the arrays and at most an empty
    # index.json; the shard itself was never published.
    leftovers = [name for name in os.listdir(shards) if name.startswith(".shard-1-of-2.")]
    assert len(leftovers) == 1 and not (shards / "shard-1-of-2").exists()
    temporary = shards / leftovers[0]
    assert (temporary / "arrays.npz").stat().st_size > 0
    assert not (temporary / "index.json").exists() or (temporary / "index.json").stat().st_size == 0

    rerun = build_neighbours(_config(specs, out, num_shards=2, shard_index=1))
    assert rerun["reused"] == "bin_edges, target_descriptors"
    build_neighbours(_config(specs, out, num_shards=2, shard_index=0))
    os.remove(out / "neighbours.npz")
    merge = subprocess.run(
        [sys.executable, "-m", "apps.build_index", "--num_shards=2", "--merge", f"--output_dir={out}"],
        cwd=ROOT, env=_ENV, capture_output=True, text=True, timeout=300,
    )
    assert merge.returncode == 0, merge.stderr
    assert f"neighbours: {out / 'neighbours.npz'}" in merge.stdout
    whole = _load(build_neighbours(_config(specs, tmp_path / "whole"))["neighbours"])
    merged = _load(out / "neighbours.npz")
    for name in ("neighbour_ids", "neighbour_labels", "distances"):
        np.testing.assert_array_equal(merged[name], whole[name], err_msg=name)
