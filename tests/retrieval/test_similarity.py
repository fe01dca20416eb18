"""Tests for keras_seltransfer.retrieval.similarity."""

import numpy as np
import pytest

from keras_seltransfer.retrieval.similarity import nearest_sources
from keras_seltransfer.retrieval.similarity import pairwise_distances
from keras_seltransfer.retrieval.topk import merge_topk
from keras_seltransfer.utils.divergence import symmetric_kl

EPS = 2.2e-16


def _histograms(rng, num, channels=3, bins=6, concentration=0.5):
    """Dirichlet histograms with some exactly empty bins, as real response
    histograms have, so the eps inside the logs matters."""
    x = rng.dirichlet(np.full(bins, concentration), size=(num, channels))
    x[x < 0.03] = 0.0
    x[..., 0] += x.sum(-1) == 0  # never an all-empty channel
    return x / x.sum(-1, keepdims=True)


def _with_ties(rng, target, source):
    """Duplicates source rows (within and across blocks) and copies some of
    them into the targets: exact ties at zero and non-zero distances."""
    source = source.copy()
    target = target.copy()
    num = len(source)
    for copy in (1, num // 2, num - 1):
        source[copy] = source[0]
    source[num // 3] = source[2]
    target[0] = source[0]
    if len(target) > 2:
        target[2] = source[2]
    return target, source


def _loop_distances(target, source, weights=None):
    return np.array(
        [[symmetric_kl(t, s, channel_weights=weights) for s in source] for t in target]
    )


def _loop_nearest(target, source, k, weights=None):
    """The plain double loop the streamed search must reproduce exactly."""
    distances = _loop_distances(target, source, weights)
    # A stable sort keeps the lower source index first among equal distances.
    order = np.argsort(distances, axis=1, kind="stable")[:, :k]
    return order, np.take_along_axis(distances, order, axis=1)


def _naive_symmetric_kl(p, q, weights):
    # Written as in the paper: two separate divergences per channel.
    kl_pq = np.sum(p * (np.log(p + EPS) - np.log(q + EPS)), axis=1)
    kl_qp = np.sum(q * (np.log(q + EPS) - np.log(p + EPS)), axis=1)
    return float(np.sum(weights * 0.5 * (kl_pq + kl_qp)))


@pytest.mark.parametrize(
    "num_targets, num_sources, k, block_size",
    [
        (5, 37, 1, 4),
        (5, 37, 5, 3),  # block_size < k
        (6, 40, 7, 16),  # block_size does not divide the source
        (4, 23, 23, 5),  # k = S: a full sort
        (3, 30, 4, 64),  # one block larger than the source
        (7, 41, 6, 1),
    ],
)
def test_nearest_sources_equals_double_loop(num_targets, num_sources, k, block_size):
    rng = np.random.default_rng(num_sources + k)
    target, source = _with_ties(
        rng, _histograms(rng, num_targets), _histograms(rng, num_sources)
    )
    expected_indices, expected_distances = _loop_nearest(target, source, k)
    indices, distances = nearest_sources(target, source, k, block_size=block_size)
    assert indices.dtype == np.int64 and distances.dtype == np.float64
    np.testing.assert_array_equal(indices, expected_indices)
    # The candidates are re-scored with symmetric_kl's own arithmetic.
    np.testing.assert_array_equal(distances, expected_distances)


def test_exact_ties_resolve_to_lower_index():
    rng = np.random.default_rng(0)
    source = _histograms(rng, 25)
    copies = [2, 5, 7, 11, 12, 20]
    source[copies] = source[2]
    other = _histograms(rng, 1)[0]
    target = np.stack([source[2], other])
    for block_size in (1, 3, 4, 25):
        indices, distances = nearest_sources(target, source, k=4, block_size=block_size)
        np.testing.assert_array_equal(indices[0], copies[:4])
        np.testing.assert_array_equal(distances[0], np.zeros(4))
        # Equal non-zero distances: all copies, lowest indices first.
        expected = _loop_nearest(target[1:], source, 25)[0][0]
        ranks = [int(np.flatnonzero(expected == c)[0]) for c in copies]
        assert ranks == sorted(ranks)
        np.testing.assert_array_equal(indices[1], expected[:4])


def test_gemm_rounding_within_the_bound_does_not_change_results(monkeypatch):
    # A device whose GEMM rounds differently (another BLAS, split-K on a
    # GPU) is simulated by perturbing every GEMM distance by up to 0.9 of
    # the bound the search assumes; ties are then split in random order,
    # and only the margin and the exact re-scoring restore them.
    from keras_seltransfer.retrieval import similarity

    rng = np.random.default_rng(11)
    target, source = _with_ties(rng, _histograms(rng, 6), _histograms(rng, 40))
    exact_gemm = similarity._gemm_distances
    noise = np.random.default_rng(12)
    scale = similarity._margin_scale(3, 6, np.full(3, 1 / 3), "float64")

    def noisy_gemm(target_terms, source_terms):
        distances = exact_gemm(target_terms, source_terms)
        bound = scale * (
            target_terms["log_bound"].numpy()[:, None]
            + source_terms["log_bound"].numpy()[None, :]
        )
        return distances + 0.9 * bound * noise.uniform(-1, 1, size=bound.shape)

    monkeypatch.setattr(similarity, "_gemm_distances", noisy_gemm)
    # k=2 cuts through the four copies of source row 0 at distance 0 from
    # target 0: which copies are kept depends on the tie rule alone.
    for k in (2, 6):
        expected = _loop_nearest(target, source, k)
        for block_size in (1, 4, 40):
            indices, distances = nearest_sources(target, source, k, block_size=block_size)
            np.testing.assert_array_equal(indices, expected[0])
            np.testing.assert_array_equal(distances, expected[1])

    # Without the margin the same perturbation breaks the tie rule.
    monkeypatch.setattr(similarity, "_margin_scale", lambda *args: 0.0)
    expected = _loop_nearest(target, source, 2)[0]
    results = [nearest_sources(target, source, 2, block_size=40)[0] for _ in range(5)]
    assert any(not np.array_equal(r, expected) for r in results)


def test_float32_gemm_matches_on_random_data():
    rng = np.random.default_rng(1)
    target, source = _with_ties(rng, _histograms(rng, 6), _histograms(rng, 50))
    expected_indices, expected_distances = _loop_nearest(target, source, 8)
    indices, distances = nearest_sources(target, source, 8, block_size=7, dtype="float32")
    np.testing.assert_array_equal(indices, expected_indices)
    np.testing.assert_array_equal(distances, expected_distances)


def test_float32_source_blocks_are_rescored_exactly():
    # Float32 blocks are kept float32 for the GEMM and only the re-scored
    # rows are widened: results must equal the double loop on the widened
    # values, with the float64 GEMM too.
    rng = np.random.default_rng(13)
    target, source = _with_ties(rng, _histograms(rng, 5), _histograms(rng, 30))
    source32 = source.astype(np.float32)
    expected = _loop_nearest(target, source32.astype(np.float64), 6)
    for dtype in ("float64", "float32"):
        indices, distances = nearest_sources(target, source32, 6, block_size=7, dtype=dtype)
        np.testing.assert_array_equal(indices, expected[0])
        np.testing.assert_array_equal(distances, expected[1])


def test_pairwise_distances_match_loop():
    rng = np.random.default_rng(2)
    target, source = _histograms(rng, 5), _histograms(rng, 9)
    expected = _loop_distances(target, source)
    distances = pairwise_distances(target, source)
    assert distances.shape == (5, 9) and distances.dtype == np.float64
    np.testing.assert_allclose(distances, expected, rtol=0, atol=1e-10)
    distances32 = pairwise_distances(target, source, dtype="float32")
    assert distances32.dtype == np.float32
    np.testing.assert_allclose(distances32, expected, rtol=0, atol=1e-4)


def test_symmetry_and_zero_self_distance():
    rng = np.random.default_rng(3)
    x = _histograms(rng, 6)
    for p in x:
        assert symmetric_kl(p, p) == 0.0
        for q in x:
            assert symmetric_kl(p, q) == symmetric_kl(q, p)
    d = pairwise_distances(x, x)
    np.testing.assert_allclose(d, d.T, rtol=0, atol=1e-12)
    np.testing.assert_allclose(np.diag(d), 0.0, atol=1e-12)
    assert np.all(d >= 0)
    indices, distances = nearest_sources(x, x, k=1)
    np.testing.assert_array_equal(indices[:, 0], np.arange(6))
    np.testing.assert_array_equal(distances[:, 0], 0.0)


def test_symmetric_kl_matches_paper_formula():
    rng = np.random.default_rng(4)
    p, q = _histograms(rng, 2, channels=4, bins=7)
    weights = np.array([0.1, 0.4, 0.0, 0.25])
    assert symmetric_kl(p, q, weights) == pytest.approx(
        _naive_symmetric_kl(p, q, weights), rel=1e-12
    )
    uniform = np.full(4, 0.25)
    assert symmetric_kl(p, q) == symmetric_kl(p, q, uniform)
    assert symmetric_kl(p, q) == pytest.approx(_naive_symmetric_kl(p, q, uniform), rel=1e-12)
    # A channel with weight 0 does not count.
    changed = q.copy()
    changed[2] = p[2][::-1]
    assert symmetric_kl(p, changed, weights) == pytest.approx(
        symmetric_kl(p, q, weights), rel=1e-12
    )


def test_channel_weights_in_search():
    rng = np.random.default_rng(5)
    target, source = _histograms(rng, 4, channels=4), _histograms(rng, 30, channels=4)
    weights = np.array([0.5, 0.0, 0.125, 0.375])
    expected = _loop_nearest(target, source, 5, weights)
    result = nearest_sources(target, source, 5, channel_weights=weights, block_size=8)
    np.testing.assert_array_equal(result[0], expected[0])
    np.testing.assert_array_equal(result[1], expected[1])
    np.testing.assert_allclose(
        pairwise_distances(target, source, channel_weights=weights),
        _loop_distances(target, source, weights),
        rtol=0,
        atol=1e-10,
    )
    unweighted = nearest_sources(target, source, 5, block_size=8)
    assert not np.array_equal(unweighted[1], result[1])


def test_memory_mapped_and_sliceable_sources(tmp_path):
    rng = np.random.default_rng(6)
    target, source = _with_ties(rng, _histograms(rng, 4), _histograms(rng, 33))
    expected = nearest_sources(target, source, 6, block_size=5)
    np.save(tmp_path / "source.npy", source.astype(np.float32))
    mapped = np.load(tmp_path / "source.npy", mmap_mode="r")
    assert isinstance(mapped, np.memmap)
    from_float32 = nearest_sources(target, source.astype(np.float32), 6, block_size=5)
    from_mmap = nearest_sources(target, mapped, 6, block_size=5)
    np.testing.assert_array_equal(from_mmap[0], from_float32[0])
    np.testing.assert_array_equal(from_mmap[1], from_float32[1])

    class Rows:
        """Only len() and row-range slicing, and counts the rows read."""

        def __init__(self, array):
            self.array, self.reads = array, []

        def __len__(self):
            return len(self.array)

        def __getitem__(self, rows):
            self.reads.append((rows.start, rows.stop))
            return self.array[rows].tolist()

    rows = Rows(source)
    result = nearest_sources(target, rows, 6, block_size=5, progress=True)
    np.testing.assert_array_equal(result[0], expected[0])
    np.testing.assert_array_equal(result[1], expected[1])
    assert rows.reads == [(i, min(i + 5, 33)) for i in range(0, 33, 5)]


@pytest.mark.parametrize("num_shards", [2, 3])
def test_sharded_search_then_merge_equals_full_search(num_shards):
    rng = np.random.default_rng(7)
    target, source = _with_ties(rng, _histograms(rng, 6), _histograms(rng, 40))
    k = 9
    full = nearest_sources(target, source, k, block_size=6)
    parts = []
    for shard in range(num_shards):
        ids = np.arange(len(source))[shard::num_shards]
        local, distances = nearest_sources(
            target, source[ids], min(k, len(ids)), block_size=4
        )
        parts.append((ids[local], distances))
    merged = merge_topk(parts, k)
    np.testing.assert_array_equal(merged[0], full[0])
    np.testing.assert_array_equal(merged[1], full[1])


def test_merge_topk_orders_ties_by_index():
    a = (np.array([[4, 0]]), np.array([[0.1, 0.2]]))
    b = (np.array([[3, 1]]), np.array([[0.1, 0.1]]))
    indices, distances = merge_topk([a, b], k=3)
    np.testing.assert_array_equal(indices, [[1, 3, 4]])
    np.testing.assert_array_equal(distances, [[0.1, 0.1, 0.1]])
    assert indices.dtype == np.int64 and distances.dtype == np.float64


def test_merge_topk_errors():
    # One test for all cases: the suite's per-test teardown (a Keras session
    # reset) costs more than these checks.
    for parts, k, match in [
        ([], 1, "at least one"),
        ([(np.zeros((2, 2), int), np.zeros((2, 2)))], 3, r"Received: k=3"),
        ([(np.zeros((2, 2), int), np.zeros((2, 2)))], 0, r"Received: k=0"),
        ([(np.zeros((2, 2), int), np.zeros((2, 3)))], 1, "same shape"),
        ([(np.zeros((2, 1), int), np.zeros((2, 1))), (np.ones((3, 1), int), np.ones((3, 1)))],
         1, "same number of targets"),
        ([(np.array([[1]]), np.array([[0.1]])), (np.array([[1]]), np.array([[0.2]]))],
         1, "disjoint"),
        ([(np.array([[1]]), np.array([[np.nan]]))], 1, "NaN"),
        ([np.zeros((2, 2))], 1, "pair"),
    ]:
        with pytest.raises(ValueError, match=match):
            merge_topk(parts, k)


def _bad_inputs():
    rng = np.random.default_rng(8)
    good = _histograms(rng, 4)
    negative = good.copy()
    negative[1, 2, 3] = -0.1
    negative[1, 2, 4] += 0.1
    nan = good.copy()
    nan[2, 0, 0] = np.nan
    inf = good.copy()
    inf[0, 1, 1] = np.inf
    unnormalised = good.copy()
    unnormalised[3, 1] *= 1.01
    return good, [
        (dict(target_descriptors=good[0]), "rank 3"),
        (dict(source_descriptors=good[:, :, :5]), "channels and bins"),
        (dict(source_descriptors=good[:, :2]), "channels and bins"),
        (dict(k=0), "Received: k=0"),
        (dict(k=5), "number of sources.*Received: k=5"),
        (dict(k=2.0), "Received: k=2.0"),
        (dict(source_descriptors=negative), r"non-negative.*source_descriptors\[1, 2, 3\]"),
        (dict(target_descriptors=nan), r"finite.*target_descriptors\[2, 0, 0\]=nan"),
        (dict(source_descriptors=inf), "finite"),
        (dict(target_descriptors=unnormalised), r"sum to 1.*target_descriptors\[3, 1\]"),
        (dict(channel_weights=[0.5, 0.5]), r"shape \(3,\)"),
        (dict(channel_weights=[0.5, -0.1, 0.6]), "non-negative"),
        (dict(channel_weights=[0.0, 0.0, 0.0]), "not all zero"),
        (dict(block_size=0), "Received: block_size=0"),
        (dict(eps=0.0), "Received: eps=0.0"),
        (dict(dtype="float16"), "Received: dtype='float16'"),
        (dict(source_descriptors=object()), "len()"),
    ]


def test_nearest_sources_errors():
    good, cases = _bad_inputs()
    for overrides, match in cases:
        arguments = dict(target_descriptors=good, source_descriptors=good, k=2, block_size=2)
        arguments.update(overrides)
        with pytest.raises(ValueError, match=match):
            nearest_sources(**arguments)


def test_errors_in_later_blocks_name_the_global_row():
    rng = np.random.default_rng(9)
    source = _histograms(rng, 10)
    source[7, 1, 2] = np.nan
    with pytest.raises(ValueError, match=r"source_descriptors\[7, 1, 2\]=nan"):
        nearest_sources(source[:2], source, 1, block_size=3)


def test_symmetric_kl_and_pairwise_errors():
    rng = np.random.default_rng(10)
    p, q = _histograms(rng, 2)
    with pytest.raises(ValueError, match=r"same shape.*Received: p.shape=\(3, 6\)"):
        symmetric_kl(p, q[:, :5] / q[:, :5].sum(-1, keepdims=True))
    with pytest.raises(ValueError, match=r"rank 2.*Received: p.shape=\(1, 3, 6\)"):
        symmetric_kl(p[None], q)
    with pytest.raises(ValueError, match="sum to 1"):
        symmetric_kl(p * 2, q)
    with pytest.raises(ValueError, match="same channels and bins"):
        pairwise_distances(p[None], q[None, :2])
    with pytest.raises(ValueError, match="Received: dtype='int32'"):
        pairwise_distances(p[None], q[None], dtype="int32")
    # Finite entries whose row sum overflows are reported by the sum check.
    huge = p.copy()
    huge[1, :2] = 1e308
    with np.errstate(over="ignore"), pytest.raises(
        ValueError, match=r"sum to 1.*p\[1\]\.sum\(\)=inf"
    ):
        symmetric_kl(huge, q)
