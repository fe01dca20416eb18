"""Runs the deconfounded protocol (`tools.results.protocol`): the search of
every row, the grid of seeds and fractions, and the SJFT controls.

Every run is cached in its own directory (`protocol.run_dir`) and reused
when its stored configuration matches, so an interrupted invocation
continues where it stopped; `table_only` trains nothing.
"""

import dataclasses
import os
import time

from tools.results import cache
from tools.results import protocol
from tools.results.runner import Runner
from tools.results.runner import log
from tools.results.runner import validation_loss


@dataclasses.dataclass
class ProtocolSettings:
    """The budget and paths of one deconfounded invocation.

    Attributes:
        rows: `ProtocolRow`s to run, in table order.
        controls: names of the SJFT controls to run (`protocol.CONTROLS`).
        fractions: target training fractions.
        seeds: seeds of every cell, or None for `protocol.SEEDS`.
        tune_seeds: seeds every trial is scored over.
        tune_fraction: the fraction the search runs at.
        control_fractions: the fractions the controls run at.
        epochs: epochs of every run (patience: the same, so every run
            trains all epochs and keeps its best validation epoch).
        output_dir, runs_dir: tables and plots; the run cache.
        backbone, target, source, image_size, batch_size, max_source: data
            and model, as in `grid.Settings`.
        trials: search trials per row (`protocol.TRIALS`).
        quick: a pipeline check (short pretraining when the backbone is missing).
        table_only: train nothing, read only the cache.
        summary: a Markdown file whose `<!-- deconfounded-table:<target> -->`
            block gets the tables when it has that pair of markers, or None.
    """

    rows: list
    controls: list
    fractions: list
    seeds: list
    tune_seeds: list
    tune_fraction: float
    control_fractions: list
    epochs: int
    output_dir: str
    runs_dir: str
    backbone: str
    target: str
    source: str
    image_size: int
    batch_size: int
    max_source: int = None
    trials: int = protocol.TRIALS
    quick: bool = False
    table_only: bool = False
    summary: str = None


def record(row_name, trial, fraction, seed, report, directory):
    """One cell of the results: what the tables and results.json keep of a run."""
    return {
        "row": row_name,
        "fraction": fraction,
        "seed": seed,
        "trial": protocol.trial_slug(trial, {}),
        "accuracy": report["accuracy"],
        "balanced_accuracy": report["balanced_accuracy"],
        "validation_loss": validation_loss(report),
        "epochs_run": report["epochs_run"],
        "seconds": report["seconds"],
        "run_dir": directory,
    }


class ProtocolRunner(Runner):
    """Trains or reads every run of one deconfounded invocation.

    Args:
        settings: a `ProtocolSettings`.
    """

    def config(self, row_name, trial, base, fraction, seed):
        """The FinetuneConfig of one run."""
        from keras_seltransfer import methods
        from keras_seltransfer import training

        settings = self.settings
        overrides = dict(trial)
        bank = overrides.pop("index_bank", "conv")
        if methods.get(overrides["method"]).joint:
            overrides["index_dir"] = os.path.join(settings.runs_dir, "index", bank)
        return training.FinetuneConfig(
            target=settings.target,
            source=settings.source,
            backbone=settings.backbone,
            output_dir=protocol.run_dir(settings.runs_dir, row_name, trial, base, fraction, seed),
            fraction=fraction,
            seed=seed,
            image_size=settings.image_size,
            epochs=settings.epochs,
            patience=settings.epochs,
            batch_size=settings.batch_size,
            export=False,
            tensorboard=False,
            verbose=0,
            **overrides,
        )

    def run(self, row_name, trial, base, fraction, seed):
        """Runs (or reads from the cache) one run; returns `(report, run_dir)`,
        the report None when absent under `table_only`."""
        import keras

        from keras_seltransfer import methods
        from keras_seltransfer import training

        config = self.config(row_name, trial, base, fraction, seed)
        report = cache.cached_report(config)
        if report is None and not self.settings.table_only:
            if methods.get(trial["method"]).joint:
                self.ensure_index(trial.get("index_bank", "conv"))
            name = f"{row_name} [{protocol.trial_slug(trial, base)}] fraction {fraction:g} seed {seed}"
            log(f"{name}: training")
            start = time.time()
            training.finetune(config)
            keras.backend.clear_session()
            report = cache.cached_report(config)
            log(
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
                    "trial": protocol.trial_slug(trial, row.overrides),
                    "overrides": trial,
                    "stage": stage,
                    "validation_loss": self.score(row, trial),
                })

        budget = self.settings.trials
        run_stage(protocol.stage1_trials(row, budget), 1)
        scored = [t for t in tried if t["validation_loss"] is not None]
        if len(scored) < len(tried):
            return None, tried
        best = min(scored, key=lambda t: t["validation_loss"])
        run_stage(protocol.stage2_trials(row, best["overrides"], budget), 2)
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
                "trial": None if best is None else protocol.trial_slug(best, {}),
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
                for seed in protocol.seeds_for(fraction, settings.seeds):
                    report, directory = self.run(row.name, best, row.overrides, fraction, seed)
                    if report is not None:
                        results.append(record(row.name, best, fraction, seed, report, directory))
        return choices, results

    def collect_controls(self, choices):
        """Runs the SJFT controls with their parent's chosen configuration."""
        results = []
        for name in self.settings.controls:
            _, _, parent, change = protocol.CONTROLS_BY_NAME[name]
            chosen = choices.get(parent, {}).get("overrides")
            if chosen is None:
                continue
            trial = {**chosen, **change}
            base = protocol.ROWS_BY_NAME[parent].overrides
            for fraction in self.settings.control_fractions:
                for seed in protocol.seeds_for(fraction, self.settings.seeds):
                    report, directory = self.run(name, trial, base, fraction, seed)
                    if report is not None:
                        results.append(record(name, trial, fraction, seed, report, directory))
        return results


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
        if c.get("kind") == protocol.BASELINE and c.get("validation_loss") is not None
    }
    return min(scored, key=scored.get) if scored else None


__all__ = ["ProtocolRunner", "ProtocolSettings", "best_baseline", "record"]
