r"""Training throughput: the real input pipeline versus in-memory tensors.

Trains the same model, side by side in one process, on
  (a) the real pipeline: ELPV PNG files decoded, resized and cached by
      `make_dataset`, shuffled, augmented, batched and prefetched, and
  (b) one pre-built batch of in-memory tensors repeated, which costs the
      input side nothing (the model's compute-only ceiling),
alternating the two over several rounds after a warm-up that fills the
pipeline's cache. The last line prints the ratio of (a) to (b); the pipeline
is not the bottleneck when it is at least 0.9. --precision builds and trains
the model in a Keras dtype policy; --output writes the figures as JSON.

  python tools/bench_pipeline.py --image_size=64 --batch_size=32
"""

import statistics
import time

import common  # tools/common.py: environment, repository root on sys.path

from absl import app
from absl import flags

flags.DEFINE_string("data", "elpv", "Data set spec (see apps.finetune --target).")
flags.DEFINE_integer("image_size", 64, "Input size.", lower_bound=8)
flags.DEFINE_integer("batch_size", 32, "Batch size.", lower_bound=1)
flags.DEFINE_integer("steps", 100, "Training steps per timed round.", lower_bound=1)
flags.DEFINE_integer("rounds", 5, "Timed rounds per input kind (alternating).", lower_bound=1)
flags.DEFINE_string("backbone", "small_cnn", "Backbone name (built-in or keras.applications).")
common.define_benchmark_flags()
flags.adopt_module_key_flags(common)  # --help lists them
FLAGS = flags.FLAGS


def main(argv):
    common.reject_arguments(argv)
    with common.precision_scope(FLAGS.precision):
        _bench()


def _bench():
    import keras
    import tensorflow as tf

    from keras_seltransfer import data as data_lib
    from keras_seltransfer import models
    from keras_seltransfer import training

    device = common.describe_device()
    print(device)
    keras.utils.set_random_seed(0)
    train, _ = training.load_train_test(FLAGS.data)
    channels = train.channels if models.is_builtin_backbone(FLAGS.backbone) else 3
    size = FLAGS.image_size
    model = models.build_classifier(
        common.load_backbone(FLAGS.backbone, (size, size, channels), FLAGS.precision),
        train.num_classes,
    )
    model.compile(keras.optimizers.Adam(1e-3), "sparse_categorical_crossentropy")

    pipeline = data_lib.make_dataset(
        train, size, FLAGS.batch_size, training=True, channels=channels,
        augment="flip", seed=0, repeat=True,
    )
    batch = next(iter(data_lib.make_dataset(train, size, FLAGS.batch_size, channels=channels)))
    in_memory = tf.data.Dataset.from_tensors(batch).repeat()

    epoch_steps = data_lib.steps_per_epoch(len(train), FLAGS.batch_size)
    start = time.perf_counter()
    model.fit(pipeline, epochs=1, steps_per_epoch=epoch_steps, shuffle=False, verbose=0)
    cold = time.perf_counter() - start
    model.fit(in_memory, epochs=1, steps_per_epoch=10, shuffle=False, verbose=0)

    def timed(dataset):
        start = time.perf_counter()
        model.fit(dataset, epochs=1, steps_per_epoch=FLAGS.steps, shuffle=False, verbose=0)
        return FLAGS.steps * FLAGS.batch_size / (time.perf_counter() - start)

    rates = {"pipeline": [], "in_memory": []}
    for r in range(FLAGS.rounds):
        order = ("pipeline", "in_memory") if r % 2 == 0 else ("in_memory", "pipeline")
        for kind in order:
            rates[kind].append(timed(pipeline if kind == "pipeline" else in_memory))

    print(
        f"{FLAGS.backbone} at {size}x{size}x{channels}, batch {FLAGS.batch_size}, "
        f"{len(train)} {FLAGS.data} training images, precision {FLAGS.precision}"
    )
    print(f"first pass (decode + resize + cache fill): {len(train) / cold:8.1f} images/s")
    for kind, values in rates.items():
        shown = ", ".join(f"{v:.1f}" for v in values)
        print(f"{kind:>10}: median {statistics.median(values):8.1f} images/s  (rounds: {shown})")
    ratio = statistics.median(rates["pipeline"]) / statistics.median(rates["in_memory"])
    print(f"ratio pipeline / in-memory: {ratio:.3f}  (goal >= 0.9)")
    if FLAGS.output:
        results = common.benchmark_results(FLAGS.backbone, size, FLAGS.precision, device)
        results.update(
            data=FLAGS.data, batch_size=FLAGS.batch_size, steps=FLAGS.steps,
            training_images=len(train), first_pass_images_per_s=len(train) / cold,
            images_per_s=rates,
        )
        results["headline"].append(
            common.goal("training images/s, pipeline / in-memory (medians)", ratio, at_least=0.9)
        )
        common.write_results(FLAGS.output, results)


if __name__ == "__main__":
    app.run(main)
