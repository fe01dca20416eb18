"""Tests of the search modes of `nearest_sources` (exact, fast, auto) and of
the search mode as part of a retrieval run's identity."""

import json
import os

import numpy as np
import pytest

from keras_seltransfer import training
from keras_seltransfer.methods import sjft
from keras_seltransfer.retrieval import IndexConfig
from keras_seltransfer.retrieval import SourceIndex
from keras_seltransfer.retrieval import build_neighbours
from keras_seltransfer.retrieval import similarity
from keras_seltransfer.retrieval import symmetric_kl
from keras_seltransfer.retrieval.similarity import nearest_sources
from tests import helpers


def _histograms(rng, num, channels=8, bins=16, concentration=0.5):
    """Dirichlet histograms with exactly empty bins, as real ones have."""
    x = rng.dirichlet(np.full(bins, concentration), size=(num, channels))
    x[x < 0.01] = 0.0
    x[..., 0] += x.sum(-1) == 0
    return (x / x.sum(-1, keepdims=True)).astype("float32")


def _recall(expected, found):
    """Mean share of each row of `expected` found in the same row of `found`."""
    return np.mean(
        [len(set(e.tolist()) & set(f.tolist())) / len(e) for e, f in zip(expected, found)]
    )


def _loop(target, source, rows_indices):
    """The double loop's exact distances of the given (row, index) pairs."""
    return np.array(
        [[symmetric_kl(target[r], source[i]) for i in row] for r, row in enumerate(rows_indices)]
    )


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    return _histograms(rng, 24), _histograms(rng, 1500)


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("k", [10, 50, 200])
def test_fast_recall_of_the_exact_top_k(data, k, dtype):
    target, source = data
    exact_ids, _ = nearest_sources(target, source, k, mode="exact", block_size=256)
    fast_ids, fast_d = nearest_sources(
        target, source, k, mode="fast", block_size=256, dtype=dtype
    )
    assert _recall(exact_ids, fast_ids) >= 0.99
    np.testing.assert_array_equal(
        fast_d[:3], [[symmetric_kl(target[r], source[i]) for i in row] for r, row in enumerate(fast_ids[:3])]
    )


def test_fast_gemm_precision_follows_the_hardware_and_bad_ones_are_refused(data):
    from keras_seltransfer.retrieval import similarity

    with open("/proc/cpuinfo") as f:
        flags = set(next(line for line in f if line.startswith("flags")).split())
    native = bool(flags & {"amx_bf16", "avx512_bf16"})
    if not tf_gpus():
        assert similarity.fast_gemm_dtype() == ("bfloat16" if native else "float32")
    target, source = data
    with pytest.raises(ValueError, match="`dtype` to be one of .* in the exact mode"):
        nearest_sources(target, source, 3, mode="exact", dtype="bfloat16")
    with pytest.raises(ValueError, match="`dtype` to be one of .* in the fast mode"):
        nearest_sources(target, source, 3, mode="fast", dtype="float16")


def tf_gpus():
    import tensorflow as tf

    return tf.config.list_physical_devices("GPU")


@pytest.mark.parametrize("margin", [0, 5, 32])
def test_fast_distances_are_the_exact_distances_of_its_indices(data, margin):
    target, source = data
    ids, distances = nearest_sources(
        target, source, 20, mode="fast", margin=margin, block_size=300
    )
    assert ids.dtype == np.int64 and distances.dtype == np.float64
    # Re-scored in float64 with the exact arithmetic: bit-identical to the
    # double loop over `symmetric_kl`, not merely close.
    np.testing.assert_array_equal(distances, _loop(target, source, ids))
    # Sorted by distance, then index.
    order = np.lexsort((ids, distances), axis=1)
    np.testing.assert_array_equal(order, np.tile(np.arange(20), (len(ids), 1)))
    assert all(len(set(row)) == 20 for row in ids.tolist())


def test_fast_with_all_sources_surviving_equals_exact(data):
    target, source = data
    source = source[:100]
    # k + margin >= sources: every source is re-scored, so nothing is missed.
    expected = nearest_sources(target, source, 60, mode="exact", block_size=32)
    found = nearest_sources(target, source, 60, mode="fast", margin=40, block_size=32)
    np.testing.assert_array_equal(found[0], expected[0])
    np.testing.assert_array_equal(found[1], expected[1])
    # k equal to the source size.
    found = nearest_sources(target, source, 100, mode="fast", margin=0, block_size=7)
    expected = nearest_sources(target, source, 100, mode="exact", block_size=7)
    np.testing.assert_array_equal(found[0], expected[0])
    np.testing.assert_array_equal(found[1], expected[1])


def test_ties_and_duplicates_break_to_the_lower_index(data):
    target, source = data
    source = source[:200].copy()
    target = target.copy()
    # Copies of one row within a block and across blocks, and a target equal
    # to it: exact ties at distance zero and at non-zero distances.
    for copy in (1, 5, 63, 64, 150, 199):
        source[copy] = source[0]
    source[120] = source[2]
    target[0] = source[0]
    target[1] = source[2]
    for k in (3, 8, 20):
        expected = nearest_sources(target, source, k, mode="exact", block_size=64)
        found = nearest_sources(target, source, k, mode="fast", block_size=64)
        np.testing.assert_array_equal(found[0], expected[0])
        np.testing.assert_array_equal(found[1], expected[1])
    ids, distances = nearest_sources(target, source, 7, mode="fast", block_size=64)
    assert ids[0].tolist() == [0, 1, 5, 63, 64, 150, 199]
    assert np.all(distances[0] == 0.0)
    assert ids[1, :2].tolist() == [2, 120]


def test_k_larger_than_the_sources_is_an_error_in_every_mode(data):
    target, source = data
    for mode in ("exact", "fast", "auto"):
        with pytest.raises(ValueError, match=r"Expected `k` to be an int in \[1, 10\]"):
            nearest_sources(target, source[:10], 11, mode=mode)


def test_bad_mode_and_margin_are_clear_errors(data):
    target, source = data
    with pytest.raises(
        ValueError,
        match=r"`mode` must be one of \('auto', 'exact', 'fast'\)\. Received: mode='quick'",
    ):
        nearest_sources(target, source, 3, mode="quick")
    with pytest.raises(ValueError, match=r"Expected `margin` to be an int >= 0\. Received: margin=-1"):
        nearest_sources(target, source, 3, mode="fast", margin=-1)
    with pytest.raises(ValueError, match="margin"):
        nearest_sources(target, source, 3, mode="fast", margin=2.5)
    index = SourceIndex(source, np.zeros(len(source), int), np.arange(len(source)),
                        np.tile(np.arange(17.0), (8, 1)))
    with pytest.raises(ValueError, match="`mode` must be one of"):
        index.query(target, 3, index.bin_edges, mode="approximate")
    with pytest.raises(ValueError, match="search_mode"):
        IndexConfig(search_mode="fastest", bank="gabor")
    with pytest.raises(ValueError, match="index_search_mode"):
        training.FinetuneConfig(method="sjft", index_search_mode="fastest")


def test_auto_searches_fast_from_the_threshold(data, monkeypatch):
    target, source = data
    calls = []
    fast = similarity._fast_search

    def spy(*args, **kwargs):
        calls.append(args[2])  # the number of sources
        return fast(*args, **kwargs)

    monkeypatch.setattr(similarity, "_fast_search", spy)
    monkeypatch.setattr(similarity, "AUTO_FAST_MIN_SOURCES", 300)
    assert similarity.resolve_search_mode("auto", 299) == "exact"
    assert similarity.resolve_search_mode("auto", 300) == "fast"
    nearest_sources(target, source[:299], 5)
    assert calls == []
    nearest_sources(target, source[:300], 5)
    assert calls == [300]
    nearest_sources(target, source[:300], 5, mode="exact")
    nearest_sources(target, source[:10], 5, mode="fast")
    assert calls == [300, 10]
    # The documented default threshold.
    monkeypatch.undo()
    assert similarity.resolve_search_mode("auto", similarity.AUTO_FAST_MIN_SOURCES) == "fast"
    assert similarity.resolve_search_mode("auto", 60_000) == "exact"


def test_fast_mode_reads_any_sliceable_source_and_index_query(data):
    target, source = data

    class Rows:
        """Only `len()` and row-range slicing, as a custom reader offers."""

        def __len__(self):
            return len(source)

        def __getitem__(self, item):
            assert isinstance(item, slice)
            return source[item]

    expected = nearest_sources(target, source, 15, mode="fast", block_size=128)
    found = nearest_sources(target, Rows(), 15, mode="fast", block_size=128)
    np.testing.assert_array_equal(found[0], expected[0])
    np.testing.assert_array_equal(found[1], expected[1])
    ids = np.arange(len(source)) * 3 + 7
    index = SourceIndex(source, np.zeros(len(source), int), ids, np.tile(np.arange(17.0), (8, 1)))
    found_ids, distances = index.query(target, 15, index.bin_edges, block_size=128, mode="fast")
    np.testing.assert_array_equal(found_ids, ids[expected[0]])
    np.testing.assert_array_equal(distances, expected[1])


def test_fast_recall_on_real_filter_bank_descriptors():
    """Gabor-bank descriptors of real images (scikit-learn's digits), bin
    edges fitted on the targets as a retrieval run fits them."""
    import tensorflow as tf
    from sklearn.datasets import load_digits

    from keras_seltransfer.retrieval import GaborBank
    from keras_seltransfer.utils import histograms

    images = load_digits().images.astype("float32")[..., None] * 16.0
    images = tf.image.resize(images, (24, 24)).numpy()
    bank = GaborBank()
    targets = tf.data.Dataset.from_tensor_slices(images[:120]).batch(64)
    sources = tf.data.Dataset.from_tensor_slices(images[120:]).batch(256)
    edges = histograms.fit_bin_edges(bank, targets, num_bins=16, progress=False)
    target = histograms.describe(bank, edges, targets, progress=False)
    source = histograms.describe(bank, edges, sources, progress=False)
    weights = histograms.channel_weights(bank)
    for k in (10, 50, 200):
        exact_ids, _ = nearest_sources(target, source, k, weights, mode="exact")
        for dtype in ("bfloat16", "float32"):
            fast_ids, fast_d = nearest_sources(target, source, k, weights, mode="fast", dtype=dtype)
            assert _recall(exact_ids, fast_ids) >= 0.99, (k, dtype)
    np.testing.assert_array_equal(
        fast_d[:5],
        [[symmetric_kl(target[r], source[i], weights) for i in row] for r, row in enumerate(fast_ids[:5])],
    )


# ---- the search mode is part of a retrieval run's identity ----------------


@pytest.fixture
def specs(tmp_path):
    source = helpers.write_npz(tmp_path / "source.npz", num_per_class=20, num_classes=3, seed=4)
    target = helpers.write_npz(tmp_path / "target.npz", num_per_class=8, seed=5)
    return "numpy:" + source, "numpy:" + target


def _config(specs, out, **kw):
    base = dict(
        source=specs[0], target=specs[1], bank="gabor", image_size=16, num_bins=8,
        k_max=5, batch_size=16, output_dir=str(out), progress=False,
    )
    base.update(kw)
    return IndexConfig(**base)


def _record(out):
    with open(os.path.join(out, "config.json")) as f:
        return json.load(f)


def test_a_run_records_the_resolved_mode_and_refuses_another(specs, tmp_path, monkeypatch):
    out = tmp_path / "run"
    build_neighbours(_config(specs, out, search_mode="auto"))
    # 45 training sources (a quarter of 60 held out) are below the threshold: the run searched exactly.
    assert _record(out)["search_mode"] == "exact"
    with np.load(out / "neighbours.npz") as f:
        assert json.loads(str(f["config"]))["search_mode"] == "exact"
        assert int(f["num_sources"]) == 45
    assert "topk" in build_neighbours(_config(specs, out, search_mode="exact"))["reused"]
    with pytest.raises(ValueError, match=r"search_mode='exact' \(this command: 'fast'\)"):
        build_neighbours(_config(specs, out, search_mode="fast"))
    # Above the threshold auto is fast, which the exact run is not.
    monkeypatch.setattr(similarity, "AUTO_FAST_MIN_SOURCES", 40)
    with pytest.raises(ValueError, match=r"search_mode='exact' \(this command: 'fast'\)"):
        build_neighbours(_config(specs, out, search_mode="auto"))

    fast = tmp_path / "fast"
    outputs = build_neighbours(_config(specs, fast, search_mode="auto"))
    assert _record(fast)["search_mode"] == "fast"
    with np.load(outputs["neighbours"]) as f:
        fast_ids = f["neighbour_ids"]
    with np.load(out / "neighbours.npz") as f:
        exact_ids = f["neighbour_ids"]
    assert _recall(exact_ids, fast_ids) >= 0.99


def test_a_record_without_a_search_mode_stands_for_exact(specs, tmp_path):
    out = tmp_path / "run"
    build_neighbours(_config(specs, out, search_mode="exact"))
    recorded = _record(out)
    del recorded["search_mode"]
    with open(out / "config.json", "w") as f:
        json.dump(recorded, f)
    assert "topk" in build_neighbours(_config(specs, out, search_mode="exact"))["reused"]
    with pytest.raises(ValueError, match=r"search_mode='exact' \(this command: 'fast'\)"):
        build_neighbours(_config(specs, out, search_mode="fast"))


def test_sharded_auto_run_resolves_the_mode_for_the_whole_source(specs, tmp_path, monkeypatch):
    # 45 sources in shards of 23 and 22: auto resolves against 45, not a shard.
    monkeypatch.setattr(similarity, "AUTO_FAST_MIN_SOURCES", 40)
    out = tmp_path / "run"
    for shard in (0, 1):
        build_neighbours(_config(specs, out, num_shards=2, shard_index=shard))
    assert _record(out)["search_mode"] == "fast"
    with np.load(out / "neighbours.npz") as f:
        assert json.loads(str(f["config"]))["search_mode"] == "fast"


def test_sjft_index_of_another_search_mode_is_refused(specs, tmp_path, monkeypatch):
    index_dir = str(tmp_path / "index")
    build_neighbours(_config(specs, index_dir, search_mode="exact", k_max=12))

    def finetune_config(mode):
        return training.FinetuneConfig(
            method="sjft", source=specs[0], target=specs[1], index_dir=index_dir,
            index_bank="gabor", index_search_mode=mode, image_size=16, k_max=12,
        )

    train_ids = np.arange(4)
    for mode in ("exact", "auto"):
        ids, built = sjft.load_neighbours(finetune_config(mode), train_ids)
        assert built.search_mode == "exact" and ids.shape == (4, 12)
    with pytest.raises(ValueError, match=r"search_mode='exact'.*index_search_mode='fast'"):
        sjft.load_neighbours(finetune_config("fast"), train_ids)
    monkeypatch.setattr(similarity, "AUTO_FAST_MIN_SOURCES", 40)
    with pytest.raises(ValueError, match=r"index_search_mode='auto' \(fast for this source\)"):
        sjft.load_neighbours(finetune_config("auto"), train_ids)
    # The default index directory of a fast run is another one.
    default = training.FinetuneConfig(method="sjft", index_bank="gabor").index_dir
    fast = training.FinetuneConfig(
        method="sjft", index_bank="gabor", index_search_mode="fast"
    ).index_dir
    assert fast == default + "-fast"
    # The index an sjft run builds is searched in its mode.
    assert sjft.index_config(finetune_config("fast")).search_mode == "fast"
