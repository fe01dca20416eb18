"""Exact re-scoring of many (target, source) pairs, bit-identical to `symmetric_kl`.

Both search modes of `similarity.nearest_sources` finish by computing exact
float64 distances of candidate pairs with the arithmetic of
`weighted_symmetric_kl` (`keras_seltransfer.utils.divergence`):

    per_channel = np.sum((p - q) * (log_p - log_q), axis=-1)
    distance = np.sum(per_channel * half_weights, axis=-1)

`PairRescorer` computes those distances for many pairs at once. Large pair
sets go through an XLA kernel that gathers the rows and sums in one pass
(several times faster than NumPy's gathers and temporaries); small ones,
and inputs the kernel cannot reproduce exactly (see below), through NumPy
itself. The pairs are cut into chunks spread over a thread pool; a pair's
distance depends on its own rows only, so the split never changes a result.

Bit-identity of the kernel rests on three facts:
  - subtraction and multiplication of float64 values are correctly rounded
    on every IEEE machine, so the terms equal NumPy's;
  - NumPy sums a contiguous last axis with its pairwise summation
    (`numpy_pairwise_sum` spells out the order: eight interleaved
    accumulators combined as a tree, halves above 128 values) on top of the
    reduction's initial 0; the kernel adds in exactly that order, and XLA
    does not reassociate additions (TensorFlow's graph optimiser does, so
    the kernel is always compiled by XLA), while its fusion of a product
    into the addition consuming it is defeated (see `_kernel`);
  - TensorFlow runs kernels with subnormal numbers flushed to zero, so the
    kernel is used only where no subnormal can occur: every non-zero input
    value and half weight at least `_KERNEL_MIN_VALUE` (see
    `_kernel_applies`). Float32 inputs always qualify.
Every kernel call is also spot-checked against NumPy on 64 of its pairs;
a disagreement (a NumPy or XLA whose arithmetic differs from the above)
switches this process to the NumPy path with a warning.
"""

import math
import os
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import tensorflow as tf

from keras_seltransfer.utils.divergence import weighted_symmetric_kl

# Pairs per kernel call. The last chunk of a call is padded to this size, so
# each search compiles the kernel for one shape per source-block size.
KERNEL_CHUNK_PAIRS = 1024

# Below this many pairs one `rescore` call runs in NumPy: the kernel's
# conversions and (first time) compilation would cost more than it saves.
KERNEL_MIN_PAIRS = 4096

# Nor below this many pairs per row of the (padded) block: the kernel
# converts and copies the whole block to float64 values and logarithms
# (about 45 us per 96 x 32 row on two CPU cores), NumPy only the rows it
# re-scores, and the kernel saves about 8 us per pair (4 against 12 us).
KERNEL_MIN_PAIRS_PER_ROW = 8

# Descriptor values NumPy gathers per chunk (128 KiB of float64): small
# chunks keep the temporaries in cache.
NUMPY_CHUNK_VALUES = 1 << 14

# Smallest non-zero input value (and half weight) the kernel accepts. With
# p, q >= 2**-400 or 0, |p - q| >= 2**-452 or 0; logarithms of values in
# (0, 1.002] are 0 or at least 2**-54 in magnitude, so differences of two of
# them are 0 or at least 2**-106; every product is then 0 or >= 2**-558,
# the sums of these non-negative products too, and their products with half
# weights >= 2**-400 stay >= 2**-958, far from the subnormal range
# (< 2**-1022) that TensorFlow flushes to zero.
_KERNEL_MIN_VALUE = 2.0**-400

# Pairs of every kernel call checked against NumPy, spread over the call.
_SPOT_CHECK_PAIRS = 64


def numpy_pairwise_sum(terms):
    """Sums equally shaped tensors in the order of NumPy's pairwise summation.

    NumPy reduces a contiguous axis of `n` float64 values by: `n < 8`, a
    running sum; `8 <= n <= 128`, eight accumulators `r[j]` taking values
    `j, j + 8, j + 16, ...` in turn, combined as
    `((r0 + r1) + (r2 + r3)) + ((r4 + r5) + (r6 + r7))`, then the `n % 8`
    remaining values one by one; `n > 128`, the sums of the first
    `n2 = n // 2 - (n // 2) % 8` values and of the rest, each recursively,
    added. (`np.sum` adds that to the reduction's initial 0, which only turns
    a zero sum of -0.0 into +0.0.)

    Args:
        terms: a list of `n >= 1` tensors (or arrays) of one shape, the
            values of the summed axis in order.

    Returns:
        Their sum, a tensor of that shape.

    Example:

    >>> values = np.arange(20.0) / 7
    >>> float(numpy_pairwise_sum(list(values))) == float(np.sum(values))
    True
    """
    n = len(terms)
    if n < 8:
        total = terms[0]
        for term in terms[1:]:
            total = total + term
        return total
    if n <= 128:
        accumulators = list(terms[:8])
        full = n - n % 8
        for i in range(8, full, 8):
            accumulators = [accumulators[j] + terms[i + j] for j in range(8)]
        r = accumulators
        total = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]))
        for term in terms[full:]:
            total = total + term
        return total
    half = n // 2
    half -= half % 8
    return numpy_pairwise_sum(terms[:half]) + numpy_pairwise_sum(terms[half:])


@tf.function(jit_compile=True)
def _kernel(target, target_logs, sources, source_logs, half_weights, rows, columns, zero):
    """`weighted_symmetric_kl` of the pairs `(target[rows[i]], sources[columns[i]])`,
    summed in NumPy's order (before the final `+ 0.0`, see `_rescore_kernel`).

    `zero` is a float64 0 passed at run time. XLA on CPUs lets LLVM fuse a
    product into the addition that consumes it (one rounding instead of
    two, unlike NumPy); every product is therefore added to `zero` first,
    which neither compiler can fold away (it turns -0.0 into +0.0), so the
    fused form, if any, is `fma(a, b, 0)`: the correctly rounded product.
    """
    terms = (tf.gather(target, rows) - tf.gather(sources, columns)) * (
        tf.gather(target_logs, rows) - tf.gather(source_logs, columns)
    ) + zero
    per_channel = numpy_pairwise_sum(tf.unstack(terms, axis=-1))
    return numpy_pairwise_sum(tf.unstack(per_channel * half_weights + zero, axis=-1))


# Set once a spot check failed: every later call uses NumPy.
_KERNEL_DISABLED = []
_KERNEL_LOCK = threading.Lock()


def default_threads():
    """Threads `PairRescorer` uses by default: TensorFlow's intra-op setting
    when one was made, else the CPUs this process may run on (at most 8).

    Example:

    >>> from keras_seltransfer.retrieval.rescore import default_threads
    >>> 1 <= default_threads()
    True
    """
    configured = tf.config.threading.get_intra_op_parallelism_threads()
    if configured:
        return configured
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:
        cpus = os.cpu_count() or 1
    return max(1, min(cpus, 8))


def _min_positive(array):
    positive = array[array > 0]
    return float(positive.min()) if positive.size else math.inf


def _numpy_distances(target, target_logs, block, rows, columns, half_weights, eps, threads):
    """The NumPy path: `weighted_symmetric_kl` over chunks of the pairs
    `(target[rows[i]], block[columns[i]])`, the chunks spread over `threads`."""
    used, inverse = np.unique(columns, return_inverse=True)
    # Float32 to float64 is exact, so converting only the re-scored rows
    # gives the values `symmetric_kl` sees. The logarithms are taken once
    # per source row, in place.
    sources = np.asarray(block[used], dtype=np.float64)
    source_logs = sources + eps
    np.log(source_logs, out=source_logs)
    distances = np.empty(rows.shape[0])
    chunk = max(1, NUMPY_CHUNK_VALUES // (sources.shape[1] * sources.shape[2]))

    def run(start, stop):
        for low in range(start, stop, chunk):
            high = min(low + chunk, stop)
            r, c = rows[low:high], inverse[low:high]
            distances[low:high] = weighted_symmetric_kl(
                target[r], target_logs[r], sources[c], source_logs[c], half_weights
            )

    # Threads only pay off on many pairs: each range holds many chunks.
    _run_ranges(run, rows.shape[0], chunk * 64, threads)
    return distances


class PairRescorer:
    """Exact float64 distances of (target row, source row) pairs.

    Holds one search's targets and half channel weights, and the targets'
    logarithms as each path needs them (NumPy arrays, or the kernel's
    TensorFlow copies: about `2 * T * channels * bins` float64 values);
    `rescore` takes a source block and pairs into it. Results are
    bit-identical to `weighted_symmetric_kl` (hence to `symmetric_kl`) on
    the same rows, whatever the path, chunking or thread count.

    Args:
        target: float64 descriptors `[T, channels, bins]`, checked.
        eps: the constant inside the logarithms.
        half_weights: float64 `[channels]`, half the channel weights.
        threads: worker threads; None gives `default_threads()`.
        kernel: None (the default) uses the XLA kernel where it applies
            (enough pairs, see `KERNEL_MIN_PAIRS` and
            `KERNEL_MIN_PAIRS_PER_ROW`, and inputs it reproduces exactly);
            False always uses NumPy; True uses the kernel whenever its
            inputs allow, whatever the number of pairs.
        source_rows: the row count every source block is padded to for the
            kernel (the search's block size, at most the source size), so
            that one search compiles it for one shape; None pads nothing.

    Example:

    >>> rng = np.random.default_rng(0)
    >>> target = rng.dirichlet(np.ones(4), size=(2, 3))
    >>> rescorer = PairRescorer(target, 1e-12, np.full(3, 0.5 / 3))
    >>> rescorer.rescore(target, np.array([0, 1]), np.array([0, 1])).tolist()
    [0.0, 0.0]
    """

    def __init__(self, target, eps, half_weights, threads=None, kernel=None, source_rows=None):
        if kernel not in (None, True, False):
            raise ValueError(
                f"Expected `kernel` to be None, True or False. Received: kernel={kernel!r}"
            )
        self.target = target
        self.eps = eps
        self.half_weights = np.asarray(half_weights, np.float64)
        self._target_logs = None
        self.threads = default_threads() if threads is None else int(threads)
        if self.threads < 1:
            raise ValueError(f"Expected `threads` >= 1. Received: threads={threads!r}")
        self.kernel = kernel
        self.source_rows = source_rows
        self._kernel_inputs = None
        self._target_fits_kernel = None

    def rescore(self, block, rows, columns):
        """Exact distances of the pairs `(target[rows[i]], block[columns[i]])`.

        Args:
            block: source descriptors `[N, channels, bins]`, float32 or
                float64, checked (only the rows in `columns` are read by
                NumPy; the kernel converts the whole block).
            rows: int array `[P]` of target rows.
            columns: int array `[P]` of block rows.

        Returns:
            float64 array `[P]`.
        """
        rows = np.asarray(rows)
        columns = np.asarray(columns)
        if rows.shape[0] == 0:
            return np.empty(0)
        if self._use_kernel(block, rows.shape[0]):
            distances = self._rescore_kernel(block, rows, columns)
            if distances is not None:
                return distances
        return self._rescore_numpy(block, rows, columns)

    def _use_kernel(self, block, num_pairs):
        if self.kernel is False or _KERNEL_DISABLED:
            return False
        if self.kernel is None:
            rows = max(block.shape[0], self.source_rows or 0)
            if num_pairs < max(KERNEL_MIN_PAIRS, KERNEL_MIN_PAIRS_PER_ROW * rows):
                return False
        if self._target_fits_kernel is None:
            self._target_fits_kernel = (
                _min_positive(self.target) >= _KERNEL_MIN_VALUE
                and _min_positive(self.half_weights) >= _KERNEL_MIN_VALUE
            )
        if not self._target_fits_kernel:
            return False
        # Float32 values are 0 or >= 2**-149: only float64 blocks need a look.
        return (
            block.dtype == np.float32
            or _min_positive(np.asarray(block)) >= _KERNEL_MIN_VALUE
        )

    def _rescore_numpy(self, block, rows, columns):
        if self._target_logs is None:
            self._target_logs = np.log(self.target + self.eps)
        return _numpy_distances(
            self.target, self._target_logs, block, rows, columns, self.half_weights,
            self.eps, self.threads,
        )

    def _rescore_kernel(self, block, rows, columns):
        if self._kernel_inputs is None:
            # The NumPy path's logarithms when it has them, else made for
            # the kernel only (not kept: the spot checks take their rows').
            logs = self._target_logs
            if logs is None:
                logs = np.log(self.target + self.eps)
            self._kernel_inputs = (
                tf.constant(self.target),
                tf.constant(logs),
                tf.constant(self.half_weights),
                tf.constant(0.0, tf.float64),
            )
            del logs
        target, target_logs, half_weights, zero = self._kernel_inputs
        sources, source_logs = _kernel_sources(block, self.eps, self.source_rows)
        rows32 = rows.astype(np.int32)
        columns32 = columns.astype(np.int32)
        distances = np.empty(rows.shape[0])

        def run(start, stop):
            for low in range(start, stop, KERNEL_CHUNK_PAIRS):
                high = min(low + KERNEL_CHUNK_PAIRS, stop)
                r = np.zeros(KERNEL_CHUNK_PAIRS, np.int32)
                c = np.zeros(KERNEL_CHUNK_PAIRS, np.int32)
                r[: high - low] = rows32[low:high]
                c[: high - low] = columns32[low:high]
                result = _kernel(
                    target, target_logs, sources, source_logs, half_weights, r, c, zero
                )
                distances[low:high] = result.numpy()[: high - low]

        count = rows.shape[0]
        # The first chunk on this thread: it traces and compiles the kernel
        # for a new shape once, before the workers call it.
        first = min(count, KERNEL_CHUNK_PAIRS)
        run(0, first)
        _run_ranges(
            lambda a, b: run(first + a, first + b), count - first, KERNEL_CHUNK_PAIRS,
            self.threads,
        )
        # `np.sum` adds its sum to the initial 0, turning -0.0 into +0.0.
        np.add(distances, 0.0, out=distances)
        check = np.unique(np.linspace(0, count - 1, _SPOT_CHECK_PAIRS).astype(np.int64))
        checked_targets = self.target[rows[check]]
        expected = _numpy_distances(
            checked_targets, np.log(checked_targets + self.eps), block,
            np.arange(check.shape[0]), columns[check], self.half_weights, self.eps, 1,
        )
        if not (
            np.array_equal(distances[check], expected)
            and np.array_equal(np.signbit(distances[check]), np.signbit(expected))
        ):
            with _KERNEL_LOCK:
                if not _KERNEL_DISABLED:
                    _KERNEL_DISABLED.append(True)
                    warnings.warn(
                        "The XLA re-scoring kernel disagreed with NumPy's float64 "
                        "arithmetic (another NumPy summation order or XLA floating-point "
                        "mode?); exact re-scoring uses NumPy from now on.",
                        RuntimeWarning,
                        stacklevel=3,
                    )
            return None
        return distances


def _kernel_sources(block, eps, source_rows):
    """A block's float64 values and logarithms as tensors, padded with empty
    rows to `source_rows` (None: not padded)."""
    num_rows = block.shape[0]
    if source_rows is None or num_rows >= source_rows:
        values = np.asarray(block, dtype=np.float64)
    else:
        values = np.zeros((source_rows,) + tuple(block.shape[1:]))
        values[:num_rows] = block
    logs = values + eps
    np.log(logs, out=logs)
    # One NumPy copy less at a time: the values go first.
    values_tensor = tf.constant(values)
    del values
    return values_tensor, tf.constant(logs)


def _run_ranges(run, count, grain, threads):
    """Calls `run(start, stop)` over `[0, count)` cut into about `2 * threads`
    ranges of whole `grain`s, on a thread pool when there is more than one."""
    if count <= 0:
        return
    pieces = min(2 * threads, math.ceil(count / grain))
    if threads == 1 or pieces <= 1:
        run(0, count)
        return
    per = math.ceil(math.ceil(count / grain) / pieces) * grain
    bounds = [(start, min(start + per, count)) for start in range(0, count, per)]
    with ThreadPoolExecutor(max_workers=min(threads, len(bounds))) as pool:
        for future in [pool.submit(run, start, stop) for start, stop in bounds]:
            future.result()


__all__ = [
    "KERNEL_CHUNK_PAIRS",
    "KERNEL_MIN_PAIRS",
    "KERNEL_MIN_PAIRS_PER_ROW",
    "PairRescorer",
    "default_threads",
    "numpy_pairwise_sum",
]
