"""Trains or reads from the run cache every run of a comparison.

`ComparisonRunner` searches every row on validation (`search`), then runs
the chosen configuration at every fraction and seed. Every run is cached in
its own directory (`search.run_dir`) and reused when its stored
configuration matches, so an interrupted comparison continues where it
stopped; `table_only` trains nothing.
"""

import dataclasses
import os
import time

from keras_seltransfer.comparison import cache
from keras_seltransfer.comparison import search


def log(message, program="compare"):
    """Prints a time-stamped progress line.

    Example:

    >>> log("baseline fraction 0.15 seed 0: training")  # doctest: +SKIP
    [compare 12:00:00] baseline fraction 0.15 seed 0: training
    """
    print(f"[{program} {time.strftime('%H:%M:%S')}] {message}", flush=True)


def validation_loss(report):
    """The best validation cross-entropy a run reached (the tuning criterion).

    Args:
        report: a run's `report.json`.

    Returns:
        A float: `best_val_crossentropy`, or `best_val_target_crossentropy`
        for joint runs.

    Raises:
        ValueError: if the report has neither.

    Example:

    >>> validation_loss({"best_val_target_crossentropy": 0.4})
    0.4
    """
    for key in ("best_val_crossentropy", "best_val_target_crossentropy"):
        if report.get(key) is not None:
            return float(report[key])
    raise ValueError(
        "A run report must hold `best_val_crossentropy` or `best_val_target_crossentropy`. "
        f"Received: keys={sorted(report)}"
    )


@dataclasses.dataclass
class ComparisonSettings:
    """The budget and paths of one comparison.

    Attributes:
        rows: `search.ProtocolRow`s to run, in table order.
        fractions: target training fractions.
        seeds: seeds of every cell, or None for `search.SEEDS`.
        tune_seeds: seeds every search trial is scored over.
        tune_fraction: the fraction the search runs at.
        epochs: epochs of every run (patience: the same, so every run
            trains all epochs and keeps its best validation epoch).
        output_dir: tables, plots and results.json.
        runs_dir: the run cache.
        backbone: the backbone (a `.keras` file or a built-in name).
        target, source: data set specs (the source only for joint rows).
        image_size, batch_size: input size and batch size of every run.
        backbone_weights: weights of a built-in backbone, or None.
        max_source: first N source training images the index uses (None: all).
        trials: search trials per row.
        quick: a pipeline check.
        table_only: train nothing, read only the cache.
        pretrain_backbone: pretrain a missing `.keras` backbone on the
            source (the documented reproduction), instead of failing.
        force: take over the output directory and the runs of the cache
            whose locks name a run that cannot be checked (another host):
            `FinetuneConfig.force` for every run.

    Example:

    >>> settings = ComparisonSettings(
    ...     rows=search.select_rows(["baseline"]), fractions=[0.15], seeds=[0, 1],
    ...     tune_seeds=[0], tune_fraction=0.15, epochs=30, output_dir="runs/compare/x",
    ...     runs_dir="runs/compare/x/runs", backbone="resnet50", target="folder:/data/x",
    ...     source=None, image_size=224, batch_size=32, backbone_weights="imagenet")
    """

    rows: list
    fractions: list
    seeds: list
    tune_seeds: list
    tune_fraction: float
    epochs: int
    output_dir: str
    runs_dir: str
    backbone: str
    target: str
    source: str
    image_size: int
    batch_size: int
    backbone_weights: str = None
    max_source: int = None
    trials: int = search.TRIALS
    quick: bool = False
    table_only: bool = False
    pretrain_backbone: bool = False
    force: bool = False


class Runner:
    """What every runner of the cache shares: the backbone and the indexes.

    Args:
        settings: settings with `backbone`, `source`, `target`,
            `image_size`, `runs_dir`, `max_source`, `quick`, `table_only`
            (and optionally `backbone_weights`, `pretrain_backbone`, `force`).
        program: the name progress lines start with.

    Attributes:
        run_seconds: seconds of every run used, by run directory: the
            compute the tables cost.

    Example:

    >>> runner = Runner(settings)
    >>> runner.ensure_index("conv")  # doctest: +SKIP
    'runs/compare/x/runs/index/conv'
    """

    def __init__(self, settings, program="compare"):
        self.settings = settings
        self.program = program
        self.run_seconds = {}

    def log(self, message):
        """Prints a progress line of this runner's program."""
        log(message, self.program)

    def ensure_backbone(self):
        """Pretrains a missing `.keras` backbone on the source set, when the
        settings ask for it (`pretrain_backbone`)."""
        from keras_seltransfer import training

        settings = self.settings
        if (
            not getattr(settings, "pretrain_backbone", False)
            or os.path.isfile(settings.backbone)
            or settings.table_only
        ):
            return
        self.log(f"no backbone at {settings.backbone}: pretraining on {settings.source}")
        config = training.PretrainConfig(
            source=settings.source,
            output_dir=os.path.dirname(settings.backbone),
            image_size=settings.image_size,
            fraction=0.1 if settings.quick else 1.0,
            epochs=1 if settings.quick else training.PretrainConfig.epochs,
            tensorboard=False,
            verbose=2,
            force=getattr(settings, "force", False),
        )
        training.pretrain(config)

    def index_dir(self, bank):
        """Where the run cache keeps the neighbour index of one filter bank."""
        return os.path.join(self.settings.runs_dir, "index", f"{bank}")

    def ensure_index(self, bank):
        """Builds the neighbour index a joint row needs (once, shared by all its runs)."""
        from keras_seltransfer.retrieval import workflow

        settings = self.settings
        directory = self.index_dir(bank)
        if os.path.isfile(os.path.join(directory, "neighbours.npz")) or settings.table_only:
            return directory
        self.log(f"building the {bank} neighbour index in {directory}")
        conv = bank == "conv"
        workflow.build_neighbours(
            workflow.IndexConfig(
                source=settings.source,
                target=settings.target,
                target_fraction=1.0,
                bank=bank,
                backbone=settings.backbone if conv else None,
                backbone_weights=getattr(settings, "backbone_weights", None) if conv else None,
                image_size=settings.image_size,
                max_source=settings.max_source,
                output_dir=directory,
                progress=False,
                force=getattr(settings, "force", False),
            )
        )
        return directory


def record(row_name, trial, fraction, seed, report, directory):
    """One cell of the results: what the tables and results.json keep of a run.

    Example:

    >>> report = {"accuracy": 0.8, "balanced_accuracy": 0.75, "best_val_crossentropy": 0.4,
    ...           "epochs_run": 30, "seconds": 12.0}
    >>> record("baseline", {"method": "baseline"}, 0.15, 0, report, "runs/x")["trial"]
    'method=baseline'
    """
    return {
        "row": row_name,
        "fraction": fraction,
        "seed": seed,
        "trial": search.trial_slug(trial, {}),
        "accuracy": report["accuracy"],
        "balanced_accuracy": report["balanced_accuracy"],
        "validation_loss": validation_loss(report),
        "epochs_run": report["epochs_run"],
        "seconds": report["seconds"],
        "run_dir": directory,
    }


def planned_runs(settings):
    """How many runs a comparison makes: its search and its grid.

    The grid's cells at the tuning fraction and a tuning seed are search
    runs of the chosen trial, so they are counted once. Stage 2 is counted
    from the first stage-1 trial; its size does not depend on which trial
    wins unless a neighbouring learning rate coincides with a tried one.

    Args:
        settings: a `ComparisonSettings`.

    Returns:
        An int.

    Example:

    >>> planned_runs(settings)  # doctest: +SKIP
    13
    """
    total = 0
    for row in settings.rows:
        first = search.stage1_trials(row, settings.trials)
        trials = len(first) + len(search.stage2_trials(row, first[0], settings.trials))
        total += trials * len(settings.tune_seeds)
        for fraction in settings.fractions:
            seeds = search.seeds_for(fraction, settings.seeds)
            total += len(seeds)
            if fraction == settings.tune_fraction:
                total -= len(set(seeds) & set(settings.tune_seeds))
    return total


class ComparisonRunner(Runner):
    """Searches every row of a comparison and runs its grid.

    Args:
        settings: a `ComparisonSettings`.
        program: the name progress lines start with.

    Attributes:
        trained: how many runs this runner trained (the others came from
            the cache).
        planned: how many runs the comparison makes (`planned_runs`).

    Example:

    >>> runner = ComparisonRunner(settings)
    >>> choices, results = runner.collect()  # doctest: +SKIP
    """

    def __init__(self, settings, program="compare"):
        super().__init__(settings, program)
        self.trained = 0
        self.planned = planned_runs(settings)
        self._seen = set()

    def config(self, row_name, trial, base, fraction, seed):
        """The FinetuneConfig of one run."""
        from keras_seltransfer import methods
        from keras_seltransfer import training

        settings = self.settings
        overrides = dict(trial)
        bank = overrides.pop("index_bank", "conv")
        if methods.get(overrides["method"]).joint:
            overrides["index_dir"] = self.index_dir(bank)
        data = {"source": settings.source} if settings.source is not None else {}
        weights = getattr(settings, "backbone_weights", None)
        if weights is not None:
            data["backbone_weights"] = weights
        return training.FinetuneConfig(
            target=settings.target,
            backbone=settings.backbone,
            output_dir=search.run_dir(settings.runs_dir, row_name, trial, base, fraction, seed),
            fraction=fraction,
            seed=seed,
            image_size=settings.image_size,
            epochs=settings.epochs,
            patience=settings.epochs,
            batch_size=settings.batch_size,
            export=False,
            tensorboard=False,
            verbose=0,
            force=getattr(settings, "force", False),
            **data,
            **overrides,
        )

    def run(self, row_name, trial, base, fraction, seed):
        """Runs (or reads from the cache) one run; returns `(report, run_dir)`,
        the report None when absent under `table_only`."""
        import keras

        from keras_seltransfer import methods
        from keras_seltransfer import training

        config = self.config(row_name, trial, base, fraction, seed)
        self._seen.add(config.output_dir)
        report = cache.cached_report(config)
        if report is None and not self.settings.table_only:
            if methods.get(trial["method"]).joint:
                self.ensure_index(trial.get("index_bank", "conv"))
            count = f"[{len(self._seen)}/{max(self.planned, len(self._seen))}]"
            name = (f"{count} {row_name} {fraction:g} seed {seed} "
                    f"[{search.trial_slug(trial, base)}]")
            self.log(f"{name}: training")
            start = time.time()
            training.finetune(config)
            keras.backend.clear_session()
            self.trained += 1
            report = cache.cached_report(config)
            self.log(
                f"{name}: accuracy {report['accuracy']:.4f}, balanced "
                f"{report['balanced_accuracy']:.4f}, validation loss "
                f"{validation_loss(report):.4f} ({time.time() - start:.0f} s)"
            )
        if report is not None:
            self.run_seconds[config.output_dir] = report["seconds"]
        return report, config.output_dir

    def score(self, row, trial):
        """A trial's validation cross-entropy, averaged over the tuning seeds
        (None while one of its runs is missing)."""
        losses = []
        for seed in self.settings.tune_seeds:
            report, _ = self.run(row.name, trial, row.overrides, self.settings.tune_fraction, seed)
            if report is None:
                return None
            losses.append(validation_loss(report))
        return sum(losses) / len(losses)

    def search(self, row):
        """The row's search: stage 1, then stage 2 from the best stage-1 trial.

        Returns:
            `(best trial or None, [{"trial": slug, "overrides": ..., "stage":
            1 or 2, "validation_loss": ...}])`.
        """
        tried = []

        def run_stage(trials, stage):
            for trial in trials:
                tried.append({
                    "trial": search.trial_slug(trial, row.overrides),
                    "overrides": trial,
                    "stage": stage,
                    "validation_loss": self.score(row, trial),
                })

        budget = self.settings.trials
        run_stage(search.stage1_trials(row, budget), 1)
        scored = [t for t in tried if t["validation_loss"] is not None]
        if len(scored) < len(tried):
            return None, tried
        best = min(scored, key=lambda t: t["validation_loss"])
        run_stage(search.stage2_trials(row, best["overrides"], budget), 2)
        scored = [t for t in tried if t["validation_loss"] is not None]
        if len(scored) < len(tried):
            return None, tried
        return min(scored, key=lambda t: t["validation_loss"])["overrides"], tried

    def collect(self):
        """Searches every row and runs its grid; returns `(choices, results)`."""
        settings = self.settings
        choices, results = {}, []
        for row in settings.rows:
            best, tried = self.search(row)
            choices[row.name] = {
                "kind": row.kind,
                "trial": None if best is None else search.trial_slug(best, {}),
                "overrides": best,
                "validation_loss": min(
                    (t["validation_loss"] for t in tried if t["validation_loss"] is not None),
                    default=None,
                ),
                "trials": tried,
            }
            if best is None:
                continue
            for fraction in settings.fractions:
                for seed in search.seeds_for(fraction, settings.seeds):
                    report, directory = self.run(row.name, best, row.overrides, fraction, seed)
                    if report is not None:
                        results.append(record(row.name, best, fraction, seed, report, directory))
        return choices, results


def best_baseline(choices):
    """The baseline row with the lowest tuned validation loss, or None.

    Example:

    >>> best_baseline({"a": {"kind": "baseline", "validation_loss": 0.5},
    ...                "b": {"kind": "baseline", "validation_loss": 0.4},
    ...                "c": {"kind": "method", "validation_loss": 0.1}})
    'b'
    """
    scored = {
        name: c["validation_loss"]
        for name, c in choices.items()
        if c.get("kind") == search.BASELINE and c.get("validation_loss") is not None
    }
    return min(scored, key=scored.get) if scored else None


__all__ = [
    "ComparisonRunner",
    "ComparisonSettings",
    "Runner",
    "best_baseline",
    "log",
    "planned_runs",
    "record",
    "validation_loss",
]
