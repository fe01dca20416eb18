r"""Fine-tuning accuracy over target-data fractions and seeds, with a results table.

Runs `keras_seltransfer.training.finetune` for every (row, fraction, seed)
with one fixed hyperparameter budget, caching each run's report in
<output_dir>/<row>-<fraction>-seed<seed>/report.json as soon as it is done:
rerunning the command skips finished runs, so an interrupted sweep continues
where it stopped. At the end it writes results.md and results.json (mean and
population std over seeds of accuracy and balanced accuracy) and prints the
table.

Rows:
  baseline  plain fine-tuning of the pretrained backbone (BatchNorm frozen)
  l2sp      fine-tuning with the L2-SP penalty
  scratch   the same network trained from random initialisation
  baseline_bntrain  plain fine-tuning with BatchNorm trained (as the sjft rows)
  sjft      selective joint fine-tuning with the source set's nearest images
            (index from --index_dir, built there when missing)
  sjft_nogrowth, sjft_all, sjft_random   its ablations (no neighbour growth,
            all source images, as many random source images)
  sjft_scratch  selective joint training from random initialisation

  python tools/low_data_sweep.py --rows=baseline,l2sp --fractions=0.15,0.3,0.5,1 --seeds=0,1,2
  python tools/low_data_sweep.py --rows=baseline,sjft,scratch,sjft_scratch --fractions=0.15,1
"""

import json
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app  # noqa: E402
from absl import flags  # noqa: E402

ROWS = {
    "baseline": {"method": "baseline"},
    "l2sp": {"method": "l2sp"},
    "scratch": {"method": "baseline", "from_scratch": True},
    "baseline_bntrain": {"method": "baseline", "batchnorm": "train"},
    "sjft": {"method": "sjft"},
    "sjft_nogrowth": {"method": "sjft_nogrowth"},
    "sjft_all": {"method": "sjft_all"},
    "sjft_random": {"method": "sjft_random"},
    "sjft_scratch": {"method": "sjft", "from_scratch": True},
}

flags.DEFINE_list("rows", ["baseline", "l2sp"], f"Rows to run, from {sorted(ROWS)}.")
flags.DEFINE_list("fractions", ["0.15", "0.3", "0.5", "1"], "Target training fractions.")
flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds.")
flags.DEFINE_string("target", "elpv", "Target data set spec.")
flags.DEFINE_string("backbone", None, "Backbone (default: the pretrain app's output).")
flags.DEFINE_string("output_dir", os.path.join("runs", "sweep"), "Where runs and tables go.")
flags.DEFINE_string("source", "fashion_mnist", "Source data set of the sjft rows.")
flags.DEFINE_string(
    "index_dir", None, "Neighbour index of the sjft rows (default: FinetuneConfig's)."
)
flags.DEFINE_integer("image_size", 64, "Input size.")
flags.DEFINE_integer("epochs", 30, "Maximum epochs per run.")
flags.DEFINE_integer("patience", 8, "Early-stopping patience.")
flags.DEFINE_integer("batch_size", 32, "Batch size.")
flags.DEFINE_float("learning_rate", 1e-3, "Learning rate.")
flags.DEFINE_boolean(
    "table_only", False, "Only tabulate finished runs (a missing cell shows '-'); train nothing."
)
FLAGS = flags.FLAGS


def _table(results, rows, fractions):
    from keras_seltransfer.training import mean_std

    lines = [
        "| row | " + " | ".join(f"{float(f):.0%} of training data" for f in fractions) + " |",
        "|---|" + "---|" * len(fractions),
    ]
    for row in rows:
        cells = []
        for f in fractions:
            runs = [r for r in results if r["row"] == row and r["fraction"] == float(f)]
            if not runs:
                cells.append("-")
                continue
            acc = mean_std([r["accuracy"] for r in runs])
            bal = mean_std([r["balanced_accuracy"] for r in runs])
            cells.append(
                f"{acc[0]:.3f} ± {acc[1]:.3f} / {bal[0]:.3f} ± {bal[1]:.3f} (n={len(runs)})"
            )
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    unknown = [r for r in FLAGS.rows if r not in ROWS]
    if unknown:
        raise app.UsageError(f"Unknown rows {unknown}; expected some of {sorted(ROWS)}")
    from keras_seltransfer import training
    from keras_seltransfer.utils.io import atomic_write_text

    backbone = FLAGS.backbone or training.DEFAULT_BACKBONE
    results = []
    started = time.time()
    for row in FLAGS.rows:
        for fraction in FLAGS.fractions:
            for seed in FLAGS.seeds:
                run_dir = os.path.join(FLAGS.output_dir, f"{row}-{float(fraction):g}-seed{seed}")
                report_path = os.path.join(run_dir, "report.json")
                if not os.path.isfile(report_path) and FLAGS.table_only:
                    continue
                if not os.path.isfile(report_path):
                    config = training.FinetuneConfig(
                        target=FLAGS.target,
                        backbone=backbone,
                        output_dir=run_dir,
                        fraction=float(fraction),
                        seed=int(seed),
                        image_size=FLAGS.image_size,
                        epochs=FLAGS.epochs,
                        patience=FLAGS.patience,
                        batch_size=FLAGS.batch_size,
                        learning_rate=FLAGS.learning_rate,
                        export=False,
                        tensorboard=False,
                        verbose=0,
                        source=FLAGS.source,
                        index_dir=FLAGS.index_dir,
                        **ROWS[row],
                    )
                    training.finetune(config)
                with open(report_path) as f:
                    report = json.load(f)
                results.append(
                    {
                        "row": row,
                        "fraction": float(fraction),
                        "seed": int(seed),
                        "accuracy": report["accuracy"],
                        "balanced_accuracy": report["balanced_accuracy"],
                        "epochs_run": report["epochs_run"],
                        "seconds": report["seconds"],
                    }
                )
                print(
                    f"{row:>9} fraction {float(fraction):<4g} seed {seed}: accuracy "
                    f"{report['accuracy']:.4f}, balanced {report['balanced_accuracy']:.4f}, "
                    f"{report['epochs_run']} epochs, {report['seconds']:.0f} s",
                    flush=True,
                )
    table = _table(results, FLAGS.rows, FLAGS.fractions)
    env = training.run_environment()
    header = (
        f"Target {FLAGS.target}, backbone {backbone}, {FLAGS.image_size}px, Adam "
        f"lr {FLAGS.learning_rate:g}, batch {FLAGS.batch_size}, up to {FLAGS.epochs} epochs "
        f"with early stopping (patience {FLAGS.patience}) on validation cross-entropy; "
        f"cells: test accuracy / balanced accuracy, mean ± std over seeds "
        f"{','.join(FLAGS.seeds)}. {env['machine']}, TensorFlow {env['tensorflow']}, "
        f"Keras {env['keras']}."
    )
    if any(row.startswith("sjft") for row in FLAGS.rows):
        joint = training.FinetuneConfig(source=FLAGS.source, index_dir=FLAGS.index_dir)
        header += (
            f" sjft rows: source {joint.source} (index {joint.index_dir}), batches half "
            f"target / half source, BatchNorm trained on the mixed batch, k0 {joint.k0}, "
            f"growth every {joint.growth_period} epochs by {joint.sigma0:g}/{joint.sigma1:g} x k0 "
            f"up to {joint.k_max}; loss {joint.target_weight:g} x target CE + "
            f"{joint.source_weight:g} x source CE."
        )
    atomic_write_text(os.path.join(FLAGS.output_dir, "results.md"), header + "\n\n" + table + "\n")
    atomic_write_text(
        os.path.join(FLAGS.output_dir, "results.json"),
        json.dumps({"settings": header, "runs": results}, indent=2) + "\n",
    )
    print("\n" + header + "\n\n" + table)
    print(f"\n{len(results)} runs in {time.time() - started:.0f} s of this invocation")


if __name__ == "__main__":
    app.run(main)
