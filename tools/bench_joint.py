r"""Joint training step time versus target-only training at the same batch size.

Trains, side by side in one process and on the same backbone,
  (a) target-only fine-tuning: a classifier on the target training images
      through `make_dataset` (decoded once, cached, shuffled, flipped), and
  (b) selective joint fine-tuning: the two-head model on `make_joint_dataset`
      batches (half target images, half source images drawn from the
      neighbour lists, gathered and resized per batch, flipped),
both with the same global batch size, alternating the two over several
timed rounds after a warm-up. Each joint round is a whole joint epoch, so its
time includes drawing the epoch's plan and refilling the pipeline.

The last lines print the joint time per image relative to target-only, of
the fastest rounds and of the medians (goal <= 1.1: mixing in source images
costs nothing beyond the images themselves). On a machine shared with other
work the fastest rounds are the steadier figure.

Neighbour lists come from --index_dir's neighbours.npz when it exists (as
built by apps.build_index for this source and target), otherwise random
lists of --k_max source images per target (the cost does not depend on which
images are listed). --max_targets keeps the first training targets only (a
shorter joint epoch, for smoke runs). --precision builds and trains both
models in a Keras dtype policy; --output writes the figures as JSON.

  python tools/bench_joint.py --target=elpv --source=fashion_mnist --batch_size=32
"""

import os
import statistics
import time

import common  # tools/common.py: environment, repository root on sys.path

from absl import app
from absl import flags

flags.DEFINE_string("target", "elpv", "Target data set spec.")
flags.DEFINE_string("source", "fashion_mnist", "Source data set spec.")
flags.DEFINE_string("index_dir", os.path.join("runs", "index", "default"), "Neighbour index.")
flags.DEFINE_integer("k_max", 200, "Neighbours per target when no index is found.", lower_bound=1)
flags.DEFINE_integer("k0", 10, "Neighbours per target sampled from.", lower_bound=1)
flags.DEFINE_integer("image_size", 64, "Input size.", lower_bound=8)
flags.DEFINE_integer("batch_size", 32, "Global batch size of both kinds (even).", lower_bound=2)
flags.DEFINE_integer("rounds", 5, "Timed rounds per kind (alternating).", lower_bound=1)
flags.DEFINE_string("backbone", "small_cnn", "Backbone name (built-in or keras.applications).")
flags.DEFINE_integer(
    "max_targets", 0, "Use only the first this many target training images (0: all).", lower_bound=0
)
common.define_benchmark_flags()
flags.adopt_module_key_flags(common)  # --help lists them
FLAGS = flags.FLAGS


def main(argv):
    common.reject_arguments(argv)
    with common.precision_scope(FLAGS.precision):
        _bench()


def _bench():
    import keras
    import numpy as np

    from keras_seltransfer import data as data_lib
    from keras_seltransfer import models
    from keras_seltransfer import training

    device = common.describe_device()
    print(device)
    keras.utils.set_random_seed(0)
    target, _ = training.load_train_test(FLAGS.target)
    if FLAGS.max_targets:
        target = target.subset(np.arange(min(FLAGS.max_targets, len(target))))
    source, _ = training.load_train_test(FLAGS.source)
    path = os.path.join(FLAGS.index_dir, "neighbours.npz")
    if os.path.isfile(path):
        with np.load(path) as stored:
            rows = {int(t): i for i, t in enumerate(stored["target_ids"])}
            ids = stored["neighbour_ids"][[rows[i] for i in range(len(target))]]
        origin = f"index {FLAGS.index_dir}"
    else:
        rng = np.random.default_rng(0)
        ids = np.stack([rng.choice(len(source), FLAGS.k_max, replace=False) for _ in target.labels])
        origin = "random lists (no index found)"
    sampler = data_lib.JointSampler.from_neighbours(ids, source.labels, k0=FLAGS.k0)

    size, batch = FLAGS.image_size, FLAGS.batch_size
    channels = target.channels if models.is_builtin_backbone(FLAGS.backbone) else 3
    shape = (size, size, channels)
    single = models.build_classifier(
        common.load_backbone(FLAGS.backbone, shape, FLAGS.precision), target.num_classes
    )
    single.compile(keras.optimizers.Adam(1e-3), "sparse_categorical_crossentropy")
    joint = models.build_multitask_model(
        common.load_backbone(FLAGS.backbone, shape, FLAGS.precision),
        sampler.num_source_classes,
        target.num_classes,
    )
    joint.compile(keras.optimizers.Adam(1e-3), **models.joint_compile_args())

    steps = data_lib.joint_steps_per_epoch(len(target), batch)
    target_ds = data_lib.make_dataset(
        target, size, batch, training=True, channels=channels, seed=0, repeat=True
    )
    start = time.perf_counter()
    joint_ds = data_lib.make_joint_dataset(target, source, sampler, size, batch, channels=channels)
    setup = time.perf_counter() - start

    def fit_single():
        single.fit(target_ds, epochs=1, steps_per_epoch=steps, shuffle=False, verbose=0)

    def fit_joint():
        joint.fit(joint_ds, epochs=1, shuffle=False, verbose=0, callbacks=[sampler])

    fit_single()  # warm-up: fills the cache, traces the step
    fit_joint()
    seconds = {"target_only": [], "joint": []}
    for r in range(FLAGS.rounds):
        order = ("target_only", "joint") if r % 2 == 0 else ("joint", "target_only")
        for kind in order:
            start = time.perf_counter()
            (fit_single if kind == "target_only" else fit_joint)()
            seconds[kind].append(time.perf_counter() - start)

    images = steps * batch
    print(
        f"{FLAGS.backbone} at {size}x{size}x{channels}, global batch {batch} "
        f"(joint: {batch // 2} target + {batch // 2} source), {steps} steps per round, "
        f"{len(target)} {FLAGS.target} targets, {len(sampler.candidate_ids)} candidate "
        f"{FLAGS.source} source images from {origin}, precision {FLAGS.precision}"
    )
    print(f"joint pipeline set-up (decode and resize the targets once): {setup:.1f} s")
    for kind, values in seconds.items():
        shown = ", ".join(f"{images / v:.1f}" for v in values)
        print(
            f"{kind:>12}: median {images / statistics.median(values):8.1f} images/s "
            f"(rounds: {shown})"
        )
    best = min(seconds["joint"]) / min(seconds["target_only"])
    print(f"joint / target-only time per image, fastest rounds: {best:.3f}")
    ratio = statistics.median(seconds["joint"]) / statistics.median(seconds["target_only"])
    print(f"joint / target-only time per image, medians: {ratio:.3f}  (goal <= 1.1)")
    if FLAGS.output:
        results = common.benchmark_results(FLAGS.backbone, size, FLAGS.precision, device)
        results.update(
            target=FLAGS.target, source=FLAGS.source, targets=len(target), neighbours=origin,
            batch_size=batch, steps_per_round=steps, setup_seconds=setup,
            images_per_s={kind: [images / v for v in values] for kind, values in seconds.items()},
            ratio_fastest=best, ratio_medians=ratio,
        )
        results["headline"].append(
            common.goal("time per image, joint / target-only (medians)", ratio, at_most=1.1)
        )
        common.write_results(FLAGS.output, results)


if __name__ == "__main__":
    app.run(main)
