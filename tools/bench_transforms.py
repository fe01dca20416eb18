r"""Model transforms: how long each takes on a keras.applications backbone.

Times `antialias` (filt_size 4), `adafilter` and `selective_filter_transfer`
(ratio 0.5, "mean" statistic, --num_images random images in batches of
--batch_size) on --backbone (random weights, no top, --image_size), each
from the same freshly built backbone, in a fresh Python process per
checkout (--checkouts), so that each checkout's own code runs: for example
`--checkouts=../before,.` for before and after a change (`../before`: a checkout of the earlier commit, e.g. `git worktree add ../before <commit>`). It prints one
line per checkout and transform with the seconds, then a table. --precision
builds the backbones in a Keras dtype policy (the transforms rebuild their
layers in it); --output writes the figures as JSON.

  python tools/bench_transforms.py --checkouts=../before,.
  python tools/bench_transforms.py --backbone=MobileNetV3Small --transforms=antialias
"""

import json
import os
import subprocess
import sys
import time

import common  # tools/common.py: environment, repository root on sys.path

from absl import app
from absl import flags

TRANSFORMS = ("antialias", "adafilter", "selective_filter_transfer")

flags.DEFINE_string("backbone", "DenseNet121", "A keras.applications constructor name.")
flags.DEFINE_integer("image_size", 64, "Input size.", lower_bound=32)
flags.DEFINE_integer("num_images", 8, "Images for selective_filter_transfer.", lower_bound=1)
flags.DEFINE_integer("batch_size", 8, "Batch size of those images.", lower_bound=1)
flags.DEFINE_list("transforms", list(TRANSFORMS), f"Which of {TRANSFORMS} to time.")
flags.DEFINE_list("checkouts", ["."], "Checkouts whose transforms are timed, in turn.")
flags.DEFINE_string("worker", None, "(internal) time the transforms of this process and exit.")
common.define_benchmark_flags()
flags.adopt_module_key_flags(common)  # --help lists them
FLAGS = flags.FLAGS


def time_transforms(backbone, image_size, num_images, batch_size, transforms):
    """Seconds each transform takes on a fresh `backbone` (error text when it fails)."""
    import keras
    import numpy as np
    import tensorflow as tf

    from keras_seltransfer import models

    images = np.random.default_rng(0).uniform(0, 255, (num_images, image_size, image_size, 3))
    data = tf.data.Dataset.from_tensor_slices(images.astype("float32")).batch(batch_size)
    calls = {
        "antialias": lambda model: models.antialias(model, filt_size=4),
        "adafilter": lambda model: models.adafilter(model, seed=0),
        "selective_filter_transfer": lambda model: models.selective_filter_transfer(
            model, data, ratio=0.5, seed=0
        ),
    }
    results = {}
    for transform in transforms:
        model = getattr(keras.applications, backbone)(
            input_shape=(image_size, image_size, 3), weights=None, include_top=False
        )
        start = time.perf_counter()
        try:
            calls[transform](model)
            results[transform] = round(time.perf_counter() - start, 1)
        except Exception as e:  # noqa: BLE001 - the figure is the error
            results[transform] = f"{type(e).__name__}: {str(e)[:200]}"
        keras.backend.clear_session()
    return results


def _run_checkout(checkout, argv):
    """Runs this tool as a worker timing `checkout`'s package."""
    command = [sys.executable, os.path.abspath(__file__), f"--worker={checkout}"] + argv
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode or not lines:
        common.fail(f"the worker for {checkout} failed:\n{done.stderr[-2000:]}")
    return json.loads(lines[-1])


def main(argv):
    common.reject_arguments(argv)
    unknown = sorted(set(FLAGS.transforms) - set(TRANSFORMS))
    if unknown:
        common.fail(f"--transforms must be among {TRANSFORMS}. Received: {unknown}")
    if FLAGS.worker is not None:
        # `common` put this checkout first on the path; the worker times
        # the other checkout's package.
        sys.path.insert(0, os.path.abspath(FLAGS.worker))
        import keras_seltransfer
        from keras_seltransfer.training.loop import dtype_policy

        with dtype_policy(FLAGS.precision):
            results = time_transforms(
                FLAGS.backbone, FLAGS.image_size, FLAGS.num_images, FLAGS.batch_size,
                FLAGS.transforms,
            )
        print(json.dumps({"package": os.path.dirname(keras_seltransfer.__file__), **results}))
        return
    # The workers import the timed checkouts' packages; this process may
    # import its own.
    backbone = common.application_backbone(FLAGS.backbone)
    common.check_precision(FLAGS.precision)
    device = common.describe_device()
    print(device)
    argv = [
        f"--backbone={backbone}",
        f"--image_size={FLAGS.image_size}",
        f"--num_images={FLAGS.num_images}",
        f"--batch_size={FLAGS.batch_size}",
        f"--transforms={','.join(FLAGS.transforms)}",
        f"--precision={FLAGS.precision}",
    ]
    rows = {}
    for checkout in FLAGS.checkouts:
        rows[checkout] = _run_checkout(checkout, argv)
        print(json.dumps({"checkout": checkout, **rows[checkout]}), flush=True)
    print(f"\n{backbone} at {FLAGS.image_size}x{FLAGS.image_size}, {FLAGS.precision}, seconds")
    print("| checkout | " + " | ".join(FLAGS.transforms) + " |")
    print("|---" * (len(FLAGS.transforms) + 1) + "|")
    for checkout, row in rows.items():
        print(f"| {checkout} | " + " | ".join(str(row[t]) for t in FLAGS.transforms) + " |")
    if FLAGS.output:
        results = common.benchmark_results(backbone, FLAGS.image_size, FLAGS.precision, device)
        results.update(num_images=FLAGS.num_images, batch_size=FLAGS.batch_size, checkouts=rows)
        for checkout, row in rows.items():
            for transform in FLAGS.transforms:
                seconds = row[transform]
                results["headline"].append(common.goal(
                    f"{transform} seconds ({checkout})"
                    + ("" if isinstance(seconds, float) else f", failed: {seconds}"),
                    seconds if isinstance(seconds, float) else None,
                ))
        common.write_results(FLAGS.output, results)


if __name__ == "__main__":
    app.run(main)
