r"""Does `--method=auto` choose as well as choosing on the validation split?

For each seed, on one target and fraction (default: ELPV at 15%, the
pretrain app's backbone):

1. `finetune(method="auto")`: k-fold cross-validation of the default
   candidates on the training and validation images, then the choice trained
   as its own run; its test score is what a user of the auto mode gets.
2. Every candidate run on its own (the same config, the usual
   training/validation split): its validation score (balanced accuracy of
   the saved model on the validation images, and the validation
   cross-entropy early stopping kept) and its test score.
3. The single-split choice: the candidate with the best validation balanced
   accuracy (the metric auto compares; ties to the simpler candidate), and,
   as a second rule, the lowest validation cross-entropy.

It prints, and writes to `--output` (JSON, atomically, after every seed), the
test score of auto's choice (and of the highest cross-validated mean, auto's
`--auto_rule=best`), of each single-split choice, of the one candidate with
the best validation score averaged over the seeds, and of the test-best
candidate, the paired differences over seeds with a 95% Student-t
interval, and how often each choice equals the test-best candidate. Every
run is resumable (rerunning skips finished runs and folds); the test split
is only scored, never chosen on.

  python tools/auto_vs_validation.py                      # ELPV 15%, seeds 1-3
  python tools/auto_vs_validation.py --seeds=1 --auto_folds=3 --epochs=5   # a quick check
  python tools/auto_vs_validation.py --seeds=                # summary of the stored seeds only
"""

import dataclasses
import json
import os

import common  # tools/common.py: environment, repository root on sys.path

common.repeatable_cpu_arithmetic()

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
import numpy as np  # noqa: E402

from keras_seltransfer import training  # noqa: E402
from keras_seltransfer.models import load_keras_file  # noqa: E402
from keras_seltransfer.training import auto  # noqa: E402
from keras_seltransfer.utils.io import atomic_write_text  # noqa: E402
from keras_seltransfer.comparison import stats  # noqa: E402

flags.DEFINE_string("target", "elpv", "Target data set spec.")
flags.DEFINE_float("fraction", 0.15, "Training fraction of each class.")
flags.DEFINE_list("seeds", ["1", "2", "3"], "Seeds.")
flags.DEFINE_string("auto_candidates", None, "Candidates (default: the auto mode's).")
flags.DEFINE_integer("auto_folds", 5, "Cross-validation folds.", lower_bound=2)
flags.DEFINE_integer("epochs", 30, "Maximum epochs per run.", lower_bound=1)
flags.DEFINE_integer("image_size", 64, "Input size.", lower_bound=8)
flags.DEFINE_string("runs_dir", "runs/auto_vs_validation", "Run cache.")
flags.DEFINE_string(
    "output", "docs/results/auto/auto_vs_validation.json", "Where the results go (JSON)."
)

FLAGS = flags.FLAGS
METRIC = "balanced_accuracy"


def base_config(seed, **fields):
    return training.FinetuneConfig(
        target=FLAGS.target,
        fraction=FLAGS.fraction,
        seed=seed,
        epochs=FLAGS.epochs,
        image_size=FLAGS.image_size,
        export=False,
        tensorboard=False,
        verbose=0,
        **fields,
    )


def single_runs(seed, auto_config):
    """Each candidate trained on its own: validation and test scores."""
    train_full, _, _, val_ids = training.finetune_split(auto_config)
    val = train_full.subset(val_ids)
    rows = {}
    for candidate, _ in auto.candidate_configs(auto_config):
        config = dataclasses.replace(
            auto_config,
            method=candidate.method,
            output_dir=os.path.join(FLAGS.runs_dir, f"seed{seed}", "single", candidate.slug),
            **candidate.overrides,
        )
        path = os.path.join(config.output_dir, "report.json")
        if os.path.isfile(path):
            with open(path) as f:
                report = json.load(f)
        else:
            print(f"seed {seed}: {candidate.label} on its own ...", flush=True)
            report = training.finetune(config)["report"]
        model = load_keras_file(os.path.join(config.output_dir, "model.keras"))
        val_report = training.evaluate_model(model, val, config.batch_size)
        rows[candidate.label] = {
            "val_balanced_accuracy": val_report[METRIC],
            "val_crossentropy": report.get("best_val_crossentropy"),
            "test_balanced_accuracy": report[METRIC],
            "test_accuracy": report["accuracy"],
        }
        print(f"seed {seed}: {candidate.label}: {rows[candidate.label]}", flush=True)
    return rows


def first_best(labels, values, lower=False):
    values = np.asarray(values, float)
    if lower:
        values = -np.where(np.isnan(values), np.inf, values)
    return labels[int(np.flatnonzero(values == np.nanmax(values))[0])]


def interval(differences):
    """Mean and 95% Student-t interval (None with fewer than 2 seeds)."""
    if len(differences) < 2:
        return [float(np.mean(differences)), None, None]
    return list(stats.paired_interval(differences))


def derived_choices(per_seed):
    """Adds, per seed, the choices computed from the stored scores:
    `auto_best_rule` (the highest cross-validated mean, auto with
    --auto_rule=best) and `fixed_on_validation` (the one candidate with the
    highest validation balanced accuracy averaged over the seeds, run at
    every seed: the best single method chosen on validation)."""
    seeds = sorted(per_seed)
    labels = list(per_seed[seeds[0]]["candidates"])
    mean_val = [np.mean([per_seed[s]["candidates"][l]["val_balanced_accuracy"] for s in seeds]) for l in labels]
    fixed = first_best(labels, mean_val)
    for s in seeds:
        record = per_seed[s]
        cv = [record["cross_validation"][l].get("mean") for l in labels]
        best = first_best(labels, [np.nan if m is None else m for m in cv])
        for key, label in (("auto_best_rule", best), ("fixed_on_validation", fixed)):
            record["choices"][key] = {
                "label": label, "test": record["candidates"][label]["test_balanced_accuracy"]
            }


def summarise(per_seed):
    derived_choices(per_seed)
    keys = (
        "auto", "auto_best_rule", "single_split_balanced_accuracy", "single_split_crossentropy",
        "fixed_on_validation", "test_best",
    )
    out = {"seeds": sorted(per_seed), "test_balanced_accuracy": {}, "matches_test_best": {}}
    for key in keys:
        values = [per_seed[s]["choices"][key]["test"] for s in sorted(per_seed)]
        out["test_balanced_accuracy"][key] = [
            float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
        ]
        out["matches_test_best"][key] = int(sum(
            per_seed[s]["choices"][key]["label"] == per_seed[s]["choices"]["test_best"]["label"]
            for s in per_seed
        ))
    out["auto_minus"] = {
        key: interval([
            per_seed[s]["choices"]["auto"]["test"] - per_seed[s]["choices"][key]["test"]
            for s in sorted(per_seed)
        ])
        for key in keys if key != "auto"
    }
    out["choices"] = {
        s: {key: per_seed[s]["choices"][key]["label"] for key in keys} for s in sorted(per_seed)
    }
    return out


def main(argv):
    del argv
    results = {}
    if os.path.isfile(FLAGS.output):
        with open(FLAGS.output) as f:
            results = json.load(f).get("per_seed", {})
    for seed in (int(s) for s in FLAGS.seeds):
        auto_config = base_config(
            seed,
            method="auto",
            auto_candidates=FLAGS.auto_candidates,
            auto_folds=FLAGS.auto_folds,
            output_dir=os.path.join(FLAGS.runs_dir, f"seed{seed}", "auto"),
        )
        outputs = training.finetune(dataclasses.replace(auto_config, verbose=2))
        summary = outputs["report"]["auto"]
        rows = single_runs(seed, auto_config)
        labels = list(rows)
        choices = {
            "auto": {"label": outputs["report"]["auto_choice"], "test": outputs["report"][METRIC]},
        }
        for key, label in (
            ("single_split_balanced_accuracy", first_best(labels, [rows[l]["val_balanced_accuracy"] for l in labels])),
            ("single_split_crossentropy", first_best(labels, [rows[l]["val_crossentropy"] if rows[l]["val_crossentropy"] is not None else np.nan for l in labels], lower=True)),
            ("test_best", first_best(labels, [rows[l]["test_balanced_accuracy"] for l in labels])),
        ):
            choices[key] = {"label": label, "test": rows[label]["test_balanced_accuracy"]}
        results[str(seed)] = {
            "choices": choices,
            "candidates": rows,
            "cross_validation": {
                label: {k: row.get(k) for k in ("mean", "std", "fold_scores", "status", "seconds")}
                for label, row in summary["candidates"].items()
            },
            "auto_reason": summary["reason"],
            "single_split_agreement": summary["single_split_agreement"],
            "auto_final_equals_own_run": abs(
                outputs["report"][METRIC] - rows[choices["auto"]["label"]]["test_balanced_accuracy"]
            ) < 1e-9,
            "cross_validation_seconds": summary["cross_validation_seconds"],
        }
        write(results)
        print(json.dumps({"seed": seed, "choices": choices}, indent=1), flush=True)
    if not results:
        raise app.UsageError(f"no results: no seeds given and nothing stored in {FLAGS.output}")
    print(json.dumps(write(results), indent=2))


def write(results):
    """Writes every seed's results and their summary to --output, atomically;
    returns the summary."""
    summary = summarise(results)
    document = {
        "target": FLAGS.target,
        "fraction": FLAGS.fraction,
        "auto_folds": FLAGS.auto_folds,
        "epochs": FLAGS.epochs,
        "environment": training.run_environment(),
        "per_seed": results,
        "summary": summary,
    }
    os.makedirs(os.path.dirname(os.path.abspath(FLAGS.output)), exist_ok=True)
    atomic_write_text(FLAGS.output, json.dumps(document, indent=2) + "\n")
    return summary


if __name__ == "__main__":
    app.run(main)
