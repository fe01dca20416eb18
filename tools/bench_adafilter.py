r"""AdaFilter training and inference cost versus plain fine-tuning.

Builds, in one process and from the same pretrained backbone with the same
classification head and BatchNorm mode,
  (a) plain fine-tuning: the classifier itself, and
  (b) AdaFilter: `keras_seltransfer.models.gating(classifier)` (every conv
      gated, the shared recurrent gate),
and times, alternating the two over several rounds after a warm-up, a
compiled training step (`train_on_batch`, Adam, sparse cross-entropy) and an
inference step (`predict_on_batch`) on the same batch of images. It prints
the median step times per kind, the AdaFilter / plain ratios (the median of
the per-round ratios, the ratio of the medians and that of the fastest
rounds; training goal <= 2.2: every gated convolution computes two sets of
filters, so the convolutions alone cost about 2x) and the parameter counts.

Default backbone: the Fashion-MNIST-pretrained small_cnn of the pretrain app
at 64x64 (an untrained small_cnn of the same shape when that file is
missing); --backbone=MobileNetV2 (or any keras.applications name) builds that
architecture with random weights at --image_size. --precision builds and
times both models in a Keras dtype policy (a saved backbone is cast to it);
--output writes the figures as JSON.

  python tools/bench_adafilter.py
  python tools/bench_adafilter.py --backbone=MobileNetV2 --image_size=96
  python tools/bench_adafilter.py --precision=mixed_float16 --output=runs/bench/adafilter.json
"""

import os
import statistics
import time

import common  # tools/common.py: environment, repository root on sys.path

common.repeatable_cpu_arithmetic()

from absl import app  # noqa: E402
from absl import flags  # noqa: E402

flags.DEFINE_string(
    "backbone",
    os.path.join("runs", "pretrain", "fashion_mnist-small_cnn-64", "model.keras"),
    "A .keras backbone, a built-in name or a keras.applications name.",
)
flags.DEFINE_integer("image_size", 64, "Input size.", lower_bound=8)
flags.DEFINE_integer("batch_size", 32, "Batch size of both kinds.", lower_bound=1)
flags.DEFINE_integer("rounds", 11, "Timed rounds per kind (alternating).", lower_bound=1)
flags.DEFINE_integer("steps", 10, "Steps per timed round.", lower_bound=1)
flags.DEFINE_enum("batchnorm", "frozen", ["frozen", "train"], "BatchNorm mode of both models.")
flags.DEFINE_enum("estimator", "ste", ["ste", "gumbel"], "AdaFilter gate estimator.")
common.define_benchmark_flags()
flags.adopt_module_key_flags(common)  # --help lists them
FLAGS = flags.FLAGS


def _count(weights):
    return int(sum(int(w.numpy().size) for w in weights))


def main(argv):
    common.reject_arguments(argv)
    with common.precision_scope(FLAGS.precision):
        _bench()


def _bench():
    import keras
    import numpy as np
    import tensorflow as tf

    from keras_seltransfer import models
    from keras_seltransfer.models.gating import adafilter
    from keras_seltransfer.models.gating import gated_layers

    device = common.describe_device()
    print(device)
    keras.utils.set_random_seed(0)
    size, batch = FLAGS.image_size, FLAGS.batch_size
    spec = FLAGS.backbone
    if models.is_backbone_path(spec) and not os.path.isfile(spec):
        print(f"{spec} not found: using an untrained small_cnn (python -m apps.pretrain makes it)")
        spec = "small_cnn"
    channels = 1 if models.is_backbone_path(spec) or models.is_builtin_backbone(spec) else 3
    saved = models.is_backbone_path(spec)
    backbone = common.load_backbone(spec, (size, size, None if saved else channels), FLAGS.precision)
    channels = int(backbone.inputs[0].shape[-1])
    plain = models.build_classifier(backbone, 2)
    models.set_batchnorm_mode(plain, FLAGS.batchnorm)
    start = time.perf_counter()
    gated = adafilter(plain, estimator=FLAGS.estimator)
    build_seconds = time.perf_counter() - start
    for model in (plain, gated):
        model.compile(keras.optimizers.Adam(1e-4), "sparse_categorical_crossentropy")

    rng = np.random.default_rng(0)
    images = tf.constant(rng.uniform(0, 255, (batch, size, size, channels)).astype("float32"))
    labels = tf.constant(rng.integers(0, 2, batch))
    kinds = {"plain": plain, "adafilter": gated}

    def train(model):
        for _ in range(FLAGS.steps):
            model.train_on_batch(images, labels)

    def infer(model):
        for _ in range(FLAGS.steps):
            model.predict_on_batch(images)

    for model in kinds.values():  # warm-up: traces the steps
        train(model)
        infer(model)
    seconds = {(task, kind): [] for task in ("train", "infer") for kind in kinds}
    for r in range(FLAGS.rounds):
        order = list(kinds) if r % 2 == 0 else list(kinds)[::-1]
        for task, run in (("train", train), ("infer", infer)):
            for kind in order:
                start = time.perf_counter()
                run(kinds[kind])
                seconds[(task, kind)].append((time.perf_counter() - start) / FLAGS.steps)

    print(
        f"{backbone.name} ({spec}) at {size}x{size}x{channels}, batch {batch}, BatchNorm "
        f"{FLAGS.batchnorm}, {len(gated_layers(gated))} gated convolutions, estimator "
        f"{FLAGS.estimator}, {FLAGS.rounds} rounds x {FLAGS.steps} steps, precision "
        f"{FLAGS.precision}, Keras {keras.__version__}"
    )
    results = common.benchmark_results(spec, size, FLAGS.precision, device)
    results.update(
        batch_size=batch, batchnorm=FLAGS.batchnorm, estimator=FLAGS.estimator,
        gated_convolutions=len(gated_layers(gated)), transformation_seconds=build_seconds,
        step_seconds={f"{task}_{kind}": values for (task, kind), values in seconds.items()},
    )
    print(f"adafilter() transformation: {build_seconds:.1f} s")
    for (task, kind), values in seconds.items():
        shown = ", ".join(f"{1000 * v:.1f}" for v in values)
        print(
            f"{task:>5} {kind:>9}: median {1000 * statistics.median(values):7.1f} ms/step "
            f"(rounds: {shown})"
        )
    for task, goal in (("train", 2.2), ("infer", None)):
        ada, plain = seconds[(task, "adafilter")], seconds[(task, "plain")]
        # Each round times the two kinds back to back, so the ratio within
        # a round is the steadier figure when other work shares the CPUs.
        paired = statistics.median(a / p for a, p in zip(ada, plain))
        medians = statistics.median(ada) / statistics.median(plain)
        print(
            f"{task} step time adafilter / plain: median of per-round ratios {paired:.2f}, "
            f"ratio of medians {medians:.2f}, fastest rounds {min(ada) / min(plain):.2f}"
            + (f"  (goal <= {goal})" if goal else "")
        )
        results[f"{task}_ratio"] = {
            "paired": paired, "medians": medians, "fastest": min(ada) / min(plain)
        }
        results["headline"].append(common.goal(
            f"{task} step time adafilter / plain (median of per-round ratios)", paired,
            at_most=goal,
        ))
    for kind, model in kinds.items():
        print(
            f"parameters {kind:>9}: {_count(model.trainable_weights):,} trainable / "
            f"{_count(model.weights):,} total"
        )
        results[f"parameters_{kind}"] = {
            "trainable": _count(model.trainable_weights), "total": _count(model.weights)
        }
    if FLAGS.output:
        common.write_results(FLAGS.output, results)


if __name__ == "__main__":
    app.run(main)
