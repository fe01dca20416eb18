r"""Why AdaFilter and anti-aliasing did what they did in tools/reproduce.py.

Reads the models tools/reproduce.py cached (through its --results file) and
prints, per fraction and seed:

AdaFilter (the `adafilter` row):
  - per gated layer, gate usage on the held-out test images (hard gates) and
    the share of *input-dependent* filters: filters whose gate is open for
    more than 5% and fewer than 95% of the images. A filter outside that band
    takes the same path for every image: a static choice, not AdaFilter's
    per-example one;
  - per gated layer, how far the fine-tuned kernel moved from the pretrained
    one, ||W_ft - W_pre|| / ||W_pre||, beside the same figure for the plain
    fine-tuning run (`baseline` row) of the same fraction and seed.

Anti-aliasing: the pretrained backbone's accuracy on the source test split
(Fashion-MNIST) before any fine-tuning, as trained and after `antialias` with
BlurPool filter sizes 2 and 4 and with the stem kept strided, each with the
copied BatchNorm statistics and after `recalibrate_batchnorm` on
--recalibration_images source training images: how much the blur alone moves
the pretrained network away from what it learned, and how much of that the
statistics explain.

  python tools/diagnose_results.py
  python tools/diagnose_results.py --fractions=0.15 --seeds=0
"""

import json
import os

import common  # tools/common.py: environment, repository root on sys.path

from absl import app
from absl import flags

flags.DEFINE_string(
    "results",
    os.path.join("docs", "results", "results.json"),
    "results.json of tools/reproduce.py, which lists the run directory of every cell.",
)
flags.DEFINE_list("fractions", None, "Fractions to inspect (default: all in the results).")
flags.DEFINE_list("seeds", None, "Seeds to inspect (default: all in the results).")
flags.DEFINE_boolean("adafilter", True, "Inspect the AdaFilter runs.")
flags.DEFINE_boolean("antialias", True, "Measure the anti-aliased pretrained backbone.")
flags.DEFINE_integer("batch_size", 128, "Inference batch size.", lower_bound=1)
flags.DEFINE_integer(
    "recalibration_images", 2000,
    "Source training images the anti-aliased networks' BatchNorm statistics are re-estimated on.",
    lower_bound=1,
)
FLAGS = flags.FLAGS

DEPENDENT_BAND = (0.05, 0.95)


def _load(path):
    from keras_seltransfer.models import load_keras_file

    if not os.path.isfile(path):
        raise FileNotFoundError(f"Model file not found: {path}. Run tools/reproduce.py first.")
    return load_keras_file(path)


def _find_layer(model, name):
    import keras

    for layer in model.layers:
        if layer.name == name:
            return layer
        if isinstance(layer, keras.Model):
            found = _find_layer(layer, name)
            if found is not None:
                return found
    return None


def _relative_change(new, old):
    import numpy as np

    return float(np.linalg.norm(new - old) / np.linalg.norm(old))


def _selection():
    """`(fractions, seeds)` from the flags, None for all; bad values raise
    a UsageError naming the flag."""
    try:
        fractions = {float(f) for f in FLAGS.fractions} if FLAGS.fractions else None
    except ValueError:
        raise app.UsageError(
            f"--fractions must be numbers such as 0.15,1. Received: {','.join(FLAGS.fractions)}"
        ) from None
    try:
        seeds = {int(s) for s in FLAGS.seeds} if FLAGS.seeds else None
    except ValueError:
        raise app.UsageError(
            f"--seeds must be integers such as 0,1. Received: {','.join(FLAGS.seeds)}"
        ) from None
    return fractions, seeds


def _runs(results, row):
    fractions, seeds = _selection()
    chosen = {}
    for run in results["runs"]:
        if run["row"] != row:
            continue
        if fractions is not None and run["fraction"] not in fractions:
            continue
        if seeds is not None and run["seed"] not in seeds:
            continue
        chosen[(run["fraction"], run["seed"])] = run["run_dir"]
    return chosen


def _test_images(spec, image_size, channels):
    import numpy as np

    from keras_seltransfer import data as data_lib
    from keras_seltransfer import training

    _, test = training.load_train_test(spec)
    images = data_lib.prepared_images(test, image_size, channels=channels)
    return images, np.asarray(test.labels)


def _source_training_images(spec, image_size, channels, count):
    import numpy as np

    from keras_seltransfer import data as data_lib

    train, _ = data_lib.load_train_test(spec)
    rng = np.random.default_rng(0)
    kept = np.sort(rng.choice(len(train), min(count, len(train)), replace=False))
    return data_lib.prepared_images(train.subset(kept), image_size, channels=channels)


def diagnose_adafilter(results, settings):
    import keras
    import numpy as np

    from keras_seltransfer import models

    adafilter_runs = _runs(results, "adafilter")
    baseline_runs = _runs(results, "baseline")
    if not adafilter_runs:
        print(
            "adafilter: no runs in the results file"
            + (" at the chosen --fractions/--seeds" if FLAGS.fractions or FLAGS.seeds else "")
        )
        return
    pretrained = _load(settings["backbone"])
    size = settings["image_size"]
    images = labels = None
    print(
        "AdaFilter, held-out test images: gate usage / share of input-dependent filters "
        f"(open for {DEPENDENT_BAND[0]:.0%}-{DEPENDENT_BAND[1]:.0%} of the images) / "
        "kernel change ||W_ft - W_pre|| / ||W_pre|| (plain fine-tuning's in brackets)"
    )
    for (fraction, seed), run_dir in sorted(adafilter_runs.items()):
        model = _load(os.path.join(run_dir, "model.keras"))
        if images is None:
            channels = model.input_shape[-1]
            images, labels = _test_images(settings["target"], (size, size), channels)
        layers = models.gated_layers(model)
        probe = keras.Model(model.input, [layer.input[1] for layer in layers])
        gates = probe.predict(images, batch_size=FLAGS.batch_size, verbose=0)
        if len(layers) == 1:
            gates = [gates]
        accuracy = float(np.mean(np.argmax(model.predict(images, verbose=0), -1) == labels))
        baseline = None
        if (fraction, seed) in baseline_runs:
            baseline = _load(os.path.join(baseline_runs[(fraction, seed)], "model.keras"))
        cells = []
        for layer, g in zip(layers, gates):
            rate = g.reshape(len(g), -1).mean(axis=0)
            dependent = float(np.mean((rate > DEPENDENT_BAND[0]) & (rate < DEPENDENT_BAND[1])))
            weights = {v.path.rsplit("/", 1)[-1]: v.numpy() for v in layer.weights}
            moved = _relative_change(weights["kernel"], weights["pretrained_kernel"])
            cell = f"{layer.name} {float(np.mean(g)):.2f}/{dependent:.2f}/{moved:.3f}"
            original = _find_layer(pretrained, layer.name)
            tuned = _find_layer(baseline, layer.name) if baseline is not None else None
            if original is not None and tuned is not None:
                cell += f" ({_relative_change(tuned.kernel.numpy(), original.kernel.numpy()):.3f})"
            cells.append(cell)
        print(f"  {fraction:.0%} seed {seed} (test accuracy {accuracy:.3f}): " + "; ".join(cells))


def diagnose_antialias(settings):
    import numpy as np

    from keras_seltransfer import models

    pretrained = _load(settings["backbone"])
    size = settings["image_size"]
    images, labels = _test_images(settings["source"], (size, size), pretrained.input_shape[-1])
    calibration = _source_training_images(
        settings["source"], (size, size), pretrained.input_shape[-1], FLAGS.recalibration_images
    )

    def accuracy(model):
        predictions = model.predict(images, batch_size=FLAGS.batch_size, verbose=0)
        return float(np.mean(np.argmax(predictions, -1) == labels))

    print(
        f"Pretrained backbone on the {settings['source']} test split ({len(labels)} images), "
        f"no fine-tuning; BatchNorm statistics as copied / re-estimated on {len(calibration)} "
        "source training images:"
    )
    print(f"  as trained: accuracy {accuracy(pretrained):.4f}")
    for name, kwargs in (
        ("antialias filt_size=2", {"filt_size": 2}),
        ("antialias filt_size=4", {"filt_size": 4}),
        ("antialias filt_size=4, stem kept", {"filt_size": 4, "keep_stem": True}),
    ):
        model = models.antialias(pretrained, **kwargs)
        copied = accuracy(model)
        models.recalibrate_batchnorm(model, calibration, batch_size=FLAGS.batch_size)
        print(f"  {name}: accuracy {copied:.4f} as copied, {accuracy(model):.4f} recalibrated")


def main(argv):
    common.reject_arguments(argv)
    if not os.path.isfile(FLAGS.results):
        raise app.UsageError(
            f"--results={FLAGS.results} does not exist: run tools/reproduce.py first."
        )
    with open(FLAGS.results) as f:
        results = json.load(f)
    if not results.get("runs"):
        raise app.UsageError(f"{FLAGS.results} lists no runs; run tools/reproduce.py first.")
    # Every run of a reproduce invocation shares the target, source, backbone
    # and input size; the first run's config names them.
    config_path = os.path.join(results["runs"][0]["run_dir"], "config.json")
    if not os.path.isfile(config_path):
        raise app.UsageError(
            f"{config_path} (listed in {FLAGS.results}) does not exist: the run cache is "
            "missing; rerun tools/reproduce.py, which retrains what is not cached."
        )
    with open(config_path) as f:
        settings = json.load(f)
    _selection()  # bad --fractions/--seeds fail before any model is loaded
    if FLAGS.adafilter:
        diagnose_adafilter(results, settings)
    if FLAGS.antialias:
        diagnose_antialias(settings)


if __name__ == "__main__":
    app.run(main)
