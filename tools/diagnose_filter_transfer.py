r"""Compare fine-tuning runs on validation and test, and show stale BatchNorm statistics.

Each `--runs` entry is `NAME=DIR_PATTERN`, where `DIR_PATTERN` holds `{seed}`
(e.g. `channels=runs/exp/ft_channels-seed{seed}`): one run directory of
`apps.finetune` per seed. For every run this tool reads `report.json`,
`config.json` and `model.keras`, and computes:

- validation: the saved model's (the kept epoch's) accuracy and balanced
  accuracy on the run's own validation images (chosen again with
  `training.finetune_split`), and the best validation cross-entropy
  (`report.json`);
- test: accuracy and balanced accuracy (`report.json`);
- for filter-transfer models, the BatchNorm statistics gap of every masked
  conv (`models.batchnorm_statistics_gap`) on the run's training images,
  unaugmented: how far the moving statistics are from the statistics of
  what the BatchNorm actually normalises, for transferred and for
  re-initialised channels (median over channels, then mean over layers).

It prints one Markdown table (mean ± std over seeds, and the paired
per-seed difference to the `--reference` group) and writes every number to
`--output` (JSON, atomically).

  python tools/diagnose_filter_transfer.py --seeds=0,1,2 \
      --runs=old=runs/exp/ft_old-seed{seed},channels=runs/exp/ft_channels-seed{seed} \
      --reference=old --output=runs/exp/compare.json
"""

import json
import os

import common  # tools/common.py: environment, repository root on sys.path

from absl import app
from absl import flags

flags.DEFINE_list("runs", None, "NAME=DIR_PATTERN entries; DIR_PATTERN contains {seed}.")
flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds of every group.")
flags.DEFINE_string("reference", None, "Group the paired differences are taken against.")
flags.DEFINE_string("output", None, "JSON file for every number (optional).")
flags.DEFINE_boolean("gap", True, "Measure the BatchNorm statistics gap of filter-transfer runs.")
FLAGS = flags.FLAGS

METRICS = (
    ("val_balanced_accuracy", "val bal. acc."),
    ("val_accuracy", "val acc."),
    ("val_crossentropy", "val CE"),
    ("test_balanced_accuracy", "test bal. acc."),
    ("test_accuracy", "test acc."),
    ("gap_reinit_mean", "gap re-init (mean)"),
    ("gap_reinit_logvar", "gap re-init (log var)"),
    ("gap_transferred_mean", "gap transferred (mean)"),
)


def _parse_runs(entries):
    groups = {}
    for entry in entries or []:
        name, sep, pattern = entry.partition("=")
        if not sep or not name or "{seed}" not in pattern:
            raise app.UsageError(
                "Each --runs entry must be NAME=DIR_PATTERN with {seed} in the pattern. "
                f"Received: {entry!r}"
            )
        groups[name] = pattern
    if not groups:
        raise app.UsageError("Pass at least one --runs entry. Received: --runs=None")
    return groups


def measure_run(run_dir, gap=True):
    """Every number of one run directory (see the module docstring)."""
    import numpy as np

    from keras_seltransfer import data as data_lib
    from keras_seltransfer import evaluation
    from keras_seltransfer import training
    from keras_seltransfer.models import batchnorm_statistics_gap
    from keras_seltransfer.models import filter_masks
    from keras_seltransfer.models import load_keras_file
    from keras_seltransfer.utils.io import load_json_object

    report = load_json_object(os.path.join(run_dir, "report.json"), "run report")
    fields = load_json_object(os.path.join(run_dir, "config.json"), "run config")
    config = training.FinetuneConfig(
        **{k: v for k, v in fields.items() if k in training.FinetuneConfig.__dataclass_fields__}
    )
    model = load_keras_file(os.path.join(run_dir, "model.keras"))
    channels = int(model.inputs[0].shape[-1])
    train_full, _, train_ids, val_ids = training.finetune_split(config)
    val = train_full.subset(val_ids)
    val_ds = data_lib.make_dataset(val, config.image_size, config.batch_size, channels=channels)
    probabilities, labels = evaluation.predict_dataset(model, val_ds)
    val_report = evaluation.classification_report(labels, probabilities, val.class_names)
    history = report["history"]
    best = int(np.argmin(history["val_crossentropy"]))
    result = {
        "val_balanced_accuracy": float(val_report["balanced_accuracy"]),
        "val_accuracy": float(val_report["accuracy"]),
        "val_crossentropy": float(history["val_crossentropy"][best]),
        "test_balanced_accuracy": float(report["balanced_accuracy"]),
        "test_accuracy": float(report["accuracy"]),
    }
    if gap and filter_masks(model):
        train_ds = data_lib.make_dataset(
            train_full.subset(train_ids), config.image_size, config.batch_size, channels=channels
        )
        layers = batchnorm_statistics_gap(model, train_ds)
        result["gap_layers"] = layers

        def average(kind, key):
            values = [v[kind][key] for v in layers.values() if v[kind][key] is not None]
            return float(np.mean(values)) if values else None

        result["gap_reinit_mean"] = average("reinitialized", "mean_gap")
        result["gap_reinit_logvar"] = average("reinitialized", "log_variance_ratio")
        result["gap_transferred_mean"] = average("transferred", "mean_gap")
    return result


def _cell(values):
    import numpy as np

    values = [v for v in values if v is not None]
    if not values:
        return "-"
    return f"{np.mean(values):.3f} ± {np.std(values):.3f}"


def _paired(values, reference):
    import numpy as np

    pairs = [(v, r) for v, r in zip(values, reference) if v is not None and r is not None]
    if not pairs:
        return "-"
    diffs = [v - r for v, r in pairs]
    return f"{np.mean(diffs):+.3f} ({', '.join(f'{d:+.3f}' for d in diffs)})"


def main(argv):
    common.reject_arguments(argv)
    from keras_seltransfer.utils.io import atomic_write_text

    groups = _parse_runs(FLAGS.runs)
    if FLAGS.reference is not None and FLAGS.reference not in groups:
        raise app.UsageError(
            f"--reference must name one of the groups {sorted(groups)}. "
            f"Received: --reference={FLAGS.reference}"
        )
    seeds = [int(s) for s in FLAGS.seeds]
    results = {
        name: {seed: measure_run(pattern.format(seed=seed), FLAGS.gap) for seed in seeds}
        for name, pattern in groups.items()
    }
    header = "| run | " + " | ".join(label for _, label in METRICS) + " |"
    print(header)
    print("|" + "---|" * (len(METRICS) + 1))
    for name, runs in results.items():
        cells = [_cell([runs[s].get(key) for s in seeds]) for key, _ in METRICS]
        print(f"| {name} | " + " | ".join(cells) + " |")
    if FLAGS.reference is not None:
        print(f"\nPaired difference to {FLAGS.reference} (mean, then per seed {seeds}):\n")
        print(header)
        print("|" + "---|" * (len(METRICS) + 1))
        reference = results[FLAGS.reference]
        for name, runs in results.items():
            if name == FLAGS.reference:
                continue
            cells = [
                _paired([runs[s].get(key) for s in seeds], [reference[s].get(key) for s in seeds])
                for key, _ in METRICS
            ]
            print(f"| {name} | " + " | ".join(cells) + " |")
    if FLAGS.output:
        atomic_write_text(
            FLAGS.output,
            json.dumps({name: {str(s): r for s, r in runs.items()} for name, runs in results.items()}, indent=1),
        )


if __name__ == "__main__":
    app.run(main)
