"""Compares fine-tuning methods on your own data: methods x fractions x seeds.

Every row (--methods) is searched on validation with the same budget
(--trials runs at --tune_fraction: learning rate x BatchNorm mode, then the
row's own settings), its chosen configuration is run at every target
fraction and seed, and every row is compared with the best baseline (the
baseline row with the lowest tuned validation loss) by paired per-seed
differences with 95% Student-t intervals. The test split is never looked
at when choosing.

Rows (--methods):
{rows}

Writes into --output_dir (default runs/compare/<target>): results_table.md
(mean ± std per row and fraction, the chosen settings, the paired
differences and their verdicts), results.json and accuracy_vs_fraction.png;
every run is cached under --runs_dir, so rerunning an interrupted command
skips the finished runs, and --table_only rebuilds the outputs from the
cache without training. A comparison owns --output_dir while it runs (its
lock file run.lock), and each run of the cache its own directory.

Example:

  python -m apps.compare --target=folder:/data/cells --backbone=resnet50 \\
      --backbone_weights=imagenet --image_size=224 --fractions=0.15,0.3 --seeds=0,1,2
  python -m apps.compare --target=folder:/data/cells --source=folder:/data/pool \\
      --methods=baseline,lp_ft,sjft --quick
"""

import os
import textwrap

from absl import flags

from keras_seltransfer import comparison
from keras_seltransfer import training
from keras_seltransfer.apps import common
from keras_seltransfer.comparison import search
from keras_seltransfer.utils.naming import spec_slug


def _row_list():
    lines = []
    for row in search.ROWS:
        default = " (default)" if row.name in search.DEFAULT_ROWS else ""
        lines.extend(textwrap.wrap(
            f"{row.name:<18} {row.label}, {row.paper}{default}",
            width=78, initial_indent="  ", subsequent_indent=" " * 21,
        ))
    return "\n".join(lines)


__doc__ = __doc__.format(rows=_row_list())

_DEFAULTS = training.FinetuneConfig()

flags.DEFINE_string("target", None, "Target data set spec, e.g. folder:/data/cells or numpy:/data/x.npz.")
flags.DEFINE_string(
    "source", None,
    "Source data set spec: the pool of the joint rows (sjft). Without it the joint rows are "
    "left out of the default rows.",
)
flags.DEFINE_string(
    "backbone", _DEFAULTS.backbone,
    "The backbone: a .keras file (e.g. the pretrain app's output) or a built-in name "
    "(with --backbone_weights).",
)
flags.DEFINE_string(
    "backbone_weights", None, "Weights of a built-in backbone, e.g. imagenet (keras.applications)."
)
flags.DEFINE_integer("image_size", _DEFAULTS.image_size, "Input size.", lower_bound=8)
flags.DEFINE_list(
    "methods", None,
    f"Rows to compare (default: {', '.join(search.DEFAULT_ROWS)}; sjft only with --source).",
)
flags.DEFINE_list(
    "fractions", None,
    f"Target training fractions in (0, 1] (default: {','.join(f'{f:g}' for f in search.FRACTIONS)}; "
    "0.15 with --quick).",
)
flags.DEFINE_list(
    "seeds", None,
    "Seeds of every cell (default: 5 at 15% and 30%, 3 elsewhere; 0,1 with --quick). Paired "
    "differences need at least 2.",
)
flags.DEFINE_list(
    "tune_seeds", None,
    f"Seeds every search trial is scored over (default: {','.join(map(str, search.TUNE_SEEDS))}; "
    "0 with --quick).",
)
flags.DEFINE_float(
    "tune_fraction", None, "Target fraction the search runs at (default: the smallest fraction)."
)
flags.DEFINE_integer(
    "trials", None, f"Search trials per row (default {search.TRIALS}; 4 with --quick).", lower_bound=1
)
flags.DEFINE_integer(
    "epochs", None, f"Epochs of every run (default {search.EPOCHS}; 2 with --quick).", lower_bound=1
)
flags.DEFINE_integer("batch_size", _DEFAULTS.batch_size, "Batch size.", lower_bound=2)
flags.DEFINE_integer(
    "max_source", None,
    "Index only the first N source training images (default: all; 6000 with --quick).",
    lower_bound=1,
)
flags.DEFINE_string(
    "output_dir", None, "Tables, plot and results.json (default: runs/compare/<target>)."
)
flags.DEFINE_string("runs_dir", None, "The run cache (default: <output_dir>/runs).")
flags.DEFINE_boolean(
    "quick", False,
    "A check of the whole pipeline, not a result: one fraction (0.15), seeds 0,1, 2 epochs, "
    "4 trials per row, the search on seed 0, the first 6000 source images.",
)
flags.DEFINE_boolean("table_only", False, "Train nothing: rebuild the outputs from the run cache.")
flags.DEFINE_boolean("plot", True, "Write accuracy_vs_fraction.png (needs matplotlib).")
flags.DEFINE_boolean(
    "force", False,
    "Take over --output_dir and the runs of the cache although their lock files (run.lock) "
    "name another command, when you know it is gone (it ran on another host, whose processes "
    "cannot be checked from here). A lock of a process running on this host is never taken "
    "over; one whose process is gone is taken over without --force.",
)

FLAGS = flags.FLAGS


def _numbers(name, values, kind):
    """`values` (strings of a list flag) as `kind`s, or a ValueError naming the flag."""
    try:
        return [kind(v) for v in values]
    except ValueError:
        expected = "integers" if kind is int else "numbers"
        raise ValueError(
            f"`--{name}` must be a comma-separated list of {expected}. "
            f"Received: {name}={','.join(values)}"
        ) from None


def resolve_settings(flag_values=FLAGS):
    """Turns the flags into a `comparison.ComparisonSettings`.

    Args:
        flag_values: the parsed flags.

    Returns:
        A `ComparisonSettings`.

    Raises:
        ValueError: for a missing --target, unknown --methods, fractions
            outside (0, 1], negative seeds, or --trials smaller than a
            row's stage-1 search.

    Example:

    >>> settings = resolve_settings()  # doctest: +SKIP
    """
    f = flag_values
    quick = f.quick
    if not f.target:
        raise ValueError(
            "`--target` must name the target data set, e.g. folder:/data/cells. "
            f"Received: target={f.target!r}"
        )
    rows = comparison.select_rows(f.methods, f.source)
    fractions = _numbers("fractions", f.fractions, float) if f.fractions else (
        [0.15] if quick else list(search.FRACTIONS)
    )
    if not fractions or any(not 0 < x <= 1 for x in fractions) or len(set(fractions)) < len(fractions):
        raise ValueError(
            "`--fractions` must be distinct numbers in (0, 1]. "
            f"Received: fractions={','.join(f'{x:g}' for x in fractions)}"
        )
    seeds = _numbers("seeds", f.seeds, int) if f.seeds else ([0, 1] if quick else None)
    tune_seeds = _numbers("tune_seeds", f.tune_seeds, int) if f.tune_seeds else (
        [0] if quick else list(search.TUNE_SEEDS)
    )
    for name, values in (("seeds", seeds or []), ("tune_seeds", tune_seeds)):
        if any(s < 0 or s > common.MAX_SEED for s in values) or len(set(values)) < len(values):
            raise ValueError(
                f"`--{name}` must be distinct integers in [0, {common.MAX_SEED}]. "
                f"Received: {name}={','.join(map(str, values))}"
            )
    tune_fraction = f.tune_fraction if f.tune_fraction is not None else min(fractions)
    if not 0 < tune_fraction <= 1:
        raise ValueError(
            f"`--tune_fraction` must be in (0, 1]. Received: tune_fraction={tune_fraction:g}"
        )
    trials = f.trials or (4 if quick else search.TRIALS)
    needed = max(len(search.stage1_trials(row, budget=10**6)) for row in rows)
    if trials < needed:
        raise ValueError(
            f"`--trials` must be at least {needed}, the stage-1 search of "
            f"{[row.name for row in rows if len(search.stage1_trials(row, 10**6)) == needed]}. "
            f"Received: trials={trials}"
        )
    output_dir = f.output_dir or os.path.join("runs", "compare", spec_slug(f.target))
    return comparison.ComparisonSettings(
        rows=rows,
        fractions=fractions,
        seeds=seeds,
        tune_seeds=tune_seeds,
        tune_fraction=tune_fraction,
        epochs=f.epochs or (2 if quick else search.EPOCHS),
        output_dir=output_dir,
        runs_dir=f.runs_dir or os.path.join(output_dir, "runs"),
        backbone=f.backbone,
        backbone_weights=f.backbone_weights,
        target=f.target,
        source=f.source,
        image_size=f.image_size,
        batch_size=f.batch_size,
        # A quick check indexes a slice of a large source pool, not all of it.
        max_source=f.max_source if f.max_source is not None else (
            6000 if quick and f.source else None
        ),
        trials=trials,
        quick=quick,
        table_only=f.table_only,
        force=f.force,
    )


def main(argv):
    common.reject_extra_args(argv)
    try:
        settings = resolve_settings()
        outputs = comparison.compare(settings, plot=FLAGS.plot)
    except common.USER_ERRORS as e:
        common.fail("compare", e)
    runs = len(outputs["document"]["runs"])
    print("\n" + outputs["header"] + "\n\n" + outputs["text"])
    if not outputs["document"]["paired"]:
        print("\nNo paired differences: they need at least 2 seeds shared by a row and the best "
              "baseline (--seeds).")
    print(
        f"\n{runs} cells; {outputs['trained']} runs trained now, the others read from the cache "
        f"{settings.runs_dir}; wrote {', '.join(outputs['written'])}"
    )


def run():
    """Runs the app with the command line's flags."""
    common.run_app(main)


if __name__ == "__main__":
    run()
