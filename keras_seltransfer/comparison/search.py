"""The rows of a comparison and the search every row gets on validation.

What the search controls, and how:

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
  The linear probe's stage 1 is its feature choice; its regularisation
  strength is chosen on validation inside each trial. The test split is
  never looked at.
- **Equal optimizer steps.** A joint (SJFT-family) step counts as one step:
  the joint rows run `joint_steps="single_task"`, as many steps per epoch as
  fine-tuning, under the same epochs and schedule.
- **Statistics.** `SEEDS` per fraction (5 at 15% and 30%, 3 elsewhere); each
  row reported as mean ± std and as the paired per-seed difference to the
  best baseline (the baseline row with the lowest tuned validation loss),
  with a 95% Student-t interval; a row is called better or worse only when
  the interval excludes zero.

`ROWS` are the rows that apply to any backbone: the strongest simple
baselines (linear probe, LP-FT, fine-tuning, class-balanced fine-tuning,
L2-SP, DELTA, BSS) and the selective methods.
"""

import dataclasses
import itertools
import os

# Stage 1 of every fine-tuning row.
LEARNING_RATES = (1e-3, 3e-4)
BATCHNORM_MODES = ("frozen", "train")
# Runs per row at the tuning fraction (per tuning seed).
TRIALS = 6
# Learning rates stage 2 tries next to the best stage-1 one, in this order.
EXTRA_LR_FACTORS = (1 / 3, 3.0)
TUNE_SEEDS = (0, 1)
SEEDS = {0.15: (0, 1, 2, 3, 4), 0.3: (0, 1, 2, 3, 4), 0.5: (0, 1, 2), 1.0: (0, 1, 2)}
FRACTIONS = (0.15, 0.3, 0.5, 1.0)
EPOCHS = 30

BASELINE = "baseline"
METHOD = "method"


@dataclasses.dataclass(frozen=True)
class ProtocolRow:
    """One row of a comparison table.

    Attributes:
        name: short name (cache directory, `--methods`).
        label: what the table calls it.
        paper: where the row comes from.
        kind: `"baseline"` (a candidate for the best baseline) or `"method"`.
        overrides: FinetuneConfig fields that define the row.
        search: stage-2 settings, `((field, (alternative values...)), ...)`,
            at most two fields.
        stage1: stage-1 dimensions, `((field, values), ...)`; None: the
            learning rates times the BatchNorm modes.

    Example:

    >>> row = ProtocolRow("l2sp", "L2-SP", "Li et al. 2018", BASELINE,
    ...                   {"method": "l2sp"}, search=(("l2sp_alpha", (0.01,)),))
    >>> [name for name, _ in row.stage1_dimensions()]
    ['learning_rate', 'batchnorm']
    """

    name: str
    label: str
    paper: str
    kind: str
    overrides: dict
    search: tuple = ()
    stage1: tuple = None

    def stage1_dimensions(self):
        """The stage-1 grid's dimensions."""
        if self.stage1 is not None:
            return self.stage1
        return (("learning_rate", LEARNING_RATES), ("batchnorm", BATCHNORM_MODES))


JOINT = {"joint_steps": "single_task"}
# A search entry whose values are dicts of several fields changed together.
OVERRIDES = "overrides"

ROWS = (
    # The backbone's own features (its pooled output): the layer names of an
    # arbitrary backbone are unknown, so the probe's one trial reads the
    # features the classifier head reads; its C is searched inside the trial.
    ProtocolRow("linear_probe", "Linear probe (frozen features, logistic regression)",
                "Kumar et al. 2022", BASELINE, {"method": "linear_probe"},
                stage1=(("probe_pooling", ("avg",)),)),
    ProtocolRow("lp_ft", "LP-FT (probe, then fine-tune everything)", "Kumar et al. 2022",
                BASELINE, {"method": "lp_ft"}, search=(("lp_ft_lr_scale", (1.0,)),)),
    ProtocolRow("baseline", "Fine-tuning", "-", BASELINE, {"method": "baseline"}),
    ProtocolRow("baseline_balanced", "Class-balanced fine-tuning", "-", BASELINE,
                {"method": "baseline", "class_weight": "balanced"},
                search=((OVERRIDES, ({"class_weight": "none", "sampling": "balanced"},)),)),
    ProtocolRow("l2sp", "L2-SP", "Li et al. 2018", BASELINE, {"method": "l2sp"},
                search=(("l2sp_alpha", (0.01,)),)),
    ProtocolRow("delta", "DELTA", "Li et al. 2019", BASELINE, {"method": "delta"},
                search=(("delta_alpha", (0.01,)), ("delta_attention", (False,)))),
    ProtocolRow("bss", "BSS", "Chen et al. 2019", BASELINE, {"method": "bss"},
                search=(("bss_eta", (0.01,)),)),
    ProtocolRow("sjft", "SJFT (selective joint fine-tuning)", "Ge & Yu 2017", METHOD,
                {"method": "sjft", **JOINT},
                search=(("max_level", (0,)), ("joint_bn_stats", ("target",)))),
    # AdaFilter's batch norms are its gated ones (`gated_batchnorm`); every
    # conv of the backbone is gated, so `batchnorm` would change nothing.
    ProtocolRow("adafilter", "AdaFilter", "Guo et al. 2020", METHOD, {"method": "adafilter"},
                search=(("gate_lr_multiplier", (1.0,)), ("gate_estimator", ("gumbel",))),
                stage1=(("learning_rate", LEARNING_RATES), ("gated_batchnorm", BATCHNORM_MODES))),
    ProtocolRow("filter_transfer", "Selective filter transfer", "Jung & Kim 2019", METHOD,
                {"method": "filter_transfer"},
                search=(("transfer_ratio", (0.75,)), ("reinit_next", (True,)))),
    ProtocolRow("antialias_ft", "Anti-aliased fine-tuning", "IEEE Access 2022",
                METHOD, {"method": "antialias_ft"}, search=(("blur_filt_size", (2,)),)),
    ProtocolRow("ktft", "KTFT (anti-aliased, knowledge-transferred)", "IEEE Access 2022",
                METHOD, {"method": "ktft"}, search=(("blur_filt_size", (2,)),)),
)
ROWS_BY_NAME = {row.name: row for row in ROWS}
# The rows a comparison runs when none are named: the simple baselines
# beside every selective method (the joint one only with a source set).
DEFAULT_ROWS = (
    "linear_probe", "lp_ft", "baseline", "sjft", "adafilter", "filter_transfer",
    "antialias_ft", "ktft",
)


def is_joint_row(row):
    """Whether a row trains on source images too (needs a source and an index).

    Example:

    >>> is_joint_row(ROWS_BY_NAME["sjft"]), is_joint_row(ROWS_BY_NAME["baseline"])
    (True, False)
    """
    from keras_seltransfer import methods

    return methods.get(row.overrides["method"]).joint


def select_rows(methods=None, source=None, rows=ROWS):
    """The rows a comparison runs, by name, in table order.

    Args:
        methods: row names, or None for `DEFAULT_ROWS` (without the joint rows
            when there is no `source`).
        source: the source data set spec, or None.
        rows: the rows to choose from.

    Returns:
        A list of `ProtocolRow`s, in the order of `rows`.

    Raises:
        ValueError: for an unknown or repeated name, no name at all, or a
            joint row without a `source`.

    Example:

    >>> [row.name for row in select_rows(["baseline", "linear_probe"])]
    ['linear_probe', 'baseline']
    """
    by_name = {row.name: row for row in rows}
    names = methods
    if names is None:
        names = [n for n in DEFAULT_ROWS if n in by_name
                 and (source is not None or not is_joint_row(by_name[n]))]
    names = list(names)
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise ValueError(
            f"`methods` must name rows among {list(by_name)}. Unknown: {unknown}. "
            f"Received: methods={','.join(names)}"
        )
    if not names or len(set(names)) != len(names):
        raise ValueError(
            "`methods` must name at least one row, each once. "
            f"Received: methods={','.join(names)}"
        )
    chosen = [row for row in rows if row.name in names]
    joint = [row.name for row in chosen if is_joint_row(row)]
    if joint and source is None:
        raise ValueError(
            f"The rows {joint} train on source images too: `source` must name the source "
            f"data set. Received: source={source!r}"
        )
    return chosen


def validate_rows(rows=ROWS):
    """Checks that every row names a known method and known configuration
    fields, and that no row searches more than two settings.

    Raises:
        ValueError: naming the first offending row.

    Example:

    >>> validate_rows()
    """
    from keras_seltransfer import methods
    from keras_seltransfer import training

    fields = {f.name for f in dataclasses.fields(training.FinetuneConfig)}
    names = methods.names()
    for row in rows:
        if row.overrides.get("method") not in names:
            raise ValueError(
                f"Row {row.name!r} must name a method in {list(names)}. "
                f"Received: method={row.overrides.get('method')!r}"
            )
        if len(row.search) > 2:
            raise ValueError(
                f"Row {row.name!r} may search at most two settings. Received: {len(row.search)}"
            )
        searched = set()
        for field, values in row.search:
            searched |= set().union(*values) if field == OVERRIDES else {field}
        used = set(row.overrides) | searched | {f for f, _ in row.stage1_dimensions()}
        unknown = sorted((used - fields) - {"index_bank"})
        if unknown:
            raise ValueError(f"Row {row.name!r} sets unknown configuration fields {unknown}.")


def stage1_trials(row, budget=TRIALS):
    """The stage-1 trials of a row: every point of its stage-1 grid.

    Args:
        row: the `ProtocolRow`.
        budget: trials per row; the stage-1 grid must fit in it.

    Returns:
        A list of dicts of FinetuneConfig overrides (the row's own included).

    Raises:
        ValueError: if the stage-1 grid is larger than `budget`.

    Example:

    >>> [t["batchnorm"] for t in stage1_trials(ROWS_BY_NAME["baseline"])]
    ['frozen', 'train', 'frozen', 'train']
    """
    dims = row.stage1_dimensions()
    names = [name for name, _ in dims]
    trials = []
    for values in itertools.product(*(v for _, v in dims)):
        trials.append({**row.overrides, **dict(zip(names, values))})
    if len(trials) > budget:
        raise ValueError(
            f"Row {row.name!r} has {len(trials)} stage-1 trials; the budget is {budget}. "
            f"Received: budget={budget}"
        )
    return trials


def stage2_trials(row, best, budget=TRIALS):
    """The stage-2 trials of a row from its best stage-1 trial.

    First one trial per alternative value of each search setting, then
    learning rates next to the best one (for rows whose stage 1 searches
    the learning rate), until the row has `budget` trials in all.

    Args:
        row: the `ProtocolRow`.
        best: the best stage-1 trial (a dict of overrides).
        budget: trials per row.

    Returns:
        A list of dicts of overrides.

    Example:

    >>> best = {"method": "baseline", "learning_rate": 1e-3, "batchnorm": "train"}
    >>> [t["learning_rate"] for t in stage2_trials(ROWS_BY_NAME["baseline"], best)]
    [0.0003333333333333333, 0.003]
    """
    left = budget - len(stage1_trials(row, budget))
    trials = []
    for field, values in row.search:
        for value in values:
            trials.append({**best, **value} if field == OVERRIDES else {**best, field: value})
    if "learning_rate" in dict(row.stage1_dimensions()):
        tried = set(dict(row.stage1_dimensions())["learning_rate"])
        for factor in EXTRA_LR_FACTORS:
            lr = best["learning_rate"] * factor
            if not any(abs(lr - t) / t < 0.05 for t in tried):
                trials.append({**best, "learning_rate": lr})
    return trials[:left]


def trial_slug(trial, base):
    """A readable, file-system-safe name of a trial's overrides beyond `base`.

    Example:

    >>> trial_slug({"method": "sjft", "learning_rate": 0.001, "batchnorm": "train"}, {"method": "sjft"})
    'batchnorm=train,learning_rate=0.001'
    """
    parts = []
    for key in sorted(trial):
        if key in base and base[key] == trial[key]:
            continue
        value = trial[key]
        text = f"{value:.3g}" if isinstance(value, float) else str(value)
        parts.append(f"{key}={text}")
    return ",".join(parts) or "defaults"


def run_dir(runs_dir, row_name, trial, base, fraction, seed):
    """The cache directory of one run of a comparison.

    Example:

    >>> run_dir("runs", "baseline", {"method": "baseline"}, {"method": "baseline"}, 0.15, 2)
    'runs/baseline/defaults-f0.15-seed2'
    """
    return os.path.join(runs_dir, row_name, f"{trial_slug(trial, base)}-f{fraction:g}-seed{seed}")


def seeds_for(fraction, seeds=None):
    """The seeds of one fraction (`SEEDS`, or `seeds` when given).

    Example:

    >>> seeds_for(0.15), seeds_for(1.0), seeds_for(0.15, [0])
    ((0, 1, 2, 3, 4), (0, 1, 2), (0,))
    """
    if seeds is not None:
        return tuple(seeds)
    return SEEDS.get(float(fraction), (0, 1, 2))


__all__ = [
    "BASELINE",
    "DEFAULT_ROWS",
    "METHOD",
    "ProtocolRow",
    "ROWS",
    "is_joint_row",
    "run_dir",
    "seeds_for",
    "select_rows",
    "stage1_trials",
    "stage2_trials",
    "trial_slug",
    "validate_rows",
]
