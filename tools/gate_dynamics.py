r"""Do AdaFilter's gates learn? Gate entropy and input dependence over epochs.

Reads the `report.json` of AdaFilter runs (`apps.finetune --method=adafilter`)
grouped by variant, and

- plots, per variant (mean over its seeds), the validation gate entropy
  (mean binary entropy of the soft gate probabilities, in bits: 1 is a coin
  flip) and the fraction of input-dependent gates (filters open for some
  validation images of a batch and closed for others), overall and for the
  first two gated layers, over the epochs (from the fit history, which
  `GateController`'s metrics fill);
- prints, per variant, validation and test balanced accuracy and accuracy
  (mean ± population std over seeds) and the paired per-seed difference to
  the reference variant (the first one), plus the last epoch's validation
  gate figures. Validation figures are those of the saved model (the kept
  epoch) on the run's own validation split, rebuilt from its config.json
  and cached in the run directory as validation.json. Runs of other methods (baseline rows) can be listed too:
  they get the accuracy columns only.

A variant is `label=glob` of run directories, one per seed:

  python tools/gate_dynamics.py \
      --runs="before=runs/issue14/before-newcode/seed*" \
      --runs="after=runs/issue14/bntrain-m10-features/seed*" \
      --plot=docs/results/adafilter_gate_dynamics.png
"""

import glob
import io
import json
import os

import common  # tools/common.py: environment, repository root on sys.path

from absl import app
from absl import flags

flags.DEFINE_multi_string(
    "runs", [], "label=glob of run directories (one per seed); the first is the reference."
)
flags.DEFINE_string("plot", None, "PNG to write the curves to (unset: no plot).")
flags.DEFINE_list(
    "layers", None, "Gated layers to plot besides the overall figure (default: the first two)."
)
FLAGS = flags.FLAGS

KINDS = (("gate_entropy", "gate entropy (bits)"), ("gate_input_dependence", "input-dependent gates"))


def _variants(specs):
    from keras_seltransfer.utils.io import load_json_object

    variants = []
    for spec in specs:
        label, sep, pattern = spec.partition("=")
        if not sep or not label or not pattern:
            raise app.UsageError(f"--runs must be label=glob. Received: --runs={spec}")
        paths = sorted(glob.glob(os.path.join(pattern, "report.json")))
        if not paths:
            raise app.UsageError(f"No report.json under {pattern!r} (--runs={spec}).")
        reports = []
        for path in paths:
            report = load_json_object(path, "run report")
            report.update(_validation(os.path.dirname(path)))
            reports.append(report)
        variants.append((label, reports))
    return variants


def _validation(run_dir, cache={}):
    """Validation accuracy and balanced accuracy of a run's saved model (the
    kept epoch's weights) on its own validation split, rebuilt from its
    `config.json`; cached in `<run_dir>/validation.json`."""
    from keras_seltransfer import data as data_lib
    from keras_seltransfer import evaluation
    from keras_seltransfer import training
    from keras_seltransfer.models import load_keras_file
    from keras_seltransfer.utils.io import atomic_write_text
    from keras_seltransfer.utils.io import load_json_object

    path = os.path.join(run_dir, "validation.json")
    if os.path.isfile(path):
        return load_json_object(path, "validation metrics")
    config = training.FinetuneConfig(**load_json_object(os.path.join(run_dir, "config.json"), "run config"))
    key = (config.target, config.fraction, config.per_class, config.seed, config.val_fraction)
    if key not in cache:
        train_full, _, _, val_ids = training.finetune_split(config)
        cache[key] = train_full.subset(val_ids)
    val = cache[key]
    model = load_keras_file(os.path.join(run_dir, "model.keras"))
    channels = int(model.inputs[0].shape[-1])
    dataset = data_lib.make_dataset(val, config.image_size, config.batch_size, channels=channels)
    probabilities, labels = evaluation.predict_dataset(model, dataset)
    report = evaluation.classification_report(labels, probabilities, val.class_names)
    metrics = {
        "val_accuracy": float(report["accuracy"]),
        "val_balanced_accuracy": float(report["balanced_accuracy"]),
        "val_examples": int(len(labels)),
    }
    atomic_write_text(path, json.dumps(metrics, indent=1) + "\n")
    return metrics


def _summary(variants):
    import numpy as np

    from keras_seltransfer.training import mean_std

    reference = {r["seed"]: r for r in variants[0][1]}
    lines = [
        "| variant | seeds | val cross-entropy | val bal. acc. | val acc. | test bal. acc. | test acc. | "
        f"paired Δ val bal. vs {variants[0][0]} | paired Δ test bal. | val gate entropy | "
        "val input-dep. gates |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    fmt = "{:.3f} ± {:.3f}"
    for label, reports in variants:
        def paired(key):
            return " / ".join(
                f"{r[key] - reference[r['seed']][key]:+.3f}" for r in reports if r["seed"] in reference
            )

        gates = ["-", "-"]
        if "val_gate_entropy" in reports[0]["history"]:
            gates = [
                "{:.3f}".format(np.mean([r["history"][f"val_{k}"][-1] for r in reports]))
                for k, _ in KINDS
            ]
        columns = [
            fmt.format(*mean_std([r[k] for r in reports]))
            for k in (
                "best_val_crossentropy",
                "val_balanced_accuracy",
                "val_accuracy",
                "balanced_accuracy",
                "accuracy",
            )
        ]
        lines.append(
            f"| {label} | {','.join(str(r['seed']) for r in reports)} | {' | '.join(columns)} | "
            f"{paired('val_balanced_accuracy')} | {paired('balanced_accuracy')} | "
            f"{gates[0]} | {gates[1]} |"
        )
    return "\n".join(lines)


def _plot(variants, layers, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from keras_seltransfer.utils.io import atomic_write_bytes

    gated = [(label, reports) for label, reports in variants if "val_gate_entropy" in reports[0]["history"]]
    if not gated:
        raise app.UsageError("None of the --runs logged gate metrics (AdaFilter runs).")
    if layers is None:
        first = gated[0][1][0]["adafilter"]["gated_layers"]
        layers = first[:2]
    scopes = [("", "all gated layers")] + [(f"_{n}", n) for n in layers]
    fig, axes = plt.subplots(
        len(KINDS), len(scopes), figsize=(4.2 * len(scopes), 3.2 * len(KINDS)), squeeze=False
    )
    for row, (kind, kind_label) in enumerate(KINDS):
        for col, (suffix, scope_label) in enumerate(scopes):
            ax = axes[row][col]
            for label, reports in gated:
                key = f"val_{kind}{suffix}"
                curves = [r["history"][key] for r in reports if key in r["history"]]
                if not curves:
                    continue
                length = min(len(c) for c in curves)
                values = np.array([c[:length] for c in curves])
                epochs = np.arange(1, length + 1)
                mean = values.mean(axis=0)
                (line,) = ax.plot(epochs, mean, label=label)
                ax.fill_between(epochs, values.min(axis=0), values.max(axis=0),
                                color=line.get_color(), alpha=0.15)
            ax.set_title(f"{kind_label}: {scope_label}", fontsize=9)
            ax.set_xlabel("epoch")
            ax.set_ylim(-0.02, 1.02)
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle("AdaFilter gates on validation images (mean over seeds; band: min-max)", fontsize=10)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())


def main(argv):
    common.reject_arguments(argv)
    if not FLAGS.runs:
        raise app.UsageError("Give at least one --runs=label=glob.")
    variants = _variants(FLAGS.runs)
    print(_summary(variants))
    if FLAGS.plot:
        _plot(variants, FLAGS.layers, FLAGS.plot)
        print(f"plot: {FLAGS.plot}")


if __name__ == "__main__":
    app.run(main)
