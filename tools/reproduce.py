r"""Reproduces the four papers' comparisons on real data, at CPU scale, as one command.

Source: Fashion-MNIST (the backbone is pretrained on it, and its training split
is the pool of selective joint fine-tuning). Target: ELPV solar cells,
defective vs functional, with a fixed held-out test split. Every row of the
table is fine-tuned at every target training fraction with every seed, under
one hyperparameter budget:

1. Tuning. Every row gets the same budget: one run per candidate learning
   rate (`--tune_lrs`) at `--tune_fraction` with seed 0; the candidate with
   the lowest validation cross-entropy (the best epoch's, on the validation
   split carved from the training images) is kept for every fraction and
   seed of that row. The test split is never looked at.
2. The grid. Every (row, fraction, seed) is trained with its row's learning
   rate and the shared budget (epochs, batch, optimizer, augmentation).
3. Tables and plots, rebuilt from the cache every time.

Every run is cached as soon as it is done (<output_dir>/runs/<row>/...):
rerunning the command skips finished runs, so an interrupted reproduction
continues where it stopped. A cached run whose stored configuration differs
from what is asked (say, another epoch budget) is an error, not silently
reused.

  python tools/reproduce.py                 # the full run (hours on 2 CPU cores)
  python tools/reproduce.py --quick         # one seed, two fractions, 3 epochs (minutes)
  python tools/reproduce.py --rows=baseline,adafilter --fractions=0.15,1
  python tools/reproduce.py --table_only    # rebuild tables and plots from the cache

Outputs (full run: docs/results/; --quick: <output_dir>/): results.json,
results_table.md, the table spliced into RESULTS.md between its
`<!-- results-table -->` markers (the discussion around it is kept), and PNG
plots: accuracy versus target fraction, retrieval examples, neighbour-set
growth, AdaFilter gate usage per layer, shift consistency of the anti-aliased
models.
"""

import dataclasses
import io
import json
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _ROOT)

from absl import app  # noqa: E402
from absl import flags  # noqa: E402


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

flags.DEFINE_boolean(
    "quick", False,
    "One seed, two fractions (0.15, 0.3), 3 epochs, one learning rate, a 6,000-image "
    "source pool: a check of the whole pipeline in minutes, not a result.",
)
flags.DEFINE_list("rows", None, f"Rows to run (default: all): {', '.join(ROWS_BY_NAME)}.")
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


@dataclasses.dataclass
class Settings:
    """The resolved budget and paths of one invocation."""

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


def resolve_settings():
    """Turns the flags into `Settings` (defaults depend on --quick)."""
    from keras_seltransfer import training

    quick = FLAGS.quick
    names = FLAGS.rows or list(ROWS_BY_NAME)
    unknown = [n for n in names if n not in ROWS_BY_NAME]
    if unknown:
        raise app.UsageError(f"Unknown rows {unknown}; expected some of {list(ROWS_BY_NAME)}.")
    fractions = [float(f) for f in (FLAGS.fractions or (QUICK_FRACTIONS if quick else FULL_FRACTIONS))]
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
    return Settings(
        rows=[row for row in ROWS if row.name in names],
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
    )


def _log(message):
    print(f"[reproduce {time.strftime('%H:%M:%S')}] {message}", flush=True)


def ensure_backbone(settings):
    """Pretrains the backbone on the source set when it is missing."""
    from keras_seltransfer import training

    if os.path.isfile(settings.backbone):
        return
    if FLAGS.table_only:
        return
    _log(f"no backbone at {settings.backbone}: pretraining on {FLAGS.source}")
    config = training.PretrainConfig(
        source=FLAGS.source,
        output_dir=os.path.dirname(settings.backbone),
        image_size=FLAGS.image_size,
        fraction=0.1 if settings.quick else 1.0,
        epochs=1 if settings.quick else training.PretrainConfig.epochs,
        tensorboard=False,
        verbose=2,
    )
    training.pretrain(config)


def index_dir(settings, bank):
    return os.path.join(settings.runs_dir, "index", f"{bank}")


def ensure_index(settings, bank):
    """Builds the neighbour index an SJFT row needs (once, shared by all its runs)."""
    from keras_seltransfer.retrieval import workflow

    directory = index_dir(settings, bank)
    if os.path.isfile(os.path.join(directory, "neighbours.npz")) or FLAGS.table_only:
        return directory
    _log(f"building the {bank} neighbour index in {directory}")
    workflow.build_neighbours(
        workflow.IndexConfig(
            source=FLAGS.source,
            target=FLAGS.target,
            target_fraction=1.0,
            bank=bank,
            backbone=settings.backbone if bank == "conv" else None,
            image_size=FLAGS.image_size,
            max_source=settings.max_source,
            output_dir=directory,
            progress=False,
        )
    )
    return directory


def run_config(settings, row, fraction, seed, lr):
    """The FinetuneConfig of one cell."""
    from keras_seltransfer import training

    overrides = dict(row.overrides)
    joint = overrides["method"] in training.JOINT_VARIANTS
    if joint:
        overrides["index_dir"] = index_dir(settings, overrides.pop("index_bank", "conv"))
    return training.FinetuneConfig(
        target=FLAGS.target,
        source=FLAGS.source,
        backbone=settings.backbone,
        output_dir=os.path.join(settings.runs_dir, row.name, f"lr{lr:g}-f{fraction:g}-seed{seed}"),
        fraction=fraction,
        seed=seed,
        image_size=FLAGS.image_size,
        epochs=settings.epochs,
        patience=settings.patience,
        batch_size=FLAGS.batch_size,
        learning_rate=lr,
        export=False,
        tensorboard=False,
        verbose=0,
        **overrides,
    )


# Fields that do not change what a run computes.
_NOT_COMPARED = {"output_dir", "verbose", "tensorboard", "export", "index_dir"}


def cached_report(config):
    """The report of a finished run of `config`, or None.

    Raises:
        ValueError: if the cache holds a run of a different configuration.
    """
    report_path = os.path.join(config.output_dir, "report.json")
    if not os.path.isfile(report_path):
        return None
    with open(os.path.join(config.output_dir, "config.json")) as f:
        stored = json.load(f)
    wanted = dataclasses.asdict(config)
    changed = sorted(
        k for k in wanted if k not in _NOT_COMPARED and stored.get(k, wanted[k]) != wanted[k]
    )
    if changed:
        details = ", ".join(f"{k}: cached {stored.get(k)!r}, asked {wanted[k]!r}" for k in changed)
        raise ValueError(
            f"The cached run in {config.output_dir} was made with other settings ({details}); "
            "pass another --runs_dir or remove it."
        )
    with open(report_path) as f:
        return json.load(f)


# Seconds of every run this invocation used (tuning trials included), by run
# directory: the compute the tables cost.
RUN_SECONDS = {}


def run_cell(settings, row, fraction, seed, lr):
    """Runs (or reads from the cache) one cell; returns its report or None."""
    import keras

    from keras_seltransfer import training

    config = run_config(settings, row, fraction, seed, lr)
    report = cached_report(config)
    if report is not None:
        RUN_SECONDS[config.output_dir] = report["seconds"]
    if report is not None or FLAGS.table_only:
        return report
    if config.is_joint:
        ensure_index(settings, row.overrides.get("index_bank", "conv"))
    _log(f"{row.name} fraction {fraction:g} seed {seed} lr {lr:g}: training")
    start = time.time()
    training.finetune(config)
    keras.backend.clear_session()
    report = cached_report(config)
    RUN_SECONDS[config.output_dir] = report["seconds"]
    _log(
        f"{row.name} fraction {fraction:g} seed {seed} lr {lr:g}: accuracy "
        f"{report['accuracy']:.4f}, balanced {report['balanced_accuracy']:.4f} "
        f"({time.time() - start:.0f} s)"
    )
    return report


def validation_loss(report):
    """The best validation cross-entropy a run reached (the tuning criterion)."""
    for key in ("best_val_crossentropy", "best_val_target_crossentropy"):
        if report.get(key) is not None:
            return float(report[key])
    raise ValueError("report has no best validation cross-entropy")


def tune(settings, row):
    """The row's learning rate: the candidate with the lowest validation loss
    at the tuning fraction, seed 0. Returns `(lr, {lr: val loss})`."""
    if len(settings.lrs) == 1:
        return settings.lrs[0], {}
    losses = {}
    for lr in settings.lrs:
        report = run_cell(settings, row, FLAGS.tune_fraction, 0, lr)
        if report is not None:
            losses[lr] = validation_loss(report)
    if not losses:
        return None, {}
    return min(losses, key=losses.get), losses


def choose_combination(settings, choices):
    """The "combo" row's candidate with the lowest validation loss at the
    tuning fraction and seed 0, run at its base row's learning rate.
    Returns `(row, lr, {candidate: val loss})`; `(None, None, {})` while a
    base row or a trial is missing."""
    losses, rates = {}, {}
    for candidate, base in COMBINATIONS:
        lr = choices.get(base, {}).get("learning_rate")
        if lr is None:
            lr = tune(settings, ROWS_BY_NAME[base])[0]
        if lr is None:
            continue
        report = run_cell(settings, candidate, FLAGS.tune_fraction, 0, lr)
        if report is not None:
            losses[candidate.name], rates[candidate.name] = validation_loss(report), lr
    if len(losses) < len(COMBINATIONS):
        return None, None, losses
    best = min(losses, key=losses.get)
    row = next(c for c, _ in COMBINATIONS if c.name == best)
    return row, rates[best], losses


def collect(settings):
    """Runs what is missing; returns the per-row choices and cell results."""
    results, choices = [], {}
    for table_row in settings.rows:
        row = table_row
        if table_row.name == "combo":
            row, lr, losses = choose_combination(settings, choices)
            choices["combo"] = {
                "learning_rate": lr,
                "combination": None if row is None else row.name,
                "label": None if row is None else row.label,
                "validation_loss": losses,
            }
            if row is None:
                continue
        else:
            lr, losses = tune(settings, row)
            choices[row.name] = {
                "learning_rate": lr,
                "validation_loss": {f"{k:g}": v for k, v in losses.items()},
            }
        if lr is None:
            continue
        for fraction in settings.fractions:
            for seed in settings.seeds:
                report = run_cell(settings, row, fraction, seed, lr)
                if report is None:
                    continue
                results.append(
                    {
                        "row": table_row.name,
                        "fraction": fraction,
                        "seed": seed,
                        "learning_rate": lr,
                        "accuracy": report["accuracy"],
                        "balanced_accuracy": report["balanced_accuracy"],
                        "epochs_run": report["epochs_run"],
                        "seconds": report["seconds"],
                        "run_dir": run_config(settings, row, fraction, seed, lr).output_dir,
                    }
                )
    return choices, results


def collect_investigations(settings, choices):
    """Runs (or reads) the ablations whose parent row was run."""
    results = []
    if not FLAGS.investigations:
        return results
    for row, parent in INVESTIGATIONS:
        lr = choices.get(parent, {}).get("learning_rate")
        if lr is None:
            continue
        for seed in settings.seeds:
            report = run_cell(settings, row, INVESTIGATION_FRACTION, seed, lr)
            if report is not None:
                results.append(
                    {
                        "row": row.name,
                        "parent": parent,
                        "fraction": INVESTIGATION_FRACTION,
                        "seed": seed,
                        "learning_rate": lr,
                        "accuracy": report["accuracy"],
                        "balanced_accuracy": report["balanced_accuracy"],
                        "seconds": report["seconds"],
                        "run_dir": run_config(
                            settings, row, INVESTIGATION_FRACTION, seed, lr
                        ).output_dir,
                    }
                )
    return results


def investigation_table(settings, results, investigations):
    """The ablations beside their parent rows, at the investigation fraction."""
    lines = [
        f"| row | parent row at {INVESTIGATION_FRACTION:.0%} | ablation at {INVESTIGATION_FRACTION:.0%} |",
        "|---|---|---|",
    ]
    for row, parent in INVESTIGATIONS:
        runs = [r for r in investigations if r["row"] == row.name]
        if not runs:
            continue
        base = [r for r in results if r["row"] == parent and r["fraction"] == INVESTIGATION_FRACTION]
        lines.append(f"| {row.label} | {_cell(base)} | {_cell(runs)} |")
    return "\n".join(lines) if len(lines) > 2 else ""


def _cell(runs):
    from keras_seltransfer.training import mean_std

    if not runs:
        return "-"
    acc = mean_std([r["accuracy"] for r in runs])
    bal = mean_std([r["balanced_accuracy"] for r in runs])
    return f"{acc[0]:.3f} ± {acc[1]:.3f} / {bal[0]:.3f} ± {bal[1]:.3f}"


def table(settings, choices, results):
    """The results table (Markdown) in the paper's layout."""
    head = " | ".join(f"{f:.0%}" for f in settings.fractions)
    lines = [
        f"| row | paper | lr | {head} | authors' figure (their data) |",
        "|---|---|---|" + "---|" * len(settings.fractions) + "---|",
    ]
    for row in settings.rows:
        choice = choices.get(row.name, {})
        lr = choice.get("learning_rate")
        cells = [
            _cell([r for r in results if r["row"] == row.name and r["fraction"] == f])
            for f in settings.fractions
        ]
        lr_text = "-" if lr is None else f"{lr:g}"
        label = row.label + (f": {choice['label']}" if choice.get("label") else "")
        lines.append(f"| {label} | {row.paper} | {lr_text} | " + " | ".join(cells) + f" | {row.reported} |")
    return "\n".join(lines)


def settings_text(settings, results):
    from keras_seltransfer import training

    env = training.run_environment()
    seconds = sum(RUN_SECONDS.values())
    config = training.FinetuneConfig()
    return (
        f"Target {FLAGS.target} (fixed held-out test split), source {FLAGS.source}"
        f"{'' if settings.max_source is None else f' (first {settings.max_source} images)'}, "
        f"backbone `{settings.backbone}` at {FLAGS.image_size}px; every run: Adam with cosine "
        f"decay, batch {FLAGS.batch_size}, flips, {settings.epochs} epochs keeping the best "
        f"validation epoch (patience {settings.patience}), validation split "
        f"{config.val_fraction:.0%} of the kept training images; learning rate per row chosen "
        f"from {{{', '.join(f'{x:g}' for x in settings.lrs)}}} by validation cross-entropy at "
        f"{FLAGS.tune_fraction:.0%}, seed 0. Cells: test accuracy / balanced accuracy, mean ± "
        f"population std over seeds {', '.join(map(str, settings.seeds))}. "
        f"{env['machine']}, TensorFlow {env['tensorflow']}, Keras {env['keras']}, Python "
        f"{env['python']}; {len(results)} cells, {len(RUN_SECONDS)} runs with the tuning "
        f"trials and ablations, {seconds / 3600:.2f} h of run time in all (sum of the runs' "
        "own times)."
    )


def splice(path, marker, text):
    """Replaces the text between two `marker` lines of a Markdown file (or
    writes a new file holding only that block)."""
    from keras_seltransfer.utils.io import atomic_write_text

    block = f"{marker}\n{text}\n{marker}"
    if os.path.isfile(path):
        with open(path) as f:
            current = f.read()
        parts = current.split(marker)
        if len(parts) == 3:
            atomic_write_text(path, parts[0] + block + parts[2])
            return
    atomic_write_text(path, block + "\n")


# ---- shift robustness -------------------------------------------------------

SHIFT_ROWS = ("baseline", "antialias_ft", "ktft")
MAX_SHIFT = 8


def _test_images(settings):
    """The target's held-out test split (the one every run is scored on)."""
    from keras_seltransfer import training

    _, test = training.load_train_test(FLAGS.target)
    return test


def shift_report(run, test_cache):
    """Zhang's shift consistency and the accuracy along a diagonal shift sweep
    of one run's model on the test images, cached in `<run_dir>/shift.json`."""
    path = os.path.join(run["run_dir"], "shift.json")
    if os.path.isfile(path):
        with open(path) as f:
            return json.load(f)
    if FLAGS.table_only:
        return None
    import keras

    from keras_seltransfer import data as data_lib
    from keras_seltransfer import evaluation
    from keras_seltransfer.models import load_keras_file
    from keras_seltransfer.utils.io import atomic_write_text

    model = load_keras_file(os.path.join(run["run_dir"], "model.keras"))
    channels = int(model.inputs[0].shape[-1])
    key = (int(model.inputs[0].shape[1]), channels)
    if key not in test_cache:
        test = test_cache["source"]
        test_cache[key] = (data_lib.prepared_images(test, key[0], channels), test.labels)
    images, labels = test_cache[key]
    result = {
        "max_shift": MAX_SHIFT,
        "consistency": evaluation.shift_consistency(model, images, max_shift=MAX_SHIFT, num_pairs=5),
        "sweep": evaluation.accuracy_vs_shift(model, images, labels, max_shift=MAX_SHIFT),
    }
    atomic_write_text(path, json.dumps(result) + "\n")
    keras.backend.clear_session()
    return result


def collect_shift(settings, results):
    """Shift reports of every run of the rows in `SHIFT_ROWS`."""
    runs = [r for r in results if r["row"] in SHIFT_ROWS]
    if not runs:
        return {}
    test_cache = {"source": _test_images(settings)}
    out = {}
    for run in runs:
        report = shift_report(run, test_cache)
        if report is not None:
            out[(run["row"], run["fraction"], run["seed"])] = report
    return out


def _shifted_accuracy(sweep):
    """Mean test accuracy over the sweep's non-zero shifts."""
    values = [a for d, a in zip(sweep["shifts"], sweep["accuracy"]) if d != 0]
    return sum(values) / len(values)


def shift_table(settings, shift):
    from keras_seltransfer.training import mean_std

    rows = [r for r in settings.rows if r.name in SHIFT_ROWS]
    lines = [
        "| row | " + " | ".join(f"{f:.0%}" for f in settings.fractions) + " |",
        "|---|" + "---|" * len(settings.fractions),
    ]
    for row in rows:
        cells = []
        for f in settings.fractions:
            found = [v for (n, fr, _), v in shift.items() if n == row.name and fr == f]
            if found:
                m, s = mean_std([v["consistency"] for v in found])
                shifted = mean_std([_shifted_accuracy(v["sweep"]) for v in found])
                cells.append(f"{m:.3f} ± {s:.3f} / {shifted[0]:.3f} ± {shifted[1]:.3f}")
            else:
                cells.append("-")
        lines.append(f"| {row.label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ---- plots ----------------------------------------------------------------


def _figure_bytes(fig):
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return buffer.getvalue()


def plot_accuracy(settings, results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from keras_seltransfer.utils.io import atomic_write_bytes

    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    for metric, ax in zip(("accuracy", "balanced_accuracy"), axes):
        for row in settings.rows:
            xs, ms, ss = [], [], []
            for f in settings.fractions:
                values = [r[metric] for r in results if r["row"] == row.name and r["fraction"] == f]
                if values:
                    xs.append(f)
                    ms.append(np.mean(values))
                    ss.append(np.std(values))
            if xs:
                style = "--" if row.name.startswith(("sjft", "scratch")) else "-"
                ax.errorbar(xs, ms, yerr=ss, label=row.label, linestyle=style, marker="o",
                            capsize=3, markersize=4)
        ax.set_xscale("log")
        ax.minorticks_off()
        ax.set_xticks(settings.fractions, [f"{f:.0%}" for f in settings.fractions])
        ax.set_xlabel("target training data")
        ax.set_ylabel(metric.replace("_", " "))
        ax.grid(alpha=0.3)
        if metric == "accuracy":
            ax.axhline(0.6875, color="grey", linewidth=0.8, linestyle=":")
    axes[1].legend(fontsize=7, loc="lower right")
    fig.suptitle("ELPV test accuracy versus target training data (mean ± std over seeds)")
    atomic_write_bytes(path, _figure_bytes(fig))


def plot_growth(results, path):
    """Neighbour-set growth over training of the full SJFT rows (seed 0)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from keras_seltransfer.utils.io import atomic_write_bytes

    runs = [r for r in results if r["row"] == "sjft" and r["seed"] == 0]
    if not runs:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for run in runs:
        with open(os.path.join(run["run_dir"], "report.json")) as f:
            history = json.load(f)["history"]
        if "neighbours_mean" not in history:
            continue
        epochs = range(1, len(history["neighbours_mean"]) + 1)
        line, = ax.plot(epochs, history["neighbours_mean"], marker="o", markersize=3,
                        label=f"{run['fraction']:.0%}: mean K")
        ax.plot(epochs, history["neighbours_max"], color=line.get_color(), linestyle=":",
                label=f"{run['fraction']:.0%}: max K")
    ax.set_xlabel("epoch")
    ax.set_ylabel("neighbours per target image")
    ax.set_title("SJFT: neighbour-set growth of hard target images (seed 0)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    atomic_write_bytes(path, _figure_bytes(fig))
    return True


def write_retrieval_examples(settings, path):
    """Target images beside their selected (nearest) and farthest source images."""
    directory = index_dir(settings, "conv")
    if not os.path.isfile(os.path.join(directory, "neighbours.npz")):
        return False
    from keras_seltransfer.retrieval import neighbour_grid
    from keras_seltransfer.utils.io import atomic_write_bytes

    atomic_write_bytes(path, neighbour_grid(directory, rows=6, columns=6, tile=48, seed=0))
    return True


def plot_shift(settings, shift, path):
    """Accuracy along the diagonal shift sweep, per row (seed mean), at the
    smallest and largest fractions."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from keras_seltransfer.utils.io import atomic_write_bytes

    if not shift:
        return False
    fractions = sorted({f for (_, f, _) in shift})
    shown = [fractions[0], fractions[-1]] if len(fractions) > 1 else fractions
    fig, axes = plt.subplots(1, len(shown), figsize=(6.5 * len(shown), 4.5), squeeze=False)
    for ax, fraction in zip(axes[0], shown):
        for row in settings.rows:
            sweeps = [v["sweep"] for (n, f, _), v in shift.items() if n == row.name and f == fraction]
            if not sweeps:
                continue
            accuracy = np.mean([s["accuracy"] for s in sweeps], axis=0)
            ax.plot(sweeps[0]["shifts"], accuracy, marker="o", markersize=3, label=row.label)
        ax.set_title(f"{fraction:.0%} of the training data")
        ax.set_xlabel("diagonal shift (pixels)")
        ax.set_ylabel("test accuracy")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Accuracy versus input shift (mean over seeds)")
    atomic_write_bytes(path, _figure_bytes(fig))
    return True


def plot_gate_usage(settings, results, path):
    """AdaFilter: share of fine-tuned filters chosen per gated layer (hard
    gates on the validation images), per fraction, mean over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from keras_seltransfer.utils.io import atomic_write_bytes

    usage = {}
    for run in results:
        if run["row"] != "adafilter":
            continue
        with open(os.path.join(run["run_dir"], "report.json")) as f:
            per_layer = json.load(f).get("adafilter", {}).get("val_gate_usage_per_layer")
        if per_layer:
            usage.setdefault(run["fraction"], []).append(per_layer)
    if not usage:
        return False
    layers = list(next(iter(usage.values()))[0])
    fig, ax = plt.subplots(figsize=(8, 4.5))
    width = 0.8 / len(usage)
    for i, fraction in enumerate(sorted(usage)):
        means = [np.mean([u[name] for u in usage[fraction]]) for name in layers]
        ax.bar(np.arange(len(layers)) + i * width, means, width, label=f"{fraction:.0%}")
    ax.set_xticks(np.arange(len(layers)) + 0.4 - width / 2, layers, rotation=20)
    ax.set_ylim(0, 1)
    ax.set_ylabel("share of fine-tuned filters chosen")
    ax.set_title("AdaFilter gate usage per layer (validation images, mean over seeds)")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(title="target data", fontsize=8)
    atomic_write_bytes(path, _figure_bytes(fig))
    return True


def write_plots(settings, results, shift):
    written = []
    out = settings.output_dir
    if results:
        plot_accuracy(settings, results, os.path.join(out, "accuracy_vs_fraction.png"))
        written.append("accuracy_vs_fraction.png")
    if plot_growth(results, os.path.join(out, "neighbour_growth.png")):
        written.append("neighbour_growth.png")
    if write_retrieval_examples(settings, os.path.join(out, "retrieval_examples.png")):
        written.append("retrieval_examples.png")
    if plot_gate_usage(settings, results, os.path.join(out, "adafilter_gate_usage.png")):
        written.append("adafilter_gate_usage.png")
    if plot_shift(settings, shift, os.path.join(out, "shift_consistency.png")):
        written.append("shift_consistency.png")
    return written


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    from keras_seltransfer.utils.io import atomic_write_text

    settings = resolve_settings()
    # Import every method's recipe now rather than at its first run, so a
    # reproduction that runs for hours uses one version of the code throughout.
    import importlib

    from keras_seltransfer import recipes

    for module in sorted(set(recipes.RECIPES.values())):
        importlib.import_module(f"keras_seltransfer.recipes.{module}")
    started = time.time()
    os.makedirs(settings.output_dir, exist_ok=True)
    try:
        ensure_backbone(settings)
        choices, results = collect(settings)
        investigations = collect_investigations(settings, choices)
    except ValueError as e:
        print(f"reproduce: error: {e}", file=sys.stderr)
        sys.exit(2)
    shift = collect_shift(settings, results) if FLAGS.shift else {}
    header = settings_text(settings, results)
    body = table(settings, choices, results)
    ablations = investigation_table(settings, results, investigations)
    if ablations:
        body += (
            "\n\nAblations (same budget and learning rate as the parent row; test accuracy / "
            "balanced accuracy, mean ± std over the same seeds):\n\n" + ablations
        )
    if shift:
        body += (
            f"\n\nShift consistency (Zhang, ICML 2019) on the test images: how often "
            f"two random shifts of up to {MAX_SHIFT} pixels (reflect-padded crops, 5 pairs "
            "per image) give the same class; then the test accuracy averaged over the "
            f"diagonal shifts -{MAX_SHIFT}..{MAX_SHIFT} pixels except 0 (the curves of "
            "shift_consistency.png); mean ± std over seeds.\n\n" + shift_table(settings, shift)
        )
    atomic_write_text(os.path.join(settings.output_dir, "results_table.md"), header + "\n\n" + body + "\n")
    splice(os.path.join(settings.output_dir, "RESULTS.md"), "<!-- results-table -->", header + "\n\n" + body)
    from keras_seltransfer import training

    atomic_write_text(
        os.path.join(settings.output_dir, "results.json"),
        json.dumps(
            {
                "settings": header,
                "environment": training.run_environment(),
                "choices": choices,
                "runs": results,
                "investigations": investigations,
                "shift_consistency": [
                    {"row": n, "fraction": f, "seed": s, "consistency": v["consistency"]}
                    for (n, f, s), v in sorted(shift.items())
                ],
            },
            indent=2,
        )
        + "\n",
    )
    plots = write_plots(settings, results, shift) if FLAGS.plots else []
    print("\n" + header + "\n\n" + body)
    print(
        f"\n{len(results)} runs in the table; this invocation took {time.time() - started:.0f} s; "
        f"wrote {settings.output_dir}/results.json, results_table.md, RESULTS.md"
        + (f", {', '.join(plots)}" if plots else "")
    )


if __name__ == "__main__":
    app.run(main)
