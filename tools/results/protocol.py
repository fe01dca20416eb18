"""The deconfounded protocol of tools/reproduce.py (`--protocol=deconfounded`).

The search, runner and tables are the library's (`keras_seltransfer.comparison`,
which `apps.compare` runs on the user's own data); this module adds what is
specific to the documented ELPV reproduction: the linear probe's feature
search over the default backbone's layers, the SJFT controls and the rows
each paper compares with.

What it controls, and how (the protocol statement at the top of RESULTS.md
is this docstring's first list):

- **One search budget for every row.** Each row gets `TRIALS` runs at the
  tuning fraction, each scored by its best validation cross-entropy averaged
  over the tuning seeds. Stage 1 is the same for every fine-tuning row: the
  learning rates `LEARNING_RATES` times the BatchNorm modes (frozen /
  trained; for AdaFilter, whose batch norms are all gated, the gated batch
  norm's mode), at the method's defaults. Stage 2 spends the rest of the budget
  from the best stage-1 trial: first the alternative values of at most two
  method-specific settings (`ProtocolRow.search`), then, for rows with
  fewer settings than trials left, further learning rates next to the best
  one (`EXTRA_LR_FACTORS`), so a row without settings is not tuned less.
  The linear probe's stage 1 is its feature choice (layer, pooling); its
  regularisation strength is chosen on validation inside each trial. The
  test split is never looked at.
- **Equal optimizer steps.** A joint (SJFT-family) step counts as one step:
  the joint rows run `joint_steps="single_task"`, as many steps per epoch as
  fine-tuning, under the same epochs and schedule.
- **Controls that isolate SJFT's selection** (`CONTROLS`): they take the
  configuration chosen for sjft and change one thing: random neighbour
  lists grown and sampled the same way, no repetition of hard images, and
  the paper's ablations (all source images, random source images, no
  growth, Gabor bank).
- **Statistics.** `SEEDS` per fraction (5 at 15% and 30%, 3 elsewhere); each
  row reported as mean ± std and as the paired per-seed difference to the
  best baseline (the baseline row with the lowest tuned validation loss),
  with a 95% Student-t interval; a row is called better or worse only when
  the interval excludes zero.
"""

import dataclasses

from keras_seltransfer.comparison import search
from keras_seltransfer.comparison.search import BASELINE  # noqa: F401
from keras_seltransfer.comparison.search import BATCHNORM_MODES  # noqa: F401
from keras_seltransfer.comparison.search import EPOCHS  # noqa: F401
from keras_seltransfer.comparison.search import FRACTIONS  # noqa: F401
from keras_seltransfer.comparison.search import LEARNING_RATES  # noqa: F401
from keras_seltransfer.comparison.search import METHOD  # noqa: F401
from keras_seltransfer.comparison.search import OVERRIDES  # noqa: F401
from keras_seltransfer.comparison.search import SEEDS  # noqa: F401
from keras_seltransfer.comparison.search import TRIALS  # noqa: F401
from keras_seltransfer.comparison.search import TUNE_SEEDS  # noqa: F401
from keras_seltransfer.comparison.search import ProtocolRow  # noqa: F401
from keras_seltransfer.comparison.search import run_dir  # noqa: F401
from keras_seltransfer.comparison.search import seeds_for  # noqa: F401
from keras_seltransfer.comparison.search import stage1_trials  # noqa: F401
from keras_seltransfer.comparison.search import stage2_trials  # noqa: F401
from keras_seltransfer.comparison.search import trial_slug  # noqa: F401

CONTROL_FRACTIONS = (0.15, 0.3)

# The library's rows, with the linear probe's stage 1 searching the
# features of the default backbone (`small_cnn`'s block outputs) as the
# documented tables were made.
ROWS = tuple(
    dataclasses.replace(
        row,
        search=(("probe_layer", ("block2_relu",)),
                (OVERRIDES, ({"probe_pooling": "flatten", "probe_pool_size": 2},))),
        stage1=(("probe_layer", ("block4_relu", "block3_relu")),
                ("probe_pooling", ("avg", "flatten"))),
    ) if row.name == "linear_probe" else row
    for row in search.ROWS
)
ROWS_BY_NAME = {row.name: row for row in ROWS}

# (name, label, parent, what changes): run with the parent's chosen
# configuration and this one change.
CONTROLS = (
    ("sjft_random_neighbours", "SJFT, random neighbour lists (same growth and sampling)", "sjft",
     {"method": "sjft_random_neighbours"}),
    ("sjft_uniform_draws", "SJFT, lists grow but hard images are not repeated", "sjft",
     {"target_draws": "uniform"}),
    ("sjft_nogrowth", "SJFT without neighbour growth", "sjft", {"method": "sjft_nogrowth"}),
    ("sjft_random", "Joint fine-tuning, random source images", "sjft", {"method": "sjft_random"}),
    ("sjft_all", "Joint fine-tuning, all source images", "sjft", {"method": "sjft_all"}),
    ("sjft_gabor", "SJFT, Gabor filter bank", "sjft", {"index_bank": "gabor"}),
)
CONTROLS_BY_NAME = {c[0]: c for c in CONTROLS}

# (method row, reference row): what each paper claims to improve on. Every
# paper compares with fine-tuning; KTFT's knowledge-transfer losses are also
# compared with anti-aliased fine-tuning alone, the same model without them.
PAPER_REFERENCES = (
    ("sjft", "baseline"),
    ("adafilter", "baseline"),
    ("filter_transfer", "baseline"),
    ("antialias_ft", "baseline"),
    ("ktft", "baseline"),
    ("ktft", "antialias_ft"),
)


def validate_rows(rows=ROWS, controls=CONTROLS):
    """Checks the rows (`search.validate_rows`) and that every control names
    a known parent row and method.

    Raises:
        ValueError: naming the first offending row or control.

    Example:

    >>> validate_rows()
    """
    from keras_seltransfer import methods

    search.validate_rows(rows)
    names = methods.names()
    for name, _, parent, change in controls:
        if parent not in ROWS_BY_NAME:
            raise ValueError(f"Control {name!r} names an unknown parent row {parent!r}.")
        if change.get("method", "sjft") not in names:
            raise ValueError(f"Control {name!r} names an unknown method {change['method']!r}.")


__all__ = [
    "CONTROLS",
    "PAPER_REFERENCES",
    "ROWS",
    "validate_rows",
]
