r"""Reproduces the comparisons of docs/results/RESULTS.md on real data, at CPU scale.

Source: Fashion-MNIST (the backbone is pretrained on it, and its training split
is the pool of selective joint fine-tuning). Target: ELPV solar cells,
defective vs functional, with a fixed held-out test split (or `--target`,
e.g. `textures`).

The default, `--protocol=deconfounded` (`tools/results/protocol.py` states
it), is the comparison a practitioner should trust: the strongest simple
baselines (linear probe, LP-FT, fine-tuning, class-balanced fine-tuning,
L2-SP, DELTA, BSS) beside the selective methods, every row searched on
validation with the same budget over learning rate, BatchNorm mode and at
most two of its own settings, joint rows at equal optimizer steps, controls
that isolate SJFT's selection, 5 seeds at 15% and 30%, and paired
differences to the best baseline with 95% intervals. Outputs go to
docs/results/deconfounded/<target>/ (runs under runs/deconfounded/<target>):
results.json, results_table.md, validation_curves.png and
accuracy_vs_fraction.png; the target's table is also spliced into
docs/results/RESULTS.md between its `<!-- deconfounded-table:<target> -->`
markers when that file has them (`--summary`).

  python tools/reproduce.py                                   # ELPV, every fraction (many CPU hours)
  python tools/reproduce.py --fractions=0.15                  # the 15% table only
  python tools/reproduce.py --target=textures --fractions=0.15,0.3
  python tools/reproduce.py --quick                           # a pipeline check in minutes
  python tools/reproduce.py --table_only                      # rebuild tables and plots from the cache

`--protocol=paper` runs the papers' own comparisons, as the earlier table of
RESULTS.md was made: every row gets one run per candidate learning rate
(`--tune_lrs`) at `--tune_fraction` with seed 0, the lowest validation
cross-entropy is kept for every fraction and seed, and the paper ablations
run beside; its outputs go to docs/results/ (the table between the
`<!-- results-table -->` markers of RESULTS.md) with the retrieval,
neighbour-growth, gate-usage and shift-consistency plots.

Every run is cached as soon as it is done: rerunning the command skips
finished runs, so an interrupted reproduction continues where it stopped. A
cached run whose stored configuration differs from what is asked (say,
another epoch budget) is an error, not silently reused. The test split is
never looked at when choosing.

The deconfounded protocol is a preset of the library's comparison
(`keras_seltransfer.comparison`, which `apps.compare` runs on the user's own
target, source and backbone): the same search, run cache, tables,
statistics and plot; tools/results/ adds what is specific to this
reproduction: the linear probe's feature search on the default backbone,
the SJFT controls, the paper claims (`protocol`, `protocol_runner`,
`protocol_tables`), and the papers' own protocol (`grid`, `runner`,
`tables`, `plots`).
"""

import os
import time

import common  # tools/common.py: environment, repository root on sys.path

common.repeatable_cpu_arithmetic()

from absl import app  # noqa: E402
from absl import flags  # noqa: E402

from tools.results import grid  # noqa: E402
from tools.results import plots  # noqa: E402
from tools.results import protocol  # noqa: E402
from tools.results import protocol_runner  # noqa: E402
from tools.results import protocol_tables  # noqa: E402
from tools.results import runner  # noqa: E402
from tools.results import tables  # noqa: E402

flags.DEFINE_enum(
    "protocol", "deconfounded", ["deconfounded", "paper"],
    "deconfounded: the strongest baselines beside every method, one search budget per row "
    "over learning rate, BatchNorm mode and the row's own settings, equal optimizer steps, "
    "SJFT controls, paired differences to the best baseline. paper: the papers' comparisons "
    "(one learning rate chosen per row), the earlier table of RESULTS.md.",
)
flags.DEFINE_string(
    "summary", None,
    "deconfounded: a Markdown file whose `<!-- deconfounded-table:<target> -->` block gets the "
    "target's tables, when it has that pair of markers (default: docs/results/RESULTS.md for a "
    "full run; none with --quick or --output_dir).",
)
flags.DEFINE_list(
    "controls", None,
    f"deconfounded: SJFT controls to run (default: all): {', '.join(protocol.CONTROLS_BY_NAME)}.",
)
flags.DEFINE_integer(
    "trials", None,
    f"deconfounded: search trials per row (default {protocol.TRIALS}; 4 with --quick).",
    lower_bound=1,
)
flags.DEFINE_list(
    "tune_seeds", None, "deconfounded: seeds every search trial is scored over (default 0,1)."
)
flags.DEFINE_boolean(
    "quick", False,
    "One seed, two fractions (0.15, 0.3), 3 epochs, one learning rate, a 6,000-image "
    "source pool: a check of the whole pipeline in minutes, not a result.",
)
flags.DEFINE_list("rows", None, f"Rows to run (default: all): {', '.join(grid.ROWS_BY_NAME)}.")
flags.DEFINE_list("fractions", None, "Target training fractions (default: 0.15,0.3,0.5,1).")
flags.DEFINE_list("seeds", None, "Seeds (default: 0,1,2).")
flags.DEFINE_string("target", "elpv", "Target data set spec.")
flags.DEFINE_string("source", "fashion_mnist", "Source data set spec (pretraining and the SJFT pool).")
flags.DEFINE_string(
    "backbone", None,
    "Pretrained backbone (.keras). Default: the pretrain app's output, trained first when "
    "missing (a short pretraining under --quick).",
)
flags.DEFINE_string(
    "output_dir", None,
    "Where runs, tables and plots go (default: docs/results, runs under runs/reproduce; "
    "with --quick: runs/reproduce_quick).",
)
flags.DEFINE_string("runs_dir", None, "Run cache (default: <output_dir>/runs, or runs/reproduce).")
flags.DEFINE_integer("image_size", 64, "Input size.", lower_bound=8)
flags.DEFINE_integer("epochs", None, "Epochs per run (default 20; 3 with --quick).", lower_bound=1)
flags.DEFINE_integer(
    "patience", None, "Early-stopping patience (default: the epoch budget, so every run trains "
    "all epochs and keeps its best validation epoch).", lower_bound=1,
)
flags.DEFINE_integer("batch_size", 32, "Batch size.", lower_bound=2)
flags.DEFINE_list(
    "tune_lrs", None, "Candidate learning rates of every row (default 1e-3,3e-4; 1e-3 with --quick)."
)
flags.DEFINE_float("tune_fraction", 0.15, "Target fraction the learning rate is chosen at.")
flags.DEFINE_integer(
    "max_source", None, "Use only the first N source training images (default: all; 6000 with --quick)."
)
flags.DEFINE_boolean("table_only", False, "Train nothing: rebuild tables and plots from the cache.")
flags.DEFINE_boolean(
    "investigations", True,
    "Also run the ablations of the second table (at 15%, every seed) for the rows run.",
)
flags.DEFINE_boolean("plots", True, "Write the PNG plots.")
flags.DEFINE_boolean(
    "shift", True, "Measure the shift consistency of the baseline and anti-aliased rows' models."
)
FLAGS = flags.FLAGS


def resolve_settings():
    """Turns the flags into `grid.Settings` (defaults depend on --quick)."""
    from keras_seltransfer import training

    quick = FLAGS.quick
    names = FLAGS.rows or list(grid.ROWS_BY_NAME)
    unknown = [n for n in names if n not in grid.ROWS_BY_NAME]
    if unknown:
        raise app.UsageError(f"Unknown rows {unknown}; expected some of {list(grid.ROWS_BY_NAME)}.")
    default_fractions = grid.QUICK_FRACTIONS if quick else grid.FULL_FRACTIONS
    fractions = [float(f) for f in (FLAGS.fractions or default_fractions)]
    if any(not 0 < f <= 1 for f in fractions):
        raise app.UsageError(f"--fractions must be in (0, 1]. Received: {fractions}")
    seeds = [int(s) for s in (FLAGS.seeds or (["0"] if quick else ["0", "1", "2"]))]
    lrs = [float(x) for x in (FLAGS.tune_lrs or (["1e-3"] if quick else ["1e-3", "3e-4"]))]
    if any(x <= 0 for x in lrs):
        raise app.UsageError(f"--tune_lrs must be positive. Received: {lrs}")
    epochs = FLAGS.epochs or (3 if quick else 20)
    output_dir = FLAGS.output_dir or (
        os.path.join("runs", "reproduce_quick") if quick else os.path.join("docs", "results")
    )
    runs_dir = FLAGS.runs_dir or (
        os.path.join(output_dir, "runs") if (quick or FLAGS.output_dir) else os.path.join("runs", "reproduce")
    )
    backbone = FLAGS.backbone or (
        os.path.join(runs_dir, "pretrain", "model.keras") if quick and not os.path.isfile(
            training.DEFAULT_BACKBONE
        ) else training.DEFAULT_BACKBONE
    )
    return grid.Settings(
        rows=[row for row in grid.ROWS if row.name in names],
        fractions=fractions,
        seeds=seeds,
        lrs=lrs,
        epochs=epochs,
        patience=FLAGS.patience or epochs,
        output_dir=output_dir,
        runs_dir=runs_dir,
        backbone=backbone,
        max_source=FLAGS.max_source if FLAGS.max_source is not None else (6000 if quick else None),
        quick=quick,
        target=FLAGS.target,
        source=FLAGS.source,
        image_size=FLAGS.image_size,
        batch_size=FLAGS.batch_size,
        tune_fraction=FLAGS.tune_fraction,
        table_only=FLAGS.table_only,
    )


def resolve_protocol_settings():
    """Turns the flags into `protocol_runner.ProtocolSettings`."""
    from keras_seltransfer import training
    from keras_seltransfer.utils.naming import spec_slug

    quick = FLAGS.quick
    names = FLAGS.rows or list(protocol.ROWS_BY_NAME)
    unknown = [n for n in names if n not in protocol.ROWS_BY_NAME]
    if unknown:
        raise app.UsageError(
            f"Unknown rows {unknown}; expected some of {list(protocol.ROWS_BY_NAME)}."
        )
    controls = FLAGS.controls if FLAGS.controls is not None else list(protocol.CONTROLS_BY_NAME)
    unknown = [n for n in controls if n not in protocol.CONTROLS_BY_NAME]
    if unknown:
        raise app.UsageError(
            f"Unknown controls {unknown}; expected some of {list(protocol.CONTROLS_BY_NAME)}."
        )
    default_fractions = ("0.15",) if quick else protocol.FRACTIONS
    fractions = [float(f) for f in (FLAGS.fractions or default_fractions)]
    if any(not 0 < f <= 1 for f in fractions):
        raise app.UsageError(f"--fractions must be in (0, 1]. Received: {fractions}")
    seeds = [int(s) for s in FLAGS.seeds] if FLAGS.seeds else ([0] if quick else None)
    tune_seeds = [int(s) for s in (FLAGS.tune_seeds or (["0"] if quick else protocol.TUNE_SEEDS))]
    slug = spec_slug(FLAGS.target)
    output_dir = FLAGS.output_dir or (
        os.path.join("runs", "deconfounded_quick", slug) if quick
        else os.path.join("docs", "results", "deconfounded", slug)
    )
    runs_dir = FLAGS.runs_dir or (
        os.path.join(output_dir, "runs") if (quick or FLAGS.output_dir)
        else os.path.join("runs", "deconfounded", slug)
    )
    backbone = FLAGS.backbone or (
        os.path.join(runs_dir, "pretrain", "model.keras") if quick and not os.path.isfile(
            training.DEFAULT_BACKBONE
        ) else training.DEFAULT_BACKBONE
    )
    return protocol_runner.ProtocolSettings(
        rows=[row for row in protocol.ROWS if row.name in names],
        controls=[name for name in protocol.CONTROLS_BY_NAME if name in controls],
        fractions=fractions,
        seeds=seeds,
        tune_seeds=tune_seeds,
        tune_fraction=FLAGS.tune_fraction,
        control_fractions=[f for f in protocol.CONTROL_FRACTIONS if f in fractions] or fractions[:1],
        epochs=FLAGS.epochs or (2 if quick else protocol.EPOCHS),
        output_dir=output_dir,
        runs_dir=runs_dir,
        backbone=backbone,
        target=FLAGS.target,
        source=FLAGS.source,
        image_size=FLAGS.image_size,
        batch_size=FLAGS.batch_size,
        max_source=FLAGS.max_source if FLAGS.max_source is not None else (6000 if quick else None),
        trials=FLAGS.trials or (4 if quick else protocol.TRIALS),
        quick=quick,
        table_only=FLAGS.table_only,
        summary=FLAGS.summary or (
            None if quick or FLAGS.output_dir else os.path.join("docs", "results", "RESULTS.md")
        ),
    )


def main_deconfounded():
    """The deconfounded protocol: search, grid, controls, tables, plots."""
    settings = resolve_protocol_settings()
    grid.import_methods()
    started = time.time()
    run = protocol_runner.ProtocolRunner(settings)
    with common.errors_reported(ValueError):
        protocol.validate_rows(
            settings.rows, [protocol.CONTROLS_BY_NAME[name] for name in settings.controls]
        )
        os.makedirs(settings.output_dir, exist_ok=True)
        run.ensure_backbone()
        choices, results = run.collect()
        controls = run.collect_controls(choices)
    from keras_seltransfer import training

    environment = training.run_environment()
    header = protocol_tables.settings_text(
        settings, choices, results, controls, run.run_seconds, environment
    )
    text, paired = protocol_tables.body(settings, choices, results, controls)
    document = {
        "protocol": protocol.__doc__,
        "settings": header,
        "environment": environment,
        "best_baseline": protocol_runner.best_baseline(choices),
        "choices": choices,
        "runs": results,
        "controls": controls,
        "paired": paired,
    }
    written = protocol_tables.write_outputs(settings, header, text, document)
    if FLAGS.plots and results:
        path = os.path.join(settings.output_dir, "accuracy_vs_fraction.png")
        plots.plot_accuracy(settings, results, path)
        curves = protocol_tables.validation_curves(settings, choices, results)
        written.append(path)
        if curves:
            path = os.path.join(settings.output_dir, "validation_curves.png")
            protocol_tables.plot_validation_curves(settings, curves, path)
            written.append(path)
    print("\n" + header + "\n\n" + text)
    print(
        f"\n{len(results)} cells and {len(controls)} control cells; this invocation took "
        f"{time.time() - started:.0f} s; wrote {', '.join(written)}"
    )


def main(argv):
    common.reject_arguments(argv)
    if FLAGS.protocol == "deconfounded":
        return main_deconfounded()
    settings = resolve_settings()
    grid.validate_rows()
    grid.import_methods()
    started = time.time()
    os.makedirs(settings.output_dir, exist_ok=True)
    run = runner.Runner(settings)
    with common.errors_reported(ValueError):
        run.ensure_backbone()
        choices, results = run.collect()
        investigations = run.collect_investigations(choices) if FLAGS.investigations else []
    shift = run.collect_shift(results) if FLAGS.shift else {}
    from keras_seltransfer import training

    environment = training.run_environment()
    header = tables.settings_text(settings, results, run.run_seconds, environment)
    body = tables.body(settings, choices, results, investigations, shift)
    tables.write_tables(
        settings.output_dir,
        header,
        body,
        tables.results_document(header, environment, choices, results, investigations, shift),
    )
    written = plots.write_plots(settings, results, shift) if FLAGS.plots else []
    print("\n" + header + "\n\n" + body)
    print(
        f"\n{len(results)} runs in the table; this invocation took {time.time() - started:.0f} s; "
        f"wrote {settings.output_dir}/results.json, results_table.md, RESULTS.md"
        + (f", {', '.join(written)}" if written else "")
    )


if __name__ == "__main__":
    app.run(main)
