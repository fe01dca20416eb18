"""Tests for keras_seltransfer.retrieval.index."""

import json
import os

import numpy as np
import pytest

from keras_seltransfer.data import from_numpy
from keras_seltransfer.retrieval.index import SourceIndex
from keras_seltransfer.retrieval.similarity import nearest_sources
from keras_seltransfer.retrieval.topk import merge_topk

# Two channels of four bins: pixel intensity and horizontal gradient size.
BIN_EDGES = np.array([[0.0, 64.0, 128.0, 192.0, 256.0], [0.0, 8.0, 32.0, 96.0, 256.0]])
BANK_CONFIG = {"name": "fake", "channels": [1, 1], "sizes": (3, 5)}
NUM_SOURCES = 20


def _histograms_of(images):
    """Deterministic per-image descriptors [N, 2, 4] of float images."""
    images = np.asarray(images, np.float64)[..., 0]
    responses = [images, np.abs(np.diff(images, axis=2))]
    descriptors = []
    for channel, values in enumerate(responses):
        values = values.reshape(len(images), -1)
        bins = np.searchsorted(BIN_EDGES[channel, 1:-1], values, side="right")
        counts = np.stack([np.bincount(row, minlength=4) for row in bins])
        descriptors.append(counts / counts.sum(axis=1, keepdims=True))
    return np.stack(descriptors, axis=1).astype(np.float32)


def fake_describe(dataset):
    return np.concatenate([_histograms_of(images) for images, _ in dataset])


def _images(num, seed):
    rng = np.random.default_rng(seed)
    # Per-image brightness and contrast, so descriptors differ.
    level = rng.uniform(30, 220, size=(num, 1, 1, 1))
    spread = rng.uniform(5, 80, size=(num, 1, 1, 1))
    images = np.clip(level + spread * rng.standard_normal((num, 8, 8, 1)), 0, 255)
    return images.round().astype(np.uint8)


@pytest.fixture(scope="module")
def source():
    images = _images(NUM_SOURCES, seed=0)
    # Copies in other shards (i % 3 = 1, 2, 1): exact ties across shards.
    images[[14, 19]] = images[4]
    labels = np.arange(NUM_SOURCES) % 3
    return from_numpy(images, labels, name="fake_source")


@pytest.fixture(scope="module")
def targets(source):
    descriptors = _histograms_of(_images(5, seed=1))
    descriptors[0] = _histograms_of(source.images[4:5])[0]
    return descriptors


def _build(source, **kwargs):
    arguments = dict(
        image_size=8,
        batch_size=4,
        bin_edges=BIN_EDGES,
        bank_config=BANK_CONFIG,
        progress=False,
    )
    arguments.update(kwargs)
    return SourceIndex.build(fake_describe, source, **arguments)


def _assert_same_index(a, b):
    for name in ("descriptors", "labels", "ids", "bin_edges", "channel_weights"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
        assert getattr(a, name).dtype == getattr(b, name).dtype
    assert a.bank_config == b.bank_config
    assert a.metadata == b.metadata
    assert (a.num_shards, a.shard_index) == (b.num_shards, b.shard_index)


def test_build_unsharded(source):
    index = _build(source)
    assert len(index) == NUM_SOURCES and (index.num_channels, index.num_bins) == (2, 4)
    np.testing.assert_array_equal(index.ids, np.arange(NUM_SOURCES))
    np.testing.assert_array_equal(index.labels, source.labels)
    np.testing.assert_array_equal(index.descriptors, _histograms_of(source.images))
    assert index.descriptors.dtype == np.float32
    assert index.ids.dtype == index.labels.dtype == np.int64
    np.testing.assert_array_equal(index.channel_weights, [0.5, 0.5])
    assert index.bank_config == {"name": "fake", "channels": [1, 1], "sizes": [3, 5]}
    assert index.metadata == {
        "source_name": "fake_source",
        "source_size": NUM_SOURCES,
        "image_size": [8, 8],
        "channels": 1,
    }
    assert (index.num_shards, index.shard_index) == (1, 0)
    assert not index.descriptors.flags.writeable


def test_shards_save_load_merge_equal_unsharded(source, targets, tmp_path):
    full = _build(source)
    shards = []
    for shard_index in range(3):
        shard = _build(source, num_shards=3, shard_index=shard_index)
        np.testing.assert_array_equal(shard.ids, np.arange(shard_index, NUM_SOURCES, 3))
        path = tmp_path / f"shard{shard_index}"
        shard.save(path)
        loaded = SourceIndex.load(path)
        _assert_same_index(loaded, shard)
        shards.append(loaded)

    merged = SourceIndex.merge(shards[::-1])
    _assert_same_index(merged, full)

    k = 6
    expected_ids, expected_distances = full.query(targets, k, BIN_EDGES, block_size=3)
    assert expected_ids[0, 0] == 4 and expected_distances[0, 0] == 0.0
    np.testing.assert_array_equal(expected_ids[0, :3], [4, 14, 19])  # ties: lower id first
    ids, distances = merged.query(targets, k, BIN_EDGES, block_size=5)
    np.testing.assert_array_equal(ids, expected_ids)
    np.testing.assert_array_equal(distances, expected_distances)

    parts = [shard.query(targets, k, BIN_EDGES, block_size=2) for shard in shards]
    ids, distances = merge_topk(parts, k)
    np.testing.assert_array_equal(ids, expected_ids)
    np.testing.assert_array_equal(distances, expected_distances)


def test_query_matches_nearest_sources(source, targets):
    index = _build(source, channel_weights=[0.25, 0.75])
    ids, distances = index.query(targets, 4, BIN_EDGES.copy())
    rows, expected = nearest_sources(
        targets, _histograms_of(source.images), 4, channel_weights=[0.25, 0.75]
    )
    np.testing.assert_array_equal(ids, rows)
    np.testing.assert_array_equal(distances, expected)
    np.testing.assert_array_equal(index.neighbour_labels(ids), source.labels[rows])


def test_save_load_round_trip(source, tmp_path):
    index = _build(
        source,
        num_shards=2,
        shard_index=1,
        channel_weights=[0.2, 0.8],
        metadata={"fitted_on": "target", "nested": {"values": [1, 2.5, None]}},
    )
    path = tmp_path / "index"
    assert index.save(path) == path
    assert sorted(os.listdir(path)) == ["arrays.npz", "index.json"]
    loaded = SourceIndex.load(str(path))
    _assert_same_index(loaded, index)
    assert loaded.metadata["nested"] == {"values": [1, 2.5, None]}
    assert repr(loaded) == repr(index) == "SourceIndex(sources=10, channels=2, bins=4, shard=1/2)"
    with pytest.raises(FileExistsError):
        index.save(path, overwrite=False)


def test_crash_during_save_keeps_previous_index(source, tmp_path, monkeypatch):
    old = _build(source, num_shards=2, shard_index=0)
    new = _build(source, num_shards=2, shard_index=1)
    path = tmp_path / "index"
    old.save(path)
    real_savez = np.savez

    def crashing_savez(file, **arrays):
        file.write(b"PK\x03\x04 half of an archive")
        raise OSError("No space left on device")

    monkeypatch.setattr(np, "savez", crashing_savez)
    with pytest.raises(OSError, match="No space left"):
        new.save(path)
    with pytest.raises(OSError, match="No space left"):
        new.save(tmp_path / "fresh")
    monkeypatch.setattr(np, "savez", real_savez)

    _assert_same_index(SourceIndex.load(path), old)
    # No temporary directories are left behind, and no half-written index.
    assert os.listdir(tmp_path) == ["index"]
    new.save(path)
    _assert_same_index(SourceIndex.load(path), new)
    assert os.listdir(tmp_path) == ["index"]


def _rewrite_arrays(path, **changes):
    with np.load(path / "arrays.npz") as data:
        arrays = {name: data[name] for name in data.files}
    arrays.update(changes)
    arrays = {name: value for name, value in arrays.items() if value is not None}
    np.savez(path / "arrays.npz", **arrays)


def _rewrite_config(path, **changes):
    config = json.loads((path / "index.json").read_text())
    config.update(changes)
    (path / "index.json").write_text(json.dumps(config))


def test_load_errors(source, tmp_path):
    index = _build(source, num_shards=4, shard_index=0)

    def saved(name):
        return index.save(tmp_path / name)

    with pytest.raises(FileNotFoundError, match="No source index"):
        SourceIndex.load(tmp_path / "missing")

    path = saved("no_config")
    os.remove(path / "index.json")
    with pytest.raises(FileNotFoundError, match="index.json is missing"):
        SourceIndex.load(path)

    path = saved("no_arrays")
    os.remove(path / "arrays.npz")
    with pytest.raises(FileNotFoundError, match="arrays.npz is missing"):
        SourceIndex.load(path)

    path = saved("garbage")
    (path / "arrays.npz").write_bytes(b"not an archive at all")
    with pytest.raises(ValueError, match="corrupt or unreadable"):
        SourceIndex.load(path)

    path = saved("truncated")
    data = (path / "arrays.npz").read_bytes()
    (path / "arrays.npz").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="corrupt or unreadable"):
        SourceIndex.load(path)

    path = saved("flipped")
    data = bytearray((path / "arrays.npz").read_bytes())
    data[200] ^= 0xFF  # inside the descriptors: the zip CRC catches it
    (path / "arrays.npz").write_bytes(bytes(data))
    with pytest.raises(ValueError, match="corrupt or unreadable"):
        SourceIndex.load(path)

    path = saved("bad_json")
    (path / "index.json").write_text("{ not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        SourceIndex.load(path)

    path = saved("other_format")
    _rewrite_config(path, format="something.else")
    with pytest.raises(ValueError, match="Received: format='something.else'"):
        SourceIndex.load(path)

    path = saved("version")
    _rewrite_config(path, format_version=99)
    with pytest.raises(ValueError, match="format version 1. Received: format_version=99"):
        SourceIndex.load(path)

    path = saved("short_labels")
    _rewrite_arrays(path, labels=np.zeros(2, np.int64))
    with pytest.raises(ValueError, match=r"Inconsistent.*len\(labels\)=2"):
        SourceIndex.load(path)

    path = saved("other_descriptors")
    _rewrite_arrays(path, descriptors=np.full((6, 2, 4), 0.25, np.float32))
    with pytest.raises(
        ValueError, match=r"records descriptors of shape \(5, 2, 4\).*shape=\(6, 2, 4\)"
    ):
        SourceIndex.load(path)

    path = saved("edges")
    _rewrite_arrays(path, bin_edges=np.zeros((2, 3)))
    with pytest.raises(ValueError, match=r"Inconsistent.*bin_edges.shape=\(2, 3\)"):
        SourceIndex.load(path)

    path = saved("no_ids")
    _rewrite_arrays(path, ids=None)
    with pytest.raises(ValueError, match="hold the arrays"):
        SourceIndex.load(path)

    path = saved("no_key")
    config = json.loads((path / "index.json").read_text())
    del config["shard_index"]
    (path / "index.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="lacks the keys"):
        SourceIndex.load(path)


def test_query_errors(source, targets):
    index = _build(source, num_shards=2, shard_index=0)
    with pytest.raises(ValueError, match="target_bin_edges.*max \\|difference\\|=1e-06"):
        index.query(targets, 2, BIN_EDGES + 1e-6)
    with pytest.raises(ValueError, match=r"shape \(2, 4\) instead of \(2, 5\)"):
        index.query(targets, 2, BIN_EDGES[:, :4])
    with pytest.raises(ValueError, match=r"in \[1, 10\].*Received: k_max=11"):
        index.query(targets, 11, BIN_EDGES)
    with pytest.raises(ValueError, match="Received: k_max=0"):
        index.query(targets, 0, BIN_EDGES)
    with pytest.raises(ValueError, match="channels and bins"):
        index.query(targets[:, :1], 2, BIN_EDGES)


def test_merge_errors(source):
    shards = [_build(source, num_shards=3, shard_index=i) for i in range(3)]
    with pytest.raises(ValueError, match="non-empty list"):
        SourceIndex.merge([])
    with pytest.raises(ValueError, match=r"without shard_index \[1\]"):
        SourceIndex.merge([shards[0], shards[2]])
    with pytest.raises(ValueError, match="shard_index=2 twice"):
        SourceIndex.merge(shards + [shards[2]])

    def changed(index, **changes):
        arguments = dict(
            descriptors=index.descriptors,
            labels=index.labels,
            ids=index.ids,
            bin_edges=index.bin_edges,
            channel_weights=index.channel_weights,
            bank_config=index.bank_config,
            num_shards=index.num_shards,
            shard_index=index.shard_index,
        )
        arguments.update(changes)
        return SourceIndex(**arguments)

    for name, value in (
        ("bin_edges", BIN_EDGES * 2),
        ("channel_weights", [0.1, 0.9]),
        ("bank_config", {"name": "other"}),
    ):
        with pytest.raises(ValueError, match=f"share the {name}.*indexes\\[1\\]"):
            SourceIndex.merge([shards[0], changed(shards[1], **{name: value}), shards[2]])
    overlapping = changed(shards[1], ids=shards[1].ids.copy())
    overlapping = changed(overlapping, ids=np.where(overlapping.ids == 4, 3, overlapping.ids))
    with pytest.raises(ValueError, match="id 3 in two shards"):
        SourceIndex.merge([shards[0], overlapping, shards[2]])


def test_build_errors(source):
    with pytest.raises(ValueError, match="Received: num_shards=0"):
        _build(source, num_shards=0)
    with pytest.raises(ValueError, match=r"in \[0, 3\).*Received: shard_index=3"):
        _build(source, num_shards=3, shard_index=3)
    with pytest.raises(ValueError, match="Received: bin_edges=None"):
        _build(source, bin_edges=None)
    with pytest.raises(ValueError, match="Received: image_size=0"):
        _build(source, image_size=0)
    with pytest.raises(ValueError, match="Received: source=ndarray"):
        SourceIndex.build(fake_describe, source.images, 8, bin_edges=BIN_EDGES)
    with pytest.raises(ValueError, match="Received: describe_fn=str"):
        SourceIndex.build("describe", source, 8, bin_edges=BIN_EDGES)
    with pytest.raises(ValueError, match=r"shape \(20, 2, 4\).*Received: shape=\(20, 2, 3\)"):
        SourceIndex.build(
            lambda ds: fake_describe(ds)[..., :3], source, 8, bin_edges=BIN_EDGES
        )
    with pytest.raises(ValueError, match="sum to 1"):
        SourceIndex.build(lambda ds: fake_describe(ds) * 2, source, 8, bin_edges=BIN_EDGES)
    with pytest.raises(ValueError, match="JSON-serialisable"):
        _build(source, metadata={"count": np.int64(3)})


def test_constructor_errors():
    descriptors = np.full((3, 2, 4), 0.25)
    good = dict(descriptors=descriptors, labels=[0, 1, 2], ids=[0, 1, 2], bin_edges=BIN_EDGES)
    for changes, match in (
        (dict(descriptors=descriptors[0]), "float array"),
        (dict(labels=[0, 1]), r"len\(labels\)=2"),
        (dict(ids=[0, 1, 1]), "id 1 twice"),
        (dict(ids=[0, -1, 2]), "non-negative"),
        (dict(ids=[0.0, 1.0, 2.0]), "integer"),
        (dict(bin_edges=BIN_EDGES[:1]), r"bin_edges.shape=\(1, 5\)"),
        (dict(channel_weights=[1.0]), r"shape \(2,\)"),
        (dict(bank_config=[1]), "Received: bank_config=list"),
        (dict(metadata={"x": float("nan")}), "JSON-serialisable"),
        (dict(num_shards=2, shard_index=2), "Received: shard_index=2"),
    ):
        with pytest.raises(ValueError, match=match):
            SourceIndex(**{**good, **changes})


def test_more_shards_than_examples(source):
    small = source.subset(np.arange(2))
    shards = [_build(small, num_shards=3, shard_index=i) for i in range(3)]
    assert [len(s) for s in shards] == [1, 1, 0]
    _assert_same_index(SourceIndex.merge(shards), _build(small))


def test_neighbour_labels(source):
    shard = _build(source, num_shards=3, shard_index=1)
    ids = np.array([[13, 1], [4, 19]])
    np.testing.assert_array_equal(shard.neighbour_labels(ids), source.labels[ids])
    with pytest.raises(ValueError, match="Received: ids containing 2"):
        shard.neighbour_labels([1, 2])
    with pytest.raises(ValueError, match="Received: ids containing 25"):
        shard.neighbour_labels([25])


def test_progress_is_passed_to_describe_fn(source):
    calls = []

    def describe(dataset, progress=True):
        calls.append(progress)
        return fake_describe(dataset)

    SourceIndex.build(describe, source, 8, bin_edges=BIN_EDGES, progress=False)
    SourceIndex.build(describe, source, 8, bin_edges=BIN_EDGES)
    assert calls == [False, True]
