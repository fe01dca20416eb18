r"""Filter relevance: one forward pass for every conv layer against one model per layer.

Part 1, the relevance step. On a `keras.applications` backbone (--backbone,
random weights, --image_size) and --num_images random images in batches of
--batch_size, it times, side by side in one process:

- "per_layer": the reference this module builds itself, one
  `keras.Model` per scored conv layer (input to that layer's response
  point), each run over the data to sum its filters' responses: the
  algorithm whose cost grows with the number of layers;
- "one_pass": `keras_seltransfer.models.filter_statistics`, one model
  reading every response point, run once per batch;
- "checkout" (with --checkout): the same call with the `relevance` module
  of another checkout (for example main's), loaded from its file.

Every variant starts from fresh objects, so each pays its own traces. It
prints the seconds of each, the ratio per_layer / one_pass and the largest
difference between their per-filter means (they compute the same sums).

Part 2 (--sft), `selective_filter_transfer(ratio=0.5)` end to end, timed
in a fresh Python process per checkout (--sft_checkouts, default this one),
so that a checkout's own code runs (for example `--sft_checkouts=../before,.`
for before and after).

--precision builds the backbone (in both parts) in a Keras dtype policy;
--output writes the figures as JSON.

  python tools/bench_relevance.py --num_images=8,64
  python tools/bench_relevance.py --checkout=../before --sft --sft_checkouts=../before,.
"""

import importlib.util
import json
import math
import os
import subprocess
import sys
import time

import common  # tools/common.py: environment, repository root on sys.path

from absl import app
from absl import flags

flags.DEFINE_string("backbone", "DenseNet121", "A keras.applications constructor name.")
flags.DEFINE_integer("image_size", 64, "Input size.", lower_bound=32)
flags.DEFINE_list("num_images", ["8", "64"], "Data set sizes to time.")
flags.DEFINE_integer("batch_size", 32, "Batch size.", lower_bound=1)
flags.DEFINE_string("statistic", "mean", "Relevance statistic of the one-pass variants.")
flags.DEFINE_boolean("skip_per_layer", False, "Skip the per-layer reference (slow).")
flags.DEFINE_string("checkout", None, "Another checkout whose relevance module is also timed.")
flags.DEFINE_boolean("sft", False, "Also time selective_filter_transfer end to end.")
flags.DEFINE_list("sft_checkouts", ["."], "Checkouts whose selective_filter_transfer is timed.")
common.define_benchmark_flags()
flags.adopt_module_key_flags(common)  # --help lists them

FLAGS = flags.FLAGS

# Run in a fresh process with a checkout's directory first on sys.path.
_SFT_SNIPPET = """
import json, sys, time
import numpy as np, tensorflow as tf, keras
import keras_seltransfer
from keras_seltransfer.models import selective_filter_transfer
from keras_seltransfer.training.loop import dtype_policy
with dtype_policy({precision!r}):
    backbone = getattr(keras.applications, {backbone!r})(
        weights=None, include_top=False, input_shape=({size}, {size}, 3))
images = np.random.default_rng(0).uniform(0, 255, ({n}, {size}, {size}, 3)).astype("float32")
data = tf.data.Dataset.from_tensor_slices(images).batch({batch})
start = time.perf_counter()
selective_filter_transfer(backbone, data, ratio=0.5, seed=0)
print(json.dumps({{"seconds": time.perf_counter() - start,
                   "package": keras_seltransfer.__file__}}))
"""


def _backbone():
    import keras

    build = getattr(keras.applications, FLAGS.backbone)
    size = FLAGS.image_size
    return build(weights=None, include_top=False, input_shape=(size, size, 3))


def _data(num_images):
    import numpy as np
    import tensorflow as tf

    rng = np.random.default_rng(0)
    size = FLAGS.image_size
    images = rng.uniform(0, 255, (num_images, size, size, 3)).astype("float32")
    return tf.data.Dataset.from_tensor_slices(images).batch(FLAGS.batch_size)


def per_layer_means(model, data):
    """Per-filter mean responses computed with one model per conv layer.

    The reference the one-pass statistics replace: for every scored conv
    layer a `keras.Model` from the input to its response point, run over
    every batch (eagerly when the data set has at most `EAGER_BATCHES`
    batches, as the one-pass code does, else through a `tf.function` per
    layer), summing the responses per filter.

    Returns:
        `{conv_name: np.float64 array [filters]}`.
    """
    import keras
    import numpy as np
    import tensorflow as tf

    from keras_seltransfer.models.relevance import EAGER_BATCHES
    from keras_seltransfer.models.response_points import response_tensors

    inputs, tensors = response_tensors(model, channels_last=True)
    batches = int(data.cardinality())
    result = {}
    for name, tensor in tensors.items():
        reader = keras.Model(inputs[0], tensor)

        def sums(x, reader=reader):
            r = tf.cast(reader(tf.cast(x, tf.float32), training=False), tf.float32)
            return tf.reduce_sum(r, axis=[0, 1, 2]), tf.cast(tf.reduce_prod(tf.shape(r)[:3]), tf.float32)

        if not 0 <= batches <= EAGER_BATCHES:
            sums = tf.function(sums)
        total, count = 0.0, 0.0
        for x in data:
            s, c = sums(x)
            total, count = total + np.asarray(s, np.float64), count + float(c)
        result[name] = total / count
    return result


def _load_relevance(checkout):
    path = os.path.join(checkout, "keras_seltransfer", "models", "relevance.py")
    spec = importlib.util.spec_from_file_location("checkout_relevance", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _timed(function, *args, **kwargs):
    start = time.perf_counter()
    result = function(*args, **kwargs)
    return time.perf_counter() - start, result


def bench_relevance():
    import numpy as np

    from keras_seltransfer import relevance

    other = _load_relevance(FLAGS.checkout) if FLAGS.checkout else None
    model = _backbone()
    layers = len(relevance.conv_layer_names(model))
    print(f"{FLAGS.backbone} {FLAGS.image_size}x{FLAGS.image_size}, {layers} conv layers, "
          f"batch size {FLAGS.batch_size}, statistic {FLAGS.statistic!r}")
    print(f"{'images':>6} {'per_layer s':>12} {'one_pass s':>11} {'checkout s':>11} "
          f"{'ratio':>6} {'max |diff|':>11}")
    rows = []
    for num_images in (int(n) for n in FLAGS.num_images):
        data = _data(num_images)
        seconds, values = _timed(relevance.filter_statistics, model, data, FLAGS.statistic)
        row = {"one_pass": seconds}
        if other is not None:
            row["checkout"] = _timed(other.filter_statistics, model, data, FLAGS.statistic)[0]
        difference = float("nan")
        if not FLAGS.skip_per_layer:
            row["per_layer"], reference = _timed(per_layer_means, model, data)
            if FLAGS.statistic == "mean":
                difference = max(
                    float(np.max(np.abs(values[name] - reference[name]))) for name in values
                )
        ratio = row.get("per_layer", float("nan")) / row["one_pass"]
        print(f"{num_images:>6} {row.get('per_layer', float('nan')):>12.2f} "
              f"{row['one_pass']:>11.2f} {row.get('checkout', float('nan')):>11.2f} "
              f"{ratio:>6.1f} {difference:>11.2e}", flush=True)
        rows.append({
            "images": num_images,
            **{f"{kind}_seconds": value for kind, value in row.items()},
            "ratio_per_layer_one_pass": None if FLAGS.skip_per_layer else ratio,
            "max_abs_difference": None if math.isnan(difference) else difference,
        })
    return {"conv_layers": layers, "relevance": rows}


def bench_transfer():
    print(f"\nselective_filter_transfer(ratio=0.5), {FLAGS.backbone}, fresh process each")
    rows = []
    for checkout in FLAGS.sft_checkouts:
        for num_images in (int(n) for n in FLAGS.num_images):
            snippet = _SFT_SNIPPET.format(
                backbone=FLAGS.backbone,
                size=FLAGS.image_size,
                n=num_images,
                batch=FLAGS.batch_size,
                precision=FLAGS.precision,
            )
            directory = os.path.abspath(checkout)
            environment = dict(os.environ, PYTHONPATH=directory)
            done = subprocess.run(
                [sys.executable, "-c", snippet],
                cwd=directory,
                env=environment,
                capture_output=True,
                text=True,
            )
            if done.returncode:
                common.fail(f"{checkout}: selective_filter_transfer failed:\n{done.stderr[-2000:]}")
            result = json.loads(done.stdout.strip().splitlines()[-1])
            print(f"{checkout:>24} {num_images:>4} images: {result['seconds']:8.2f} s "
                  f"({os.path.dirname(os.path.dirname(result['package']))})", flush=True)
            rows.append({"checkout": checkout, "images": num_images, "seconds": result["seconds"]})
    return rows


def main(argv):
    common.reject_arguments(argv)
    FLAGS.backbone = common.application_backbone(FLAGS.backbone)
    device = common.describe_device()
    print(device)
    with common.errors_reported(), common.precision_scope(FLAGS.precision):
        results = common.benchmark_results(
            FLAGS.backbone, FLAGS.image_size, FLAGS.precision, device
        )
        results.update(bench_relevance(), batch_size=FLAGS.batch_size, statistic=FLAGS.statistic)
        if FLAGS.sft:
            results["selective_filter_transfer"] = bench_transfer()
    if FLAGS.output:
        largest = results["relevance"][-1]
        results["headline"].append(common.goal(
            f"relevance seconds, per_layer / one_pass ({largest['images']} images)",
            largest["ratio_per_layer_one_pass"],
        ))
        common.write_results(FLAGS.output, results)


if __name__ == "__main__":
    app.run(main)
