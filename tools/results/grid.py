"""The experiment grid of tools/reproduce.py: rows, combinations, ablations.

Every row of the results table is a set of `FinetuneConfig` overrides; every
cell is one row at one target fraction, seed and learning rate
(`run_config`). The methods the rows may name, and which of them are joint
(the selective joint fine-tuning family, which trains on a neighbour index),
come from the library through `known_methods` and `is_joint` only, so the
grid learns the list of methods in one place.
"""

import dataclasses
import os


@dataclasses.dataclass(frozen=True)
class Row:
    """One row of the results table.

    Attributes:
        name: short name (cache directory, --rows).
        label: what the table calls it.
        paper: which paper the row comes from.
        overrides: FinetuneConfig fields that define the row.
        reported: the authors' figure for context (different data and scale).
    """

    name: str
    label: str
    paper: str
    overrides: dict
    reported: str = "-"


SJFT = "Ge & Yu 2017"
# In the layout of Ge & Yu's Table (Stanford Dogs, mean class accuracy, ResNet-152
# from ImageNet), then one row per other method.
ROWS = (
    Row("scratch", "Target only, from scratch", SJFT,
        {"method": "baseline", "from_scratch": True}, "53.8"),
    Row("sjft_scratch", "Selective joint training, from scratch", SJFT,
        {"method": "sjft", "from_scratch": True}, "83.4"),
    Row("baseline", "Fine-tuning (no source)", SJFT, {"method": "baseline"}, "80.4"),
    Row("l2sp", "L2-SP fine-tuning", "Li et al. 2018", {"method": "l2sp"}),
    Row("sjft_all", "Joint fine-tuning, all source images", SJFT, {"method": "sjft_all"}, "85.6"),
    Row("sjft_random", "Joint fine-tuning, random source images", SJFT,
        {"method": "sjft_random"}, "85.5"),
    Row("sjft_nogrowth", "SJFT without iterative neighbour growth", SJFT,
        {"method": "sjft_nogrowth"}, "88.3"),
    Row("sjft_gabor", "SJFT, Gabor filter bank", SJFT,
        {"method": "sjft", "index_bank": "gabor"}, "87.5"),
    Row("sjft", "SJFT, conv filter bank (full method)", SJFT, {"method": "sjft"}, "90.2"),
    Row("adafilter", "AdaFilter", "Guo et al. 2020", {"method": "adafilter"},
        "error 2.54 points below fine-tuning (mean of 7 sets)"),
    Row("filter_transfer", "Selective filter transfer", "Jung & Kim 2019",
        {"method": "filter_transfer"}, "+2 points over fine-tuning (50-class ImageNet)"),
    Row("antialias_ft", "Anti-aliased fine-tuning", "IEEE Access 2022",
        {"method": "antialias_ft"}, "-"),
    Row("ktft", "Knowledge-transferred fine-tuning (anti-aliased)", "IEEE Access 2022",
        {"method": "ktft"}, "beats fine-tuning at 25 images/class (ImageNet)"),
    Row("combo", "Best combination (chosen on validation)", "this toolkit", {}),
)
ROWS_BY_NAME = {row.name: row for row in ROWS}

# Candidates of the "combo" row: (row, the row whose learning rate it takes).
# Like every other row it gets two trials, one per candidate, at the tuning
# fraction and seed 0; the one with the lower validation loss is the row.
COMBINATIONS = (
    (Row("sjft+adafilter", "SJFT on an AdaFilter backbone", "this toolkit",
         {"method": "sjft", "compose": "adafilter"}), "sjft"),
    (Row("adafilter+antialias", "AdaFilter on the anti-aliased network", "this toolkit",
         {"method": "adafilter", "compose": "antialias"}), "adafilter"),
)

# Ablations that look into why a method does or does not help here: run at
# the smallest fraction (the low-data regime the methods are for), every
# seed, with the learning rate chosen for their parent row (not tuned again).
INVESTIGATIONS = (
    (Row("baseline_bntrain", "Fine-tuning, BatchNorm trained", "-",
         {"method": "baseline", "batchnorm": "train"}), "baseline"),
    (Row("sjft_mixture_stats", "SJFT served with the moving mixture statistics (the earlier default)", "-",
         {"method": "sjft", "joint_bn_stats": "mixture"}), "sjft"),
    (Row("sjft_uncapped", "SJFT, repetition of hard images uncapped (the earlier default)", "-",
         {"method": "sjft", "max_level": 0}), "sjft"),
    (Row("sjft_rounds", "SJFT, neighbour sets regrown between rounds", "-",
         {"method": "sjft", "growth_mode": "rounds"}), "sjft"),
    (Row("adafilter_before", "AdaFilter with the earlier defaults: fine-tuned path's BatchNorm frozen, "
         "gates at the shared learning rate, first gate reads the image", "-",
         {"method": "adafilter", "gated_batchnorm": "frozen", "gate_lr_multiplier": 1.0,
          "first_gate_input": "input"}), "adafilter"),
    (Row("adafilter_bntrain", "AdaFilter, every BatchNorm trained", "-",
         {"method": "adafilter", "batchnorm": "train"}), "adafilter"),
    (Row("adafilter_gumbel", "AdaFilter, Gumbel-softmax gates", "-",
         {"method": "adafilter", "gate_estimator": "gumbel"}), "adafilter"),
    (Row("filter_transfer_r25", "Filter transfer, 25% of the filters kept", "-",
         {"method": "filter_transfer", "transfer_ratio": 0.25}), "filter_transfer"),
    (Row("filter_transfer_r75", "Filter transfer, 75% of the filters kept", "-",
         {"method": "filter_transfer", "transfer_ratio": 0.75}), "filter_transfer"),
    (Row("filter_transfer_kl", "Filter transfer, KL relevance", "-",
         {"method": "filter_transfer", "relevance_statistic": "kl"}), "filter_transfer"),
    (Row("filter_transfer_before", "Filter transfer, re-initialised channels' BatchNorm frozen "
         "(the earlier default)", "-",
         {"method": "filter_transfer", "reinit_batchnorm": "frozen"}), "filter_transfer"),
    (Row("filter_transfer_next", "Filter transfer, next layer's input slices re-initialised too",
         "-", {"method": "filter_transfer", "reinit_next": True}), "filter_transfer"),
    (Row("antialias_ft_copied", "Anti-aliased FT, BatchNorm statistics copied, not "
         "recalibrated (the earlier default)", "-",
         {"method": "antialias_ft", "recalibrate_batchnorm": "none"}), "antialias_ft"),
    (Row("antialias_ft_keep_stem", "Anti-aliased FT, stem convolution kept strided", "-",
         {"method": "antialias_ft", "blur_keep_stem": True}), "antialias_ft"),
    (Row("antialias_ft_filt2", "Anti-aliased FT, BlurPool filter size 2", "-",
         {"method": "antialias_ft", "blur_filt_size": 2}), "antialias_ft"),
    (Row("ktft_copied", "KTFT, BatchNorm statistics copied, not recalibrated (the earlier default)",
         "-", {"method": "ktft", "recalibrate_batchnorm": "none"}), "ktft"),
    (Row("ktft_pixel", "KTFT, pixel-level loss only", "-",
         {"method": "ktft", "ktft_global_weight": 0.0}), "ktft"),
    (Row("ktft_global", "KTFT, global-level loss only", "-",
         {"method": "ktft", "ktft_pixel_weight": 0.0}), "ktft"),
)
INVESTIGATION_FRACTION = 0.15

FULL_FRACTIONS = ("0.15", "0.3", "0.5", "1")
QUICK_FRACTIONS = ("0.15", "0.3")

# Rows whose models get Zhang's shift-consistency measurement, and the
# largest shift (pixels along each axis) it draws.
SHIFT_ROWS = ("baseline", "antialias_ft", "ktft")
MAX_SHIFT = 8

# The neighbour index a joint row uses when its overrides name no bank.
DEFAULT_INDEX_BANK = "conv"


# ---- what the library offers: the only place the grid asks it ---------------


def known_methods():
    """The fine-tuning methods a row may name.

    Returns:
        A tuple of method names, as `FinetuneConfig.method` accepts them.

    Example:

    >>> "baseline" in known_methods()
    True
    """
    from keras_seltransfer import methods

    return methods.names()


def is_joint(method):
    """Whether a method trains jointly on target and source images (the
    selective joint fine-tuning family), and so needs a neighbour index.

    Args:
        method: a name from `known_methods()`.

    Returns:
        True for the joint methods, False for the others.

    Raises:
        ValueError: if `method` is not a known method.

    Example:

    >>> is_joint("sjft_nogrowth"), is_joint("adafilter")
    (True, False)
    """
    from keras_seltransfer import methods

    return methods.get(method).joint


def import_methods():
    """Imports the code of every method now rather than at its first run, so
    a reproduction that runs for hours uses one version of it throughout.

    Example:

    >>> import_methods()
    """
    # Importing the registry imports every method's module.
    from keras_seltransfer import methods

    return methods.names()


def all_rows():
    """Every row the grid can run: table rows, combination candidates and
    ablations, each once.

    Returns:
        A list of `Row`.
    """
    return list(ROWS) + [row for row, _ in COMBINATIONS] + [row for row, _ in INVESTIGATIONS]


def validate_rows(rows=None):
    """Checks that every row names a known method and that its parents exist.

    The "combo" row has no overrides of its own (it is one of
    `COMBINATIONS`, chosen on validation) and is skipped.

    Args:
        rows: the rows to check (default: `all_rows()`).

    Raises:
        ValueError: naming the first row whose method is unknown, or a
            combination or ablation whose parent row does not exist.

    Example:

    >>> validate_rows()
    """
    methods = known_methods()
    for row in all_rows() if rows is None else rows:
        if not row.overrides:
            continue
        method = row.overrides.get("method")
        if method not in methods:
            raise ValueError(
                f"Row {row.name!r} must name a method in {list(methods)}. "
                f"Received: method={method!r}"
            )
    for row, parent in COMBINATIONS + INVESTIGATIONS:
        if parent not in ROWS_BY_NAME:
            raise ValueError(
                f"The parent of row {row.name!r} must be a row of the table "
                f"({list(ROWS_BY_NAME)}). Received: parent={parent!r}"
            )


# ---- one invocation's settings and one cell's configuration ------------------


@dataclasses.dataclass
class Settings:
    """The resolved budget and paths of one invocation.

    Attributes:
        rows: the table rows to run (`Row`s, in table order).
        fractions: target training fractions.
        seeds: seeds of every cell.
        lrs: candidate learning rates of every row.
        epochs: epochs per run.
        patience: early-stopping patience.
        output_dir: where tables, plots and results.json go.
        runs_dir: the run cache.
        backbone: the pretrained backbone (.keras).
        max_source: first N source training images used (None: all).
        quick: whether this is a --quick pipeline check.
        target: target data set spec.
        source: source data set spec.
        image_size: input size.
        batch_size: batch size.
        tune_fraction: the fraction learning rates are chosen at.
        table_only: train nothing, read only the cache.
        pretrain_backbone: pretrain the backbone on the source when missing.
    """

    rows: list
    fractions: list
    seeds: list
    lrs: list
    epochs: int
    patience: int
    output_dir: str
    runs_dir: str
    backbone: str
    max_source: int
    quick: bool
    target: str
    source: str
    image_size: int
    batch_size: int
    tune_fraction: float
    table_only: bool
    pretrain_backbone: bool = True


def index_bank(row):
    """The filter bank of the neighbour index a joint row trains with."""
    return row.overrides.get("index_bank", DEFAULT_INDEX_BANK)


def index_dir(settings, bank):
    """Where the run cache keeps the neighbour index of one filter bank."""
    return os.path.join(settings.runs_dir, "index", f"{bank}")


def run_dir(settings, row, fraction, seed, lr):
    """The cache directory of one cell: `<runs_dir>/<row>/lr<lr>-f<fraction>-seed<seed>`."""
    return os.path.join(settings.runs_dir, row.name, f"lr{lr:g}-f{fraction:g}-seed{seed}")


def run_config(settings, row, fraction, seed, lr):
    """The FinetuneConfig of one cell.

    Args:
        settings: the invocation's `Settings`.
        row: the `Row`.
        fraction: target training fraction.
        seed: the seed.
        lr: the learning rate.

    Returns:
        A `FinetuneConfig`.

    Raises:
        ValueError: if the row's overrides are not a valid configuration.

    Example:

    >>> run_config(settings, ROWS_BY_NAME["baseline"], 0.15, 0, 1e-3).method
    'baseline'
    """
    from keras_seltransfer import training

    overrides = dict(row.overrides)
    if is_joint(overrides["method"]):
        overrides["index_dir"] = index_dir(settings, overrides.pop("index_bank", DEFAULT_INDEX_BANK))
    return training.FinetuneConfig(
        target=settings.target,
        source=settings.source,
        backbone=settings.backbone,
        output_dir=run_dir(settings, row, fraction, seed, lr),
        fraction=fraction,
        seed=seed,
        image_size=settings.image_size,
        epochs=settings.epochs,
        patience=settings.patience,
        batch_size=settings.batch_size,
        learning_rate=lr,
        export=False,
        tensorboard=False,
        verbose=0,
        **overrides,
    )
