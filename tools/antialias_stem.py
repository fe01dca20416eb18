r"""Anti-aliasing with the stem strided or blurred: accuracy, shift consistency, step time.

Zhang's released anti-aliased ResNets and MobileNetV2 keep the stem
convolution strided (`pool_only=True`: "don't antialias the first
downsampling operation, which is costly to antialias"); `antialias` blurs it
too unless `keep_stem=True` (`--blur_keep_stem`). This trains antialias_ft
and ktft both ways on --target at --fraction for every seed (the settings of
docs/results/results.json: Adam with cosine decay, batch 32, 20 epochs
keeping the best validation epoch, each method's learning rate chosen there
on validation), and reports for each on the fixed test split accuracy,
balanced accuracy and Zhang's shift consistency (two random shifts of up
to --max_shift pixels, --num_pairs pairs per image), beside the kept
epoch's validation cross-entropy and accuracy, with the paired
differences (stem kept minus stem blurred) over seeds and their 95% Student-t
intervals. A difference is real only when its interval excludes zero.

Every finished run is cached in --runs_dir and its figures written to
--output as they come, so an interrupted comparison continues where it
stopped.

  python tools/antialias_stem.py                      # 5 seeds, ELPV at 15%
  python tools/antialias_stem.py --seeds=0,1 --epochs=3   # a quick check
"""

import dataclasses
import json
import os

import common  # tools/common.py: environment, repository root on sys.path

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
import numpy as np  # noqa: E402

from keras_seltransfer import training  # noqa: E402
from keras_seltransfer.comparison.stats import paired_interval  # noqa: E402
from keras_seltransfer.comparison.stats import verdict  # noqa: E402
from keras_seltransfer.utils.io import atomic_write_text  # noqa: E402

# Learning rates chosen on validation for docs/results/results.json.
LEARNING_RATES = {"antialias_ft": 3e-4, "ktft": 1e-3}
METRICS = ("val_crossentropy", "val_accuracy", "accuracy", "balanced_accuracy", "consistency")

flags.DEFINE_list("seeds", ["0", "1", "2", "3", "4"], "Seeds.")
flags.DEFINE_list("methods", list(LEARNING_RATES), "Methods compared.")
flags.DEFINE_string("target", "elpv", "Target data set.")
flags.DEFINE_float("fraction", 0.15, "Target training fraction.")
flags.DEFINE_integer("epochs", 20, "Epochs per run (the best validation epoch is kept).")
flags.DEFINE_integer("max_shift", 8, "Largest shift in pixels along each axis.", lower_bound=0)
flags.DEFINE_integer("num_pairs", 5, "Random shift pairs per test image.", lower_bound=1)
flags.DEFINE_string("runs_dir", os.path.join("runs", "antialias_stem"), "Run cache.")
flags.DEFINE_string(
    "output", os.path.join("docs", "results", "antialias_stem.json"), "Figures (JSON)."
)
FLAGS = flags.FLAGS


def _run(method, seed, keep_stem):
    """Trains (or reads the cached) run and returns its test figures."""
    from keras_seltransfer import data as data_lib
    from keras_seltransfer import evaluation
    from keras_seltransfer.models import load_keras_file

    label = "stem_kept" if keep_stem else "stem_blurred"
    run_dir = os.path.join(FLAGS.runs_dir, f"{method}-{label}-{FLAGS.fraction:g}-seed{seed}")
    report_path = os.path.join(run_dir, "report.json")
    if not os.path.isfile(report_path):
        training.finetune(
            training.FinetuneConfig(
                target=FLAGS.target,
                method=method,
                fraction=FLAGS.fraction,
                seed=seed,
                epochs=FLAGS.epochs,
                patience=FLAGS.epochs,
                learning_rate=LEARNING_RATES[method],
                blur_keep_stem=keep_stem,
                output_dir=run_dir,
                export=False,
                tensorboard=False,
                verbose=0,
            )
        )
    with open(report_path) as f:
        report = json.load(f)
    model = load_keras_file(os.path.join(run_dir, "model.keras"))
    size = int(model.inputs[0].shape[1])
    channels = int(model.inputs[0].shape[-1])
    _, test = training.load_train_test(FLAGS.target)
    images = data_lib.prepared_images(test, size, channels=channels)
    consistency = evaluation.shift_consistency(
        model, images, max_shift=FLAGS.max_shift, num_pairs=FLAGS.num_pairs, seed=seed
    )
    # The validation figures of the kept (lowest validation cross-entropy) epoch.
    history = report["history"]
    best = int(np.argmin(history["val_crossentropy"]))
    return {
        "val_crossentropy": float(report["best_val_crossentropy"]),
        "val_accuracy": float(history["val_accuracy"][best]),
        "accuracy": report["accuracy"],
        "balanced_accuracy": report["balanced_accuracy"],
        "consistency": float(consistency),
        "seconds": report.get("seconds"),
        "run_dir": run_dir,
    }


def _summary(runs):
    """Means per arm and paired differences (stem kept - stem blurred)."""
    out = {}
    for method in FLAGS.methods:
        seeds = sorted(
            s for s in runs.get(method, {})
            if all(
                set(METRICS) <= set(runs[method][s].get(label, {}))
                for label in ("stem_kept", "stem_blurred")
            )
        )
        if not seeds:
            continue
        arms = {
            label: {
                metric: float(np.mean([runs[method][s][label][metric] for s in seeds]))
                for metric in METRICS
            }
            for label in ("stem_blurred", "stem_kept")
        }
        differences = {}
        for metric in METRICS:
            values = [
                runs[method][s]["stem_kept"][metric] - runs[method][s]["stem_blurred"][metric]
                for s in seeds
            ]
            if len(values) >= 2:
                mean, low, high = paired_interval(values)
                differences[metric] = {
                    "mean": mean, "low": low, "high": high, "verdict": verdict(low, high),
                }
        out[method] = {"seeds": seeds, "means": arms, "stem_kept_minus_blurred": differences}
    return out


def _print(summary):
    for method, figures in summary.items():
        print(f"\n{method} on {FLAGS.target} at {FLAGS.fraction:g}, seeds {figures['seeds']}:")
        for label, means in figures["means"].items():
            shown = ", ".join(f"{m} {v:.4f}" for m, v in means.items())
            print(f"  {label:>12}: {shown}")
        for metric, d in figures["stem_kept_minus_blurred"].items():
            print(
                f"  stem kept - blurred, {metric}: {d['mean']:+.4f} "
                f"[{d['low']:+.4f}, {d['high']:+.4f}] ({d['verdict']})"
            )


def main(argv):
    common.reject_arguments(argv)
    unknown = [m for m in FLAGS.methods if m not in LEARNING_RATES]
    if unknown:
        common.fail(f"--methods takes {sorted(LEARNING_RATES)}; received {unknown}.")
    runs = {}
    if os.path.isfile(FLAGS.output):
        with open(FLAGS.output) as f:
            runs = json.load(f).get("runs", {})
    for seed in (int(s) for s in FLAGS.seeds):
        for method in FLAGS.methods:
            for keep_stem in (False, True):
                label = "stem_kept" if keep_stem else "stem_blurred"
                if set(METRICS) <= set(runs.get(method, {}).get(str(seed), {}).get(label, {})):
                    continue
                print(f"{method}, seed {seed}, {label} ...", flush=True)
                figures = _run(method, seed, keep_stem)
                runs.setdefault(method, {}).setdefault(str(seed), {})[label] = figures
                document = {
                    "settings": {
                        "target": FLAGS.target, "fraction": FLAGS.fraction,
                        "epochs": FLAGS.epochs, "learning_rates": LEARNING_RATES,
                        "max_shift": FLAGS.max_shift, "num_pairs": FLAGS.num_pairs,
                    },
                    "runs": runs,
                    "summary": _summary(runs),
                }
                os.makedirs(os.path.dirname(os.path.abspath(FLAGS.output)), exist_ok=True)
                atomic_write_text(FLAGS.output, json.dumps(document, indent=1) + "\n")
    _print(_summary(runs))
    print(f"\nwrote {FLAGS.output}")


if __name__ == "__main__":
    app.run(main)
