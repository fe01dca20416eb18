r"""KTFT in its paper's own setting: anti-alias a pretrained CNN, fine-tune it on
25 images per class of the *same* task, with the original network as teacher.

The KTFT paper (IEEE Access 2022) anti-aliases an ImageNet CNN, fine-tunes it
on 25 ImageNet images per class, and reports beating the original pretrained
CNN. Here the pretrained network is the pretrain app's Fashion-MNIST
classifier (--backbone, with its own 10-class head), and every row is scored
on the Fashion-MNIST test split (accuracy) and on --shift_images of its
images (Zhang's shift consistency, `evaluation.shift_consistency`):

  original                    the pretrained network, untouched
  antialiased, copied         `antialias` with the copied BatchNorm statistics
  antialiased, recal 250      ... re-estimated on the 250 training images
  antialiased, recal 2000     ... re-estimated on 2,000 other training images
  FT original                 the original fine-tuned with cross-entropy
  AA-FT copied / recal        the anti-aliased network fine-tuned with
                              cross-entropy, BatchNorm as copied / recalibrated
  KTFT copied / recal         the same with the pixel- and global-level losses
                              toward the original (`KnowledgeTransferModel`)
  KTFT recal + logit          ... and the teacher-to-student KL on the classes

Trained rows: 25 images per class drawn with the seed, 25 other images per
class for validation, Adam with cosine decay, batch 32, flips, BatchNorm
frozen (the statistics above), --epochs epochs keeping the epoch with the
lowest validation cross-entropy; learning rate per row from
--learning_rates by validation cross-entropy at the first seed. Results are
cached per cell in --results (atomically), so an interrupted run continues;
the Markdown table goes to --table.

  python tools/ktft_same_task.py
  python tools/ktft_same_task.py --seeds=0 --epochs=3 --results=/tmp/k.json --table=/tmp/k.md
"""

import json
import os
import time

import common  # tools/common.py: environment, repository root on sys.path

from absl import app
from absl import flags

flags.DEFINE_string(
    "backbone",
    os.path.join("runs", "pretrain", "fashion_mnist-small_cnn-64", "model.keras"),
    "The pretrained classifier (with its head) from apps.pretrain.",
)
flags.DEFINE_integer("per_class", 25, "Training images per class.", lower_bound=1)
flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds (training subset, initialisation, shuffling).")
flags.DEFINE_list("learning_rates", ["1e-4", "1e-5"], "Learning rates searched per row.")
flags.DEFINE_integer("epochs", 15, "Epochs per trained row.", lower_bound=1)
flags.DEFINE_integer("filt_size", 4, "BlurPool filter size.", lower_bound=1, upper_bound=7)
flags.DEFINE_integer("shift_images", 2000, "Test images used for shift consistency.", lower_bound=1)
flags.DEFINE_string(
    "results", os.path.join("docs", "results", "ktft_same_task.json"), "Cell cache (JSON)."
)
flags.DEFINE_string(
    "table", os.path.join("docs", "results", "ktft_same_task.md"), "Markdown table written at the end."
)
FLAGS = flags.FLAGS

# Row -> (trained, anti-aliased, recalibration, KTFT weights pixel/global/logit).
ROWS = {
    "original": (False, False, None, None),
    "antialiased, copied": (False, True, None, None),
    "antialiased, recal 250": (False, True, "train", None),
    "antialiased, recal 2000": (False, True, "other", None),
    "FT original": (True, False, None, None),
    "AA-FT copied": (True, True, None, None),
    "AA-FT recal": (True, True, "train", None),
    "KTFT copied": (True, True, None, (1.0, 1.0, 0.0)),
    "KTFT recal": (True, True, "train", (1.0, 1.0, 0.0)),
    "KTFT recal + logit": (True, True, "train", (1.0, 1.0, 1.0)),
}


def _load_cells():
    from keras_seltransfer.utils.io import load_json_object

    if not os.path.isfile(FLAGS.results):
        return {}
    return load_json_object(FLAGS.results, what="KTFT results").get("cells", {})


def _save_cells(cells, settings):
    from keras_seltransfer.utils.io import atomic_write_text

    os.makedirs(os.path.dirname(os.path.abspath(FLAGS.results)), exist_ok=True)
    atomic_write_text(
        FLAGS.results,
        json.dumps({"settings": settings, "cells": cells}, indent=2, sort_keys=True) + "\n",
    )


class _Task:
    """The Fashion-MNIST images of one seed, prepared at the network's input size."""

    def __init__(self, teacher, seed):
        import numpy as np

        from keras_seltransfer import data as data_lib

        size = tuple(teacher.input_shape[1:3])
        channels = teacher.input_shape[-1]
        train_full, test = data_lib.load_train_test("fashion_mnist")
        kept = data_lib.low_data_subset(train_full.labels, per_class=2 * FLAGS.per_class, seed=seed)
        train_ids = kept[
            data_lib.low_data_subset(train_full.labels[kept], per_class=FLAGS.per_class, seed=seed)
        ]
        val_ids = np.setdiff1d(kept, train_ids)
        rest = np.setdiff1d(np.arange(len(train_full)), kept)
        other = np.sort(np.random.default_rng(seed).choice(rest, 2000, replace=False))
        self.train = train_full.subset(train_ids)
        self.val = train_full.subset(val_ids)
        self.size, self.channels = size, channels
        self.other = data_lib.prepared_images(train_full.subset(other), size, channels)
        self.train_images = data_lib.prepared_images(self.train, size, channels)
        self.test_images = data_lib.prepared_images(test, size, channels)
        self.test_labels = np.asarray(test.labels)
        shift = np.random.default_rng(0).choice(len(test), FLAGS.shift_images, replace=False)
        self.shift_images = self.test_images[np.sort(shift)]

    def datasets(self, seed):
        from keras_seltransfer import data as data_lib

        train = data_lib.make_dataset(
            self.train, self.size, 32, training=True, seed=seed, augment="flip",
            channels=self.channels,
        )
        val = data_lib.make_dataset(self.val, self.size, 32, channels=self.channels)
        return train, val


def _score(model, task):
    import numpy as np

    from keras_seltransfer import evaluation

    predictions = model.predict(task.test_images, batch_size=256, verbose=0)
    accuracy = float(np.mean(np.argmax(predictions, -1) == task.test_labels))
    consistency = evaluation.shift_consistency(model, task.shift_images, batch_size=256)
    return {"accuracy": accuracy, "shift_consistency": float(consistency)}


def _network(teacher, row, task):
    from keras_seltransfer import models

    _, antialiased, recalibration, _ = ROWS[row]
    model = models.surgery.rebuild(teacher)
    model.trainable = True
    if antialiased:
        model = models.antialias(teacher, filt_size=FLAGS.filt_size)
    if recalibration == "train":
        models.recalibrate_batchnorm(model, task.train_images)
    elif recalibration == "other":
        models.recalibrate_batchnorm(model, task.other)
    models.set_batchnorm_mode(model, "frozen")
    return model


def _train(teacher, row, task, seed, learning_rate):
    import keras

    from keras_seltransfer import models

    keras.utils.set_random_seed(seed)
    student = _network(teacher, row, task)
    weights = ROWS[row][3]
    model = student
    if weights is not None:
        pixel, global_, logit = weights
        # The knowledge-transfer model freezes its teacher: give it a copy.
        model = models.KnowledgeTransferModel(
            student, models.surgery.rebuild(teacher), pixel_weight=pixel, global_weight=global_, logit_weight=logit
        )
    train, val = task.datasets(seed)
    steps = -(-len(task.train) // 32)
    schedule = keras.optimizers.schedules.CosineDecay(learning_rate, FLAGS.epochs * steps)
    model.compile(
        keras.optimizers.Adam(schedule),
        "sparse_categorical_crossentropy",
        metrics=[keras.metrics.SparseCategoricalCrossentropy(name="crossentropy")],
    )
    stop = keras.callbacks.EarlyStopping(
        "val_crossentropy", patience=FLAGS.epochs, restore_best_weights=True
    )
    history = model.fit(
        train, validation_data=val, epochs=FLAGS.epochs, steps_per_epoch=steps,
        callbacks=[stop], verbose=0,
    )
    return student, float(min(history.history["val_crossentropy"]))


def _cell(teacher, row, task, seed, learning_rate):
    start = time.time()
    if ROWS[row][0]:
        model, val_ce = _train(teacher, row, task, seed, learning_rate)
    else:
        model, val_ce = _network(teacher, row, task), None
    result = _score(model, task)
    result.update(val_crossentropy=val_ce, learning_rate=learning_rate, seconds=round(time.time() - start, 1))
    return result


def _table(cells, seeds):
    import numpy as np

    lines = [
        f"Fashion-MNIST, {FLAGS.per_class} training images per class; test accuracy (10,000 "
        f"images) / shift consistency ({FLAGS.shift_images} test images, shifts up to 8 px); "
        f"mean ± std over seeds {', '.join(map(str, seeds))}; learning rate chosen on validation "
        "at the first seed.",
        "",
        "| row | lr | accuracy | shift consistency | paired accuracy difference to the original |",
        "|---|---|---|---|---|",
    ]
    for row in ROWS:
        done = [cells.get(f"{row}|{s}") for s in seeds]
        if any(c is None for c in done):
            continue
        acc = np.array([c["accuracy"] for c in done])
        con = np.array([c["shift_consistency"] for c in done])
        orig = np.array([cells[f"original|{s}"]["accuracy"] for s in seeds])
        diff = acc - orig
        half = 0.0
        if len(seeds) > 1:
            from scipy import stats

            half = float(stats.t.ppf(0.975, len(seeds) - 1) * diff.std(ddof=1) / np.sqrt(len(seeds)))
        lr = done[0]["learning_rate"]
        lines.append(
            f"| {row} | {lr if ROWS[row][0] else '-'} | {acc.mean():.4f} ± {acc.std():.4f} | "
            f"{con.mean():.4f} ± {con.std():.4f} | {diff.mean():+.4f} ± {half:.4f} (95% CI) |"
        )
    return "\n".join(lines) + "\n"


def main(argv):
    common.reject_arguments(argv)
    try:
        seeds = [int(s) for s in FLAGS.seeds]
        rates = [float(r) for r in FLAGS.learning_rates]
    except ValueError as e:
        raise app.UsageError(f"--seeds takes ints and --learning_rates floats: {e}")
    if not seeds or not rates:
        raise app.UsageError("--seeds and --learning_rates must not be empty.")
    if not os.path.isfile(FLAGS.backbone):
        common.fail(f"{FLAGS.backbone} does not exist: run `python -m apps.pretrain` first.")
    from keras_seltransfer import models
    from keras_seltransfer.utils.io import atomic_write_text

    teacher = models.load_keras_file(FLAGS.backbone)
    settings = {
        "backbone": FLAGS.backbone, "per_class": FLAGS.per_class, "epochs": FLAGS.epochs,
        "filt_size": FLAGS.filt_size, "shift_images": FLAGS.shift_images,
    }
    cells = _load_cells()
    for seed in seeds:
        task = None
        for row, (trained, *_ ) in ROWS.items():
            key = f"{row}|{seed}"
            if key in cells:
                continue
            task = task or _Task(teacher, seed)
            if trained and seed == seeds[0]:
                trials = [_cell(teacher, row, task, seed, lr) for lr in rates]
                cells[key] = min(trials, key=lambda c: c["val_crossentropy"])
                cells[key]["trials"] = {str(c["learning_rate"]): c["val_crossentropy"] for c in trials}
            else:
                lr = cells[f"{row}|{seeds[0]}"]["learning_rate"] if trained else None
                cells[key] = _cell(teacher, row, task, seed, lr)
            _save_cells(cells, settings)
            c = cells[key]
            print(
                f"{row} seed {seed}: accuracy {c['accuracy']:.4f}, consistency "
                f"{c['shift_consistency']:.4f} ({c['seconds']} s)",
                flush=True,
            )
    table = _table(cells, seeds)
    atomic_write_text(FLAGS.table, table)
    print(table)


if __name__ == "__main__":
    app.run(main)
