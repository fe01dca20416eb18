r"""Retrieval speed and memory, measured side by side in one run.

Prints:
  1. all-pairs distance throughput (pairs/s) of `nearest_sources` versus the
     straightforward NumPy per-pair loop and versus
     `scipy.spatial.distance.cdist` with a Python metric, as ratios;
  2. the fraction of this machine's matmul throughput the search reaches
     (a plain `tf.matmul` of the same shapes and dtype, timed in this run);
  3. descriptor extraction images/s for the Gabor and the conv bank;
  4. the search's working memory (peak RSS above the stored descriptors) at
     two source sizes 4x apart, each in a fresh process;
  5. the estimated time for 1.28M source x 10k target images here.

  python tools/bench_retrieval.py
"""

import json
import os
import resource
import statistics
import subprocess
import sys
import time

import common  # tools/common.py: environment, repository root on sys.path

from absl import app
from absl import flags

flags.DEFINE_integer("targets", 512, "Target descriptors in the throughput test.")
flags.DEFINE_integer("sources", 8192, "Source descriptors in the throughput test.")
flags.DEFINE_integer("channels", 96, "Channels per descriptor (conv bank of small_cnn: 32+64).")
flags.DEFINE_integer("bins", 32, "Bins per channel.")
flags.DEFINE_integer("k", 200, "Neighbours per target.")
flags.DEFINE_integer("block_size", 4096, "Source rows per search block.")
flags.DEFINE_enum("dtype", "float32", ["float32", "float64"], "Search precision.")
flags.DEFINE_integer("repeats", 3, "Timed repeats (median reported).")
flags.DEFINE_string("memory_child", None, "Internal: run one memory measurement in this process.")
FLAGS = flags.FLAGS


def _histograms(rng, n, channels, bins):
    return rng.dirichlet(np.ones(bins), size=(n, channels)).astype("float32")


def _median_time(fn, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _rss_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _current_rss_mib():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def main(argv):
    common.reject_arguments(argv)
    global np
    import numpy as np

    from keras_seltransfer.retrieval import similarity
    from keras_seltransfer.utils import divergence

    if FLAGS.memory_child:
        spec = json.loads(FLAGS.memory_child)
        rng = np.random.default_rng(0)
        target = _histograms(rng, spec["targets"], spec["channels"], spec["bins"])
        source = _histograms(rng, spec["sources"], spec["channels"], spec["bins"])
        similarity.nearest_sources(target[:4], source[:64], 2, dtype=spec["dtype"])
        before = _current_rss_mib()
        peak_before = _rss_mib()
        similarity.nearest_sources(
            target, source, spec["k"], block_size=spec["block_size"], dtype=spec["dtype"]
        )
        print(json.dumps({
            "rss_before_mib": before,
            "peak_mib": max(_rss_mib(), peak_before),
            "descriptors_mib": (target.nbytes + source.nbytes) / 2**20,
        }))
        return

    import scipy.spatial.distance
    import tensorflow as tf

    rng = np.random.default_rng(0)
    c, b = FLAGS.channels, FLAGS.bins
    target = _histograms(rng, FLAGS.targets, c, b)
    source = _histograms(rng, FLAGS.sources, c, b)
    weights = np.full(c, 1.0 / c)

    # 1. Throughput: the search versus the per-pair loop and cdist.
    search = lambda: similarity.nearest_sources(  # noqa: E731
        target, source, FLAGS.k, channel_weights=weights,
        block_size=FLAGS.block_size, dtype=FLAGS.dtype,
    )
    search()
    t_search = _median_time(search, FLAGS.repeats)
    search_rate = target.shape[0] * source.shape[0] / t_search

    nt, ns = 8, 64
    def loop():
        for i in range(nt):
            for j in range(ns):
                divergence.symmetric_kl(target[i], source[j], weights)
    t_loop = _median_time(loop, FLAGS.repeats)
    loop_rate = nt * ns / t_loop

    flat_t = target[:nt].reshape(nt, -1).astype(np.float64)
    flat_s = source[:ns].reshape(ns, -1).astype(np.float64)
    metric = lambda u, v: divergence.symmetric_kl(u.reshape(c, b), v.reshape(c, b), weights)  # noqa: E731
    t_cdist = _median_time(lambda: scipy.spatial.distance.cdist(flat_t, flat_s, metric), FLAGS.repeats)
    cdist_rate = nt * ns / t_cdist

    # 2. The machine's own matmul throughput for the search's two GEMMs.
    dtype = tf.float32 if FLAGS.dtype == "float32" else tf.float64
    a = tf.constant(rng.random((FLAGS.targets, c * b)), dtype)
    blocks = [
        tf.constant(rng.random((c * b, min(FLAGS.block_size, FLAGS.sources - i))), dtype)
        for i in range(0, FLAGS.sources, FLAGS.block_size)
    ]
    def matmuls():
        for block in blocks:
            tf.matmul(a, block).numpy()
            tf.matmul(a, block).numpy()
    matmuls()
    t_matmul = _median_time(matmuls, FLAGS.repeats)
    flops = 2 * 2 * FLAGS.targets * FLAGS.sources * c * b

    # 3. Descriptor extraction.
    from keras_seltransfer.models import small_cnn
    from keras_seltransfer.retrieval.conv_bank import ConvBank
    from keras_seltransfer.retrieval.gabor_bank import GaborBank
    from keras_seltransfer.utils import histograms

    images = tf.data.Dataset.from_tensor_slices(
        rng.uniform(0, 255, (1024, 64, 64, 1)).astype("float32")
    ).batch(128)
    extraction = {}
    for name, bank in (
        ("gabor", GaborBank()),
        ("conv", ConvBank(small_cnn((64, 64, 1)), layers=2)),
    ):
        edges = histograms.fit_bin_edges(bank, images.take(2), num_bins=b, progress=False)
        histograms.describe(bank, edges, images.take(1), progress=False)
        t = _median_time(lambda: histograms.describe(bank, edges, images, progress=False), 1)
        extraction[name] = (1024 / t, bank.num_channels)

    # 4. Working memory at two source sizes 4x apart, each in a fresh process.
    memory = []
    for sources in (FLAGS.sources, 4 * FLAGS.sources):
        spec = json.dumps({
            "targets": FLAGS.targets, "sources": sources, "channels": c, "bins": b,
            "k": FLAGS.k, "block_size": FLAGS.block_size, "dtype": FLAGS.dtype,
        })
        result = subprocess.run(
            [sys.executable, os.path.abspath(__file__), f"--memory_child={spec}"],
            capture_output=True, text=True, check=True, cwd=common.ROOT,
        )
        m = json.loads(result.stdout.strip().splitlines()[-1])
        memory.append((sources, m["peak_mib"] - m["rss_before_mib"], m["descriptors_mib"]))

    print(
        f"descriptors {c} channels x {b} bins, {FLAGS.targets} targets x {FLAGS.sources} "
        f"sources, k={FLAGS.k}, block {FLAGS.block_size}, {FLAGS.dtype}, "
        f"{os.cpu_count()} CPUs, TensorFlow {tf.__version__}"
    )
    print(f"nearest_sources:        {search_rate:12.0f} pairs/s  ({t_search:.2f} s)")
    print(f"NumPy per-pair loop:    {loop_rate:12.0f} pairs/s")
    print(f"scipy cdist (Python):   {cdist_rate:12.0f} pairs/s")
    print(f"matmul alone:           {flops / t_matmul / 1e9:12.1f} GFLOP/s; "
          f"search effective {flops / t_search / 1e9:.1f} GFLOP/s")
    for name, (rate, channels) in extraction.items():
        print(f"describe ({name}, {channels} channels): {rate:8.1f} images/s at 64x64")
    for sources, extra, desc in memory:
        print(f"working memory with {sources:>7} sources: {extra:8.1f} MiB above "
              f"{desc:.1f} MiB of descriptors")
    total_pairs = 1.28e6 * 1e4
    estimate_h = total_pairs / search_rate / 3600
    describe_h = 1.29e6 / extraction["conv"][0] / 3600
    print(f"estimate, 1.28M x 10k: search {estimate_h:.1f} h + conv-bank description "
          f"{describe_h:.1f} h on this machine")
    print(f"ratio search / NumPy loop: {search_rate / loop_rate:.0f}x")
    print(f"ratio search / cdist: {search_rate / cdist_rate:.0f}x")
    print(f"fraction of matmul throughput: {t_matmul / t_search:.2f}")


if __name__ == "__main__":
    app.run(main)
