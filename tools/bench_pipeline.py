r"""Training throughput: the real input pipeline versus in-memory tensors.

Trains the same model, side by side in one process, on
  (a) the real pipeline: ELPV PNG files decoded, resized and cached by
      `make_dataset`, shuffled, augmented, batched and prefetched, and
  (b) one pre-built batch of in-memory tensors repeated, which costs the
      input side nothing (the model's compute-only ceiling),
alternating the two over several rounds after a warm-up that fills the
pipeline's cache. The last line prints the ratio of (a) to (b); the pipeline
is not the bottleneck when it is at least 0.9.

  python tools/bench_pipeline.py --image_size=64 --batch_size=32
"""

import os
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
FLAGS = flags.FLAGS


def main(argv):
    common.reject_arguments(argv)
    import keras
    import tensorflow as tf

    from keras_seltransfer import data as data_lib
    from keras_seltransfer import models
    from keras_seltransfer import training

    keras.utils.set_random_seed(0)
    train, _ = training.load_train_test(FLAGS.data)
    channels = train.channels if models.is_builtin_backbone(FLAGS.backbone) else 3
    size = FLAGS.image_size
    model = models.build_classifier(
        models.load_backbone(FLAGS.backbone, (size, size, channels)), train.num_classes
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
        f"{len(train)} {FLAGS.data} training images, {os.cpu_count()} CPUs, "
        f"TensorFlow {tf.__version__}"
    )
    print(f"first pass (decode + resize + cache fill): {len(train) / cold:8.1f} images/s")
    for kind, values in rates.items():
        shown = ", ".join(f"{v:.1f}" for v in values)
        print(f"{kind:>10}: median {statistics.median(values):8.1f} images/s  (rounds: {shown})")
    ratio = statistics.median(rates["pipeline"]) / statistics.median(rates["in_memory"])
    print(f"ratio pipeline / in-memory: {ratio:.3f}")


if __name__ == "__main__":
    app.run(main)
