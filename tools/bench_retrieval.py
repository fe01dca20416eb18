r"""Retrieval speed, recall and memory: the exact and fast search modes side by side.

Prints, all measured in one run on one device (printed first):
  1. for every source size in --sources and each search mode (exact, fast):
     the search throughput (pairs/s), its matmul fraction (the time of a
     plain `tf.matmul` of the same shapes and dtype, the search's two GEMMs,
     timed in this run, divided by the search's time) and the extrapolated
     time of a 1.28M-source x 10k-target search (see `_extrapolate`);
  2. the recall of the fast mode's neighbours against the exact ones at
     k = 10, 50, 200 on random histograms and on a real filter-bank index:
     Fashion-MNIST sources and ELPV targets described by the conv bank of
     --backbone (or the Gabor bank) at --image_size, bin edges fitted on the
     targets, as a retrieval run fits them;
  3. the throughput of the NumPy per-pair loop and of scipy's `cdist` with a
     Python metric, as ratios to the exact search;
  4. descriptor extraction images/s for the Gabor and the conv bank;
  5. each mode's working memory (peak RSS above the stored descriptors) at
     two source sizes 4x apart, each in a fresh process.
--output writes everything as JSON (atomically). --precision builds the conv
bank's backbone (a named one) in a Keras dtype policy; the search itself is
float32/float64 TensorFlow arithmetic that no Keras policy reaches.

  python tools/bench_retrieval.py --sources=8192,32768 --output=/tmp/bench.json
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
flags.DEFINE_integer(
    "targets_large", 2048,
    "A second target count, timed at the smallest source size (0: skip): the "
    "matmul fraction with more targets per call.",
)
flags.DEFINE_list(
    "sources", ["8192", "32768"],
    "Source sizes of the throughput test (two or more for the extrapolation).",
)
flags.DEFINE_integer("channels", 96, "Channels per descriptor (conv bank of small_cnn: 32+64).")
flags.DEFINE_integer("bins", 32, "Bins per channel.")
flags.DEFINE_integer("k", 200, "Neighbours per target in the throughput test.")
flags.DEFINE_list("recall_k", ["10", "50", "200"], "k values of the recall measurement.")
flags.DEFINE_integer("margin", None, "Fast mode margin (default: nearest_sources').")
flags.DEFINE_integer("block_size", 4096, "Source rows per search block.")
flags.DEFINE_integer(
    "targets_full", 10000,
    "Targets of one fast search timed at the two smallest --sources, extrapolated in the "
    "source size only to 1.28M x 10k (0: skip).", lower_bound=0,
)
flags.DEFINE_integer(
    "scale_sources", 0,
    "Sources of one more fast search, timed once at that size rather than extrapolated, with "
    "the plain float32 tf.matmul of the same shapes (0: skip); the sources are generated in "
    "float32 chunks: 1280000 needs about 16 GiB.", lower_bound=0,
)
flags.DEFINE_integer("scale_targets", 10000, "Targets of the --scale_sources search.", lower_bound=1)
flags.DEFINE_enum(
    "fast_dtype", None, ["bfloat16", "float32"],
    "GEMM precision of the fast mode (default: nearest_sources' choice for this hardware, "
    "similarity.fast_gemm_dtype()).",
)
flags.DEFINE_enum(
    "exact_dtype", "float32", ["float32", "float64"],
    "GEMM precision of the exact mode (float32: its faster variant, the fair comparison).",
)
flags.DEFINE_integer("repeats", 3, "Timed repeats (median reported).")
flags.DEFINE_string(
    "backbone", "small_cnn",
    "Network whose first two conv layers make the conv bank (extraction and the real index): "
    "a .keras file (e.g. apps.pretrain's Fashion-MNIST model) or a built-in/applications name.",
)
flags.DEFINE_integer("image_size", 64, "Images are resized to this size for describing.")
flags.DEFINE_enum("real_bank", "conv", ["conv", "gabor"], "Filter bank of the real index.")
flags.DEFINE_integer("real_sources", 8192, "Fashion-MNIST source images of the real index (0: skip).")
flags.DEFINE_integer("real_targets", 256, "ELPV target images of the real index.")
flags.DEFINE_bool("memory", True, "Measure working memory (four fresh processes).")
common.define_benchmark_flags()
flags.adopt_module_key_flags(common)  # --help lists them
flags.DEFINE_string("memory_child", None, "Internal: run one memory measurement in this process.")
FLAGS = flags.FLAGS

MODES = ("exact", "fast")
# The search the extrapolation is for: ImageNet's training set against a
# large target set.
FULL_SOURCES, FULL_TARGETS = 1.28e6, 1e4


def _histograms(rng, n, channels, bins):
    return rng.dirichlet(np.ones(bins), size=(n, channels)).astype("float32")


def _median_time(fn, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _alternate(search, matmuls):
    """`(search seconds, matmul seconds)` of --repeats alternating timed runs
    after one untimed run of each (alternating, so that load on a shared
    machine hits both)."""
    search()
    matmuls()
    t_search, t_matmul = [], []
    for _ in range(FLAGS.repeats):
        t_search.append(_median_time(search, 1))
        t_matmul.append(_median_time(matmuls, 1))
    return t_search, t_matmul


def _rss_mib():
    """Peak resident memory of this process image, MiB.

    Linux's `VmHWM`, not `getrusage`'s `ru_maxrss`: the latter survives
    `execve`, so a child started by a large parent would report the parent's
    peak as its own.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _current_rss_mib():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _scale_point(similarity, weights, rng, channels, bins, size, targets):
    """One fast search of `targets` random targets against `size` random
    sources (generated in float32 chunks), and the plain float32 `tf.matmul`
    of the same shapes: `[targets, 2 * C * B]` against every block's
    `[rows, 2 * C * B]` (one random operand per block shape, reused). Each is
    timed once; the search's time includes compiling its kernels for this
    many targets (seconds, against minutes of search at scale)."""
    import collections

    import tensorflow as tf

    source = np.empty((size, channels, bins), np.float32)
    chunk = 1 << 14
    for start in range(0, size, chunk):
        source[start:start + chunk] = _histograms(rng, min(chunk, size - start), channels, bins)
    target = _histograms(rng, targets, channels, bins)
    # Compiles what does not depend on the target count on a small slice first.
    similarity.nearest_sources(
        target[:64], source[:2 * FLAGS.block_size], FLAGS.k, channel_weights=weights,
        block_size=FLAGS.block_size, **_mode_kwargs("fast"),
    )
    start = time.perf_counter()
    similarity.nearest_sources(
        target, source, FLAGS.k, channel_weights=weights, block_size=FLAGS.block_size,
        **_mode_kwargs("fast"),
    )
    seconds = time.perf_counter() - start
    del source
    rows = collections.Counter(
        min(FLAGS.block_size, size - i) for i in range(0, size, FLAGS.block_size)
    )
    a = tf.constant(rng.random((targets, 2 * channels * bins)), tf.float32)
    operands = {n: tf.constant(rng.random((n, 2 * channels * bins)), tf.float32) for n in rows}
    tf.matmul(a, operands[max(rows)], transpose_b=True).numpy()
    start = time.perf_counter()
    for n, count in rows.items():
        for _ in range(count):
            tf.matmul(a, operands[n], transpose_b=True).numpy()
    matmul_seconds = time.perf_counter() - start
    return {
        "sources": size,
        "targets": targets,
        "seconds": seconds,
        "float32_matmul_seconds": matmul_seconds,
        "float32_matmul_fraction": matmul_seconds / seconds,
        # Scaled by pairs, in both sizes (none when they are 1.28M and 10k).
        "scaled_seconds_1.28M_x_10k": seconds * (FULL_SOURCES / size) * (FULL_TARGETS / targets),
    }


def _mode_kwargs(mode):
    kwargs = {"mode": mode}
    if mode == "exact":
        kwargs["dtype"] = FLAGS.exact_dtype
    else:
        if FLAGS.margin is not None:
            kwargs["margin"] = FLAGS.margin
        if FLAGS.fast_dtype is not None:
            kwargs["dtype"] = FLAGS.fast_dtype
    return kwargs


def _bfloat16_product(a, b):
    import tensorflow as tf

    global _BF16_PRODUCT
    if _BF16_PRODUCT is None:
        _BF16_PRODUCT = tf.function(
            lambda x, y: tf.raw_ops.BatchMatMulV3(x=x, y=y, Tout=tf.float32, adj_y=True),
            jit_compile=True,
        )
    return _BF16_PRODUCT(a, b)


_BF16_PRODUCT = None


def _float_product(a, b):
    import tensorflow as tf

    return tf.matmul(a, b, transpose_b=True)


def _recall(expected, found):
    """Mean share of each target's exact neighbours the fast mode found."""
    return float(np.mean(
        [len(set(e.tolist()) & set(f.tolist())) / len(e) for e, f in zip(expected, found)]
    ))


def _extrapolate(points):
    """Seconds of FULL_TARGETS x FULL_SOURCES from `(targets, sources, seconds)`
    measured at one target count T: a least-squares line `t = a * S + b`
    over the source sizes (the per-source cost, GEMMs and top-k, and the
    per-call cost that does not grow with the source, the re-scoring), the
    10k targets searched as `FULL_TARGETS / T` calls of T targets each.

    Conservative: a single call with more targets shares each block's
    reading, checking and logarithms among all of them. A fit over two
    target counts that separates those costs proved unstable on a shared
    machine, so the bench reports this figure and the GEMM-only floor.
    """
    targets = points[0][0]
    sizes = np.array([p[1] for p in points], float)
    seconds = np.array([p[2] for p in points], float)
    a, b = np.polyfit(sizes, seconds, 1)
    return float(FULL_TARGETS / targets * (a * FULL_SOURCES + max(b, 0.0)))


def _describe_real(similarity):
    """Fashion-MNIST source and ELPV target descriptors of one bank."""
    import tensorflow as tf  # noqa: F401

    from keras_seltransfer import data as data_lib
    from keras_seltransfer.data.protocol import load_train_test
    from keras_seltransfer.retrieval import workflow
    from keras_seltransfer.utils import histograms

    config = workflow.IndexConfig(
        source="fashion_mnist", target="elpv", bank=FLAGS.real_bank,
        backbone=FLAGS.backbone if FLAGS.real_bank == "conv" else None,
        image_size=FLAGS.image_size, num_bins=FLAGS.bins, channels=1, progress=False,
    )
    bank, bank_channels = workflow.make_bank(config)
    channels = bank_channels or 1
    target, _ = load_train_test("elpv")
    source, _ = load_train_test("fashion_mnist")
    target = target.subset(np.arange(min(FLAGS.real_targets, len(target))))
    source = source.subset(np.arange(min(FLAGS.real_sources, len(source))))
    target_ds = data_lib.make_dataset(target, FLAGS.image_size, 64, channels=channels)
    source_ds = data_lib.make_dataset(
        source, FLAGS.image_size, 128, channels=channels, cache=False
    )
    edges = histograms.fit_bin_edges(bank, target_ds, num_bins=FLAGS.bins, progress=False)
    return (
        histograms.describe(bank, edges, target_ds, progress=False),
        histograms.describe(bank, edges, source_ds, progress=False),
        histograms.channel_weights(bank),
    )


def _recalls(similarity, target, source, weights):
    out = {}
    for k in (int(k) for k in FLAGS.recall_k):
        k = min(k, len(source))
        exact, _ = similarity.nearest_sources(
            target, source, k, weights, block_size=FLAGS.block_size, mode="exact"
        )
        fast, _ = similarity.nearest_sources(
            target, source, k, weights, block_size=FLAGS.block_size, **_mode_kwargs("fast")
        )
        out[str(k)] = _recall(exact, fast)
    return out


def main(argv):
    common.reject_arguments(argv)
    global np
    import numpy as np

    from keras_seltransfer.retrieval import similarity
    from keras_seltransfer.utils import divergence

    if FLAGS.memory_child:
        spec = json.loads(FLAGS.memory_child)
        FLAGS.exact_dtype = spec["exact_dtype"]
        rng = np.random.default_rng(0)
        target = _histograms(rng, spec["targets"], spec["channels"], spec["bins"])
        source = _histograms(rng, spec["sources"], spec["channels"], spec["bins"])
        kwargs = _mode_kwargs(spec["mode"])
        similarity.nearest_sources(target[:4], source[:64], 2, **kwargs)
        before = _current_rss_mib()
        peak_before = _rss_mib()
        similarity.nearest_sources(
            target, source, spec["k"], block_size=spec["block_size"], **kwargs
        )
        print(json.dumps({
            "rss_before_mib": before,
            "peak_mib": max(_rss_mib(), peak_before),
            "descriptors_mib": (target.nbytes + source.nbytes) / 2**20,
        }))
        return

    import scipy.spatial.distance
    import tensorflow as tf

    from keras_seltransfer.models import is_backbone_path

    common.check_precision(FLAGS.precision)
    if FLAGS.precision != "float32" and is_backbone_path(FLAGS.backbone):
        common.fail(
            f"--precision={FLAGS.precision} does not reach the saved backbone {FLAGS.backbone} "
            "(a .keras file keeps its own dtype policy): pass a named --backbone."
        )
    device = common.describe_device()
    print(device)
    rng = np.random.default_rng(0)
    c, b, t = FLAGS.channels, FLAGS.bins, FLAGS.targets
    sizes = sorted(int(s) for s in FLAGS.sources)
    weights = np.full(c, 1.0 / c)
    target = _histograms(rng, t, c, b)
    all_sources = _histograms(rng, sizes[-1], c, b)
    large_target = _histograms(rng, FLAGS.targets_large, c, b) if FLAGS.targets_large else None
    margin = FLAGS.margin if FLAGS.margin is not None else similarity.DEFAULT_MARGIN
    fast_dtype = FLAGS.fast_dtype or similarity.fast_gemm_dtype()
    print(f"fast mode GEMM: {fast_dtype}")
    results = {
        "device": device,
        "tensorflow": tf.__version__,
        "cpus": os.cpu_count(),
        "targets": t, "channels": c, "bins": b, "k": FLAGS.k, "margin": margin,
        "block_size": FLAGS.block_size, "exact_dtype": FLAGS.exact_dtype,
        "fast_dtype": fast_dtype,
        "throughput": {},
    }
    results.update(common.benchmark_results(
        FLAGS.backbone, FLAGS.image_size, FLAGS.precision, device
    ))

    # 1. Throughput and matmul fraction per size and mode. The matmul
    # reference: the search's two GEMMs per block, same shapes and dtype.
    points = [(target, size) for size in sizes]
    if large_target is not None:
        points.append((large_target, sizes[0]))
    for point_target, size in points:
        source = all_sources[:size]
        t = len(point_target)
        row = results["throughput"][f"{t}x{size}"] = {}
        for mode in MODES:
            if mode == "fast":
                dtype = tf.as_dtype(fast_dtype)
            else:
                dtype = tf.float32 if FLAGS.exact_dtype == "float32" else tf.float64
            if mode == "fast":
                # The fast mode's product: [values, logs] x [logs, values]^T,
                # bfloat16 operands summed in float32 as XLA compiles it.
                a = tf.constant(rng.random((t, 2 * c * b)), dtype)
                blocks = [
                    tf.constant(rng.random((min(FLAGS.block_size, size - i), 2 * c * b)), dtype)
                    for i in range(0, size, FLAGS.block_size)
                ]
                product = _bfloat16_product if fast_dtype == "bfloat16" else _float_product

                def matmuls():
                    for block in blocks:
                        product(a, block).numpy()
            else:
                a = tf.constant(rng.random((t, c * b)), dtype)
                blocks = [
                    tf.constant(rng.random((min(FLAGS.block_size, size - i), c * b)), dtype)
                    for i in range(0, size, FLAGS.block_size)
                ]

                def matmuls():
                    for block in blocks:
                        tf.matmul(a, block, transpose_b=True).numpy()
                        tf.matmul(a, block, transpose_b=True).numpy()

            def search():
                similarity.nearest_sources(
                    point_target, source, FLAGS.k, channel_weights=weights,
                    block_size=FLAGS.block_size, **_mode_kwargs(mode),
                )

            t_search, t_matmul = _alternate(search, matmuls)
            row[mode] = {
                "seconds": statistics.median(t_search),
                "seconds_fastest": min(t_search),
                "matmul_seconds": statistics.median(t_matmul),
                "pairs_per_s": t * size / statistics.median(t_search),
                "matmul_fraction": statistics.median(t_matmul) / statistics.median(t_search),
            }
    t = FLAGS.targets
    extrapolated = {}
    for mode in MODES:
        extrapolated[mode] = _extrapolate([
            (t, size, results["throughput"][f"{t}x{size}"][mode]["seconds"]) for size in sizes
        ]) if len(sizes) > 1 else None
    # The GEMMs alone (the plain matmul of the largest measured size), scaled
    # by pairs: no search in this mode can be faster here.
    largest = results["throughput"][f"{t}x{sizes[-1]}"]["fast"]
    matmul_floor = largest["matmul_seconds"] * FULL_TARGETS * FULL_SOURCES / (t * sizes[-1])
    results["extrapolated_seconds_1.28M_x_10k"] = extrapolated
    results["matmul_only_seconds_1.28M_x_10k"] = matmul_floor

    # 1b. The fast mode with all --targets_full targets in one call (as a
    # retrieval run searches them): only the source size is extrapolated.
    full = None
    if FLAGS.targets_full:
        full_target = _histograms(rng, FLAGS.targets_full, c, b)
        full_points, full_rows = [], {}
        product = _bfloat16_product if fast_dtype == "bfloat16" else _float_product
        a = tf.constant(rng.random((FLAGS.targets_full, 2 * c * b)), tf.as_dtype(fast_dtype))
        for size in sizes[:2]:
            source = all_sources[:size]
            blocks = [
                tf.constant(
                    rng.random((min(FLAGS.block_size, size - i), 2 * c * b)), tf.as_dtype(fast_dtype)
                )
                for i in range(0, size, FLAGS.block_size)
            ]

            def search():
                similarity.nearest_sources(
                    full_target, source, FLAGS.k, channel_weights=weights,
                    block_size=FLAGS.block_size, **_mode_kwargs("fast"),
                )

            def matmuls():
                for block in blocks:
                    product(a, block).numpy()

            t_search, t_matmul = _alternate(search, matmuls)
            # The plain float32 `tf.matmul` of the same shapes as well: the
            # reference of the throughput goal, whatever GEMM the search runs.
            a32 = tf.cast(a, tf.float32)
            blocks32 = [tf.cast(block, tf.float32) for block in blocks]

            def float32_matmuls():
                for block in blocks32:
                    tf.matmul(a32, block, transpose_b=True).numpy()

            float32_matmuls()
            t_float32 = [_median_time(float32_matmuls, 1) for _ in range(FLAGS.repeats)]
            full_rows[str(size)] = {
                "seconds": statistics.median(t_search),
                "matmul_seconds": statistics.median(t_matmul),
                "matmul_fraction": statistics.median(t_matmul) / statistics.median(t_search),
                "float32_matmul_seconds": statistics.median(t_float32),
                "float32_matmul_fraction": statistics.median(t_float32)
                / statistics.median(t_search),
            }
            full_points.append((FLAGS.targets_full, size, statistics.median(t_search)))
        full = {
            "targets": FLAGS.targets_full,
            "throughput": full_rows,
            "extrapolated_seconds_1.28M_x_10k": _extrapolate(full_points),
        }
        results["fast_full_targets"] = full

    # 1c. One fast search at a larger source size, measured.
    scale = None
    if FLAGS.scale_sources:
        scale = results["scale_point"] = _scale_point(
            similarity, weights, rng, c, b, FLAGS.scale_sources, FLAGS.scale_targets
        )

    # 2. Recall of the fast mode.
    results["recall_random"] = _recalls(similarity, target, all_sources[: sizes[0]], weights)
    if FLAGS.real_sources:
        start = time.perf_counter()
        with common.precision_scope(FLAGS.precision):
            real_target, real_source, real_weights = _describe_real(similarity)
        results["real_index"] = {
            "bank": FLAGS.real_bank,
            "backbone": FLAGS.backbone if FLAGS.real_bank == "conv" else None,
            "image_size": FLAGS.image_size,
            "sources": len(real_source), "targets": len(real_target),
            "channels": int(real_source.shape[1]),
            "describe_seconds": time.perf_counter() - start,
            "recall": _recalls(similarity, real_target, real_source, real_weights),
        }

    # 3. The per-pair loop and cdist, against the exact search of the first size.
    nt, ns = 8, 64
    def loop():
        for i in range(nt):
            for j in range(ns):
                divergence.symmetric_kl(target[i], all_sources[j], weights)
    loop_rate = nt * ns / _median_time(loop, FLAGS.repeats)
    flat_t = target[:nt].reshape(nt, -1).astype(np.float64)
    flat_s = all_sources[:ns].reshape(ns, -1).astype(np.float64)
    metric = lambda u, v: divergence.symmetric_kl(u.reshape(c, b), v.reshape(c, b), weights)  # noqa: E731
    cdist_rate = nt * ns / _median_time(
        lambda: scipy.spatial.distance.cdist(flat_t, flat_s, metric), FLAGS.repeats
    )
    results["numpy_loop_pairs_per_s"] = loop_rate
    results["cdist_pairs_per_s"] = cdist_rate

    # 4. Descriptor extraction.
    from keras_seltransfer.models import backbones
    from keras_seltransfer.retrieval.conv_bank import ConvBank
    from keras_seltransfer.retrieval.gabor_bank import GaborBank
    from keras_seltransfer.utils import histograms

    image_size = FLAGS.image_size
    with common.precision_scope(FLAGS.precision):
        backbone = backbones.load_backbone(
            FLAGS.backbone,
            (image_size, image_size, 1 if backbones.is_builtin_backbone(FLAGS.backbone) else None),
        )
    in_channels = int(backbone.inputs[0].shape[-1])
    images = tf.data.Dataset.from_tensor_slices(
        rng.uniform(0, 255, (1024, image_size, image_size, in_channels)).astype("float32")
    ).batch(128)
    extraction = {}
    for name, bank in (("gabor", GaborBank()), ("conv", ConvBank(backbone, layers=2))):
        edges = histograms.fit_bin_edges(bank, images.take(2), num_bins=b, progress=False)
        histograms.describe(bank, edges, images.take(1), progress=False)
        seconds = _median_time(lambda: histograms.describe(bank, edges, images, progress=False), 1)
        extraction[name] = {"images_per_s": 1024 / seconds, "channels": bank.num_channels}
    results["describe"] = extraction

    # 5. Working memory at two source sizes 4x apart, each in a fresh process.
    results["memory"] = []
    if FLAGS.memory:
        for mode in MODES:
            for sources in (sizes[0], 4 * sizes[0]):
                spec = json.dumps({
                    "targets": t, "sources": sources, "channels": c, "bins": b, "k": FLAGS.k,
                    "block_size": FLAGS.block_size, "mode": mode,
                    "exact_dtype": FLAGS.exact_dtype,
                })
                result = subprocess.run(
                    [sys.executable, os.path.abspath(__file__), f"--memory_child={spec}"]
                    + ([f"--margin={FLAGS.margin}"] if FLAGS.margin is not None else []),
                    capture_output=True, text=True, check=True, cwd=common.ROOT,
                )
                m = json.loads(result.stdout.strip().splitlines()[-1])
                results["memory"].append({
                    "mode": mode, "sources": sources,
                    "working_mib": m["peak_mib"] - m["rss_before_mib"],
                    "descriptors_mib": m["descriptors_mib"],
                })

    print(
        f"descriptors {c} channels x {b} bins, {t} targets "
        f"(and {FLAGS.targets_large} at {sizes[0]} sources), k={FLAGS.k}, block "
        f"{FLAGS.block_size}; exact mode GEMM {FLAGS.exact_dtype}, fast mode {fast_dtype} "
        f"with margin {margin}"
    )
    print(f"{'targets':>8} {'sources':>8} {'mode':>5} {'seconds':>8} {'pairs/s':>12} "
          f"{'matmul s':>9} {'matmul fraction':>15}")
    for key, row in results["throughput"].items():
        targets, size = key.split("x")
        for mode in MODES:
            r = row[mode]
            print(f"{targets:>8} {size:>8} {mode:>5} {r['seconds']:8.2f} "
                  f"{r['pairs_per_s']:12.0f} {r['matmul_seconds']:9.2f} "
                  f"{r['matmul_fraction']:15.2f}")
    for mode in MODES:
        if extrapolated[mode] is not None:
            print(f"extrapolated 1.28M sources x 10k targets, {mode}: "
                  f"{extrapolated[mode] / 60:.1f} min ({extrapolated[mode] / 3600:.2f} h), "
                  f"as {FULL_TARGETS / t:.0f} searches of {t} targets")
    print(f"the fast mode's GEMMs alone at that scale ({fast_dtype}): {matmul_floor / 60:.1f} min")
    if full is not None:
        for size, r in full["throughput"].items():
            print(f"fast, {full['targets']} targets in one call x {size} sources: "
                  f"{r['seconds']:.2f} s, matmul fraction {r['matmul_fraction']:.2f} "
                  f"({fast_dtype} product), {r['float32_matmul_fraction']:.2f} (plain float32 "
                  "tf.matmul of the same shapes; goal >= 0.5)")
        seconds = full["extrapolated_seconds_1.28M_x_10k"]
        print(f"extrapolated 1.28M sources x 10k targets, fast, {full['targets']} targets per "
              f"search: {seconds / 60:.1f} min (goal <= 30 min)")
    if scale is not None:
        print(f"fast, {scale['targets']} targets in one call x {scale['sources']} sources "
              f"(timed once): {scale['seconds']:.1f} s, plain float32 tf.matmul of the same "
              f"shapes {scale['float32_matmul_seconds']:.1f} s, fraction "
              f"{scale['float32_matmul_fraction']:.2f} (goal >= 0.5); scaled by sources to "
              f"1.28M x 10k: {scale['scaled_seconds_1.28M_x_10k'] / 60:.1f} min")
    print("recall of the exact top-k by the fast mode, random histograms "
          f"({t} x {sizes[0]}): "
          + ", ".join(f"k={k}: {v:.4f}" for k, v in results["recall_random"].items()))
    if "real_index" in results:
        r = results["real_index"]
        print(f"recall, real index ({r['bank']} bank"
              + (f" of {r['backbone']}" if r["backbone"] else "")
              + f", {r['channels']} channels, Fashion-MNIST {r['sources']} sources -> ELPV "
              f"{r['targets']} targets at {r['image_size']} px): "
              + ", ".join(f"k={k}: {v:.4f}" for k, v in r["recall"].items()))
    exact_rate = results["throughput"][f"{t}x{sizes[0]}"]["exact"]["pairs_per_s"]
    print(f"NumPy per-pair loop: {loop_rate:.0f} pairs/s; scipy cdist (Python): "
          f"{cdist_rate:.0f} pairs/s; exact search at {sizes[0]} sources: "
          f"{exact_rate / loop_rate:.0f}x the loop, {exact_rate / cdist_rate:.0f}x cdist")
    for name, r in extraction.items():
        print(f"describe ({name}, {r['channels']} channels): {r['images_per_s']:8.1f} "
              f"images/s at {image_size}x{image_size}")
    for m in results["memory"]:
        print(f"working memory, {m['mode']}, {m['sources']:>7} sources: "
              f"{m['working_mib']:8.1f} MiB above {m['descriptors_mib']:.1f} MiB of descriptors")
    if FLAGS.output:
        recall = results.get("real_index", {}).get("recall") or results["recall_random"]
        largest_k = max(recall, key=int)
        largest = results["throughput"][f"{t}x{sizes[-1]}"]
        results["headline"] += [
            common.goal(
                f"fast-mode recall of the exact top-{largest_k}, "
                + ("real index" if "real_index" in results else "random histograms"),
                recall[largest_k], at_least=0.99,
            ),
            common.goal(
                f"search pairs/s, fast / exact ({t} x {sizes[-1]})",
                largest["fast"]["pairs_per_s"] / largest["exact"]["pairs_per_s"],
            ),
            common.goal("exact search pairs/s / NumPy per-pair loop", exact_rate / loop_rate),
        ]
        common.write_results(FLAGS.output, results)


if __name__ == "__main__":
    app.run(main)
