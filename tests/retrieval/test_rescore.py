"""Tests of the exact pair re-scoring (`keras_seltransfer.retrieval.rescore`):
every path, chunking and thread count gives the distances of the serial
NumPy reference, bit for bit."""

import numpy as np
import pytest

from keras_seltransfer.retrieval import rescore
from keras_seltransfer.retrieval.rescore import PairRescorer
from keras_seltransfer.retrieval.rescore import numpy_pairwise_sum
from keras_seltransfer.retrieval.similarity import nearest_sources
from keras_seltransfer.utils.divergence import weighted_symmetric_kl

EPS = 2.2e-16


def _histograms(rng, num, channels, bins, dtype="float64"):
    """Dirichlet histograms with exactly empty bins."""
    x = rng.dirichlet(np.full(bins, 0.5), size=(num, channels))
    x[x < 0.02] = 0.0
    x[..., 0] += x.sum(-1) == 0
    return (x / x.sum(-1, keepdims=True)).astype(dtype)


def _reference(target, block, rows, columns, half_weights):
    """One pair at a time through `weighted_symmetric_kl`."""
    source = block.astype(np.float64)
    return np.array([
        weighted_symmetric_kl(
            target[r][None], np.log(target[r] + EPS)[None],
            source[c][None], np.log(source[c] + EPS)[None], half_weights,
        )[0]
        for r, c in zip(rows, columns)
    ])


def _assert_bit_identical(found, expected):
    np.testing.assert_array_equal(found, expected)
    np.testing.assert_array_equal(np.signbit(found), np.signbit(expected))


@pytest.fixture(autouse=True)
def _fresh_kernel_state(monkeypatch):
    # A failed spot check disables the kernel for the process: keep that
    # local to the test that causes it.
    monkeypatch.setattr(rescore, "_KERNEL_DISABLED", [])


@pytest.mark.parametrize("n", [1, 3, 7, 8, 9, 13, 32, 96, 127, 128, 129, 200, 300])
def test_numpy_pairwise_sum_is_numpys_summation_order(n):
    rng = np.random.default_rng(n)
    # Values of mixed magnitudes, so that another order rounds differently.
    x = rng.standard_normal((64, n)) * 10.0 ** rng.integers(-8, 8, (64, n))
    found = numpy_pairwise_sum([x[:, i] for i in range(n)]) + 0.0
    _assert_bit_identical(found, np.sum(x, axis=-1))


@pytest.mark.parametrize("channels,bins", [(6, 13), (12, 32)])
def test_threaded_and_kernel_rescoring_equal_the_serial_reference(channels, bins):
    rng = np.random.default_rng(channels)
    target = _histograms(rng, 50, channels, bins)
    block = _histograms(rng, 300, channels, bins, dtype="float32")
    # Duplicates give distances of exactly zero.
    target[3] = block[7]
    num_pairs = 5 * rescore.KERNEL_CHUNK_PAIRS + 17
    rows = rng.integers(0, 50, num_pairs)
    columns = np.sort(rng.integers(0, 300, num_pairs))
    rows[:3], columns[:3] = 3, 7
    half_weights = rng.uniform(0.1, 1.0, channels) * 0.5
    expected = _reference(target, block, rows, columns, half_weights)
    assert np.count_nonzero(expected == 0) >= 3
    serial = PairRescorer(target, EPS, half_weights, threads=1, kernel=False)
    _assert_bit_identical(serial.rescore(block, rows, columns), expected)
    # Many NumPy ranges over three threads, the kernel over several chunks
    # and threads, the kernel with a padded block.
    for threads, kernel, source_rows in ((3, False, None), (1, True, None), (3, True, 512)):
        rescorer = PairRescorer(
            target, EPS, half_weights, threads=threads, kernel=kernel, source_rows=source_rows
        )
        _assert_bit_identical(rescorer.rescore(block, rows, columns), expected)
    # float64 blocks go through the same paths.
    rescorer = PairRescorer(target, EPS, half_weights, threads=2, kernel=True)
    _assert_bit_identical(
        rescorer.rescore(block.astype(np.float64), rows, columns), expected
    )
    # The kernel ran and agreed with NumPy on its spot checks.
    assert not rescore._KERNEL_DISABLED


def test_numpy_ranges_split_over_threads(monkeypatch):
    # Ranges of a few chunks each, so that three threads share many ranges.
    monkeypatch.setattr(rescore, "NUMPY_CHUNK_VALUES", 8 * 4 * 3)
    rng = np.random.default_rng(5)
    target = _histograms(rng, 20, 4, 8)
    block = _histograms(rng, 40, 4, 8)
    rows = rng.integers(0, 20, 2000)
    columns = rng.integers(0, 40, 2000)
    half_weights = np.full(4, 0.125)
    calls = []
    real_run_ranges = rescore._run_ranges

    def counting(run, count, grain, threads):
        calls.append((count, grain, threads))
        return real_run_ranges(run, count, grain, threads)

    monkeypatch.setattr(rescore, "_run_ranges", counting)
    found = PairRescorer(target, EPS, half_weights, threads=3, kernel=False).rescore(
        block, rows, columns
    )
    assert calls and calls[0][0] > 2 * 3 * calls[0][1]
    _assert_bit_identical(found, _reference(target, block, rows, columns, half_weights))


def test_kernel_is_skipped_where_subnormals_could_be_flushed(monkeypatch):
    rng = np.random.default_rng(6)
    target = _histograms(rng, 8, 3, 8)
    block = _histograms(rng, 20, 3, 8)
    # Tiny but valid entries: TensorFlow would flush subnormal terms to 0.
    target[0, 0, :2] = [1e-310, 1.0 - 1e-310 - target[0, 0, 2:].sum()]
    block[1, 1, 0] = 1e-200
    rows = rng.integers(0, 8, 100)
    columns = rng.integers(0, 20, 100)
    rows[0], columns[0] = 0, 1

    def no_kernel(*args):
        raise AssertionError("the kernel ran on inputs it cannot reproduce")

    monkeypatch.setattr(rescore, "_kernel", no_kernel)
    half_weights = np.full(3, 0.5 / 3)
    found = PairRescorer(target, EPS, half_weights, kernel=True).rescore(block, rows, columns)
    _assert_bit_identical(found, _reference(target, block, rows, columns, half_weights))
    # Tiny weights alone, and a float64 block alone, also keep it out.
    safe = _histograms(rng, 8, 3, 8)
    tiny_weights = np.array([0.5, 1e-150, 0.25])
    found = PairRescorer(safe, EPS, tiny_weights, kernel=True).rescore(
        block[2:], rows, columns % 18
    )
    _assert_bit_identical(found, _reference(safe, block[2:], rows, columns % 18, tiny_weights))
    found = PairRescorer(safe, EPS, half_weights, kernel=True).rescore(block, rows, columns)
    _assert_bit_identical(found, _reference(safe, block, rows, columns, half_weights))


def test_a_kernel_that_disagrees_is_replaced_by_numpy_with_a_warning(monkeypatch):
    rng = np.random.default_rng(7)
    target = _histograms(rng, 8, 3, 8)
    block = _histograms(rng, 20, 3, 8, dtype="float32")
    rows = rng.integers(0, 8, 50)
    columns = rng.integers(0, 20, 50)
    real_kernel = rescore._kernel
    monkeypatch.setattr(rescore, "_kernel", lambda *args: real_kernel(*args) * (1 + 2**-50))
    half_weights = np.full(3, 0.5 / 3)
    rescorer = PairRescorer(target, EPS, half_weights, kernel=True)
    with pytest.warns(RuntimeWarning, match="re-scoring kernel disagreed"):
        found = rescorer.rescore(block, rows, columns)
    expected = _reference(target, block, rows, columns, half_weights)
    _assert_bit_identical(found, expected)
    assert rescore._KERNEL_DISABLED
    _assert_bit_identical(rescorer.rescore(block, rows, columns), expected)


def test_bad_arguments_are_clear_errors():
    target = np.full((2, 1, 4), 0.25)
    with pytest.raises(ValueError, match="`kernel` to be None, True or False"):
        PairRescorer(target, EPS, np.array([0.5]), kernel="yes")
    with pytest.raises(ValueError, match="`threads` >= 1"):
        PairRescorer(target, EPS, np.array([0.5]), threads=0)


@pytest.mark.parametrize("mode", ["exact", "fast"])
def test_searches_through_the_kernel_equal_searches_through_numpy(mode, monkeypatch):
    rng = np.random.default_rng(8)
    target = _histograms(rng, 30, 8, 16, dtype="float32")
    source = _histograms(rng, 700, 8, 16, dtype="float32")
    monkeypatch.setattr(rescore, "KERNEL_MIN_PAIRS", 10**9)
    expected = nearest_sources(target, source, 40, mode=mode, block_size=256)
    # Every re-scoring through the kernel, in chunks over two threads; the
    # last block (188 rows) is padded to the block size.
    monkeypatch.setattr(rescore, "KERNEL_MIN_PAIRS", 0)
    monkeypatch.setattr(rescore, "KERNEL_MIN_PAIRS_PER_ROW", 0)
    monkeypatch.setattr(rescore, "KERNEL_CHUNK_PAIRS", 256)
    monkeypatch.setattr(rescore, "default_threads", lambda: 2)
    calls = []
    real_kernel = rescore._kernel

    def counting_kernel(*args):
        calls.append(args[5].shape[0])
        return real_kernel(*args)

    monkeypatch.setattr(rescore, "_kernel", counting_kernel)
    found = nearest_sources(target, source, 40, mode=mode, block_size=256)
    assert len(calls) > 3 and set(calls) == {256}
    assert not rescore._KERNEL_DISABLED
    np.testing.assert_array_equal(found[0], expected[0])
    _assert_bit_identical(found[1], expected[1])
