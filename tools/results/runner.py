"""Runs what the cache of tools/reproduce.py lacks: backbone, indexes, cells.

One hyperparameter budget for every row: one run per candidate learning rate
at the tuning fraction with seed 0; the candidate with the lowest validation
cross-entropy (the best epoch's, on the validation split carved from the
training images) is kept for every fraction and seed of that row. The test
split is never looked at. With `Settings.table_only` nothing is trained and
only what the cache holds is returned.
"""

import json
import os
import time

from keras_seltransfer.comparison import cache
from keras_seltransfer.comparison.runner import Runner as CacheRunner
from keras_seltransfer.comparison.runner import log  # noqa: F401
from keras_seltransfer.comparison.runner import validation_loss
from tools.results import grid


class Runner(CacheRunner):
    """Trains or reads every cell of one invocation of the papers' protocol.

    Args:
        settings: the invocation's `grid.Settings`.

    Attributes:
        run_seconds: seconds of every run this invocation used (tuning
            trials and ablations included), by run directory: the compute
            the tables cost.
    """

    def __init__(self, settings):
        super().__init__(settings, program="reproduce")

    def run_cell(self, row, fraction, seed, lr):
        """Runs (or reads from the cache) one cell; returns its report or None."""
        import keras

        from keras_seltransfer import training

        config = grid.run_config(self.settings, row, fraction, seed, lr)
        report = cache.cached_report(config)
        if report is not None:
            self.run_seconds[config.output_dir] = report["seconds"]
        if report is not None or self.settings.table_only:
            return report
        if grid.is_joint(row.overrides["method"]):
            self.ensure_index(grid.index_bank(row))
        self.log(f"{row.name} fraction {fraction:g} seed {seed} lr {lr:g}: training")
        start = time.time()
        training.finetune(config)
        keras.backend.clear_session()
        report = cache.cached_report(config)
        self.run_seconds[config.output_dir] = report["seconds"]
        self.log(
            f"{row.name} fraction {fraction:g} seed {seed} lr {lr:g}: accuracy "
            f"{report['accuracy']:.4f}, balanced {report['balanced_accuracy']:.4f} "
            f"({time.time() - start:.0f} s)"
        )
        return report

    def tune(self, row):
        """The row's learning rate: the candidate with the lowest validation
        loss at the tuning fraction, seed 0. Returns `(lr, {lr: val loss})`."""
        settings = self.settings
        if len(settings.lrs) == 1:
            return settings.lrs[0], {}
        losses = {}
        for lr in settings.lrs:
            report = self.run_cell(row, settings.tune_fraction, 0, lr)
            if report is not None:
                losses[lr] = validation_loss(report)
        if not losses:
            return None, {}
        return min(losses, key=losses.get), losses

    def choose_combination(self, choices):
        """The "combo" row's candidate with the lowest validation loss at the
        tuning fraction and seed 0, run at its base row's learning rate.
        Returns `(row, lr, {candidate: val loss})`; `(None, None, {})` while a
        base row or a trial is missing."""
        losses, rates = {}, {}
        for candidate, base in grid.COMBINATIONS:
            lr = choices.get(base, {}).get("learning_rate")
            if lr is None:
                lr = self.tune(grid.ROWS_BY_NAME[base])[0]
            if lr is None:
                continue
            report = self.run_cell(candidate, self.settings.tune_fraction, 0, lr)
            if report is not None:
                losses[candidate.name], rates[candidate.name] = validation_loss(report), lr
        if len(losses) < len(grid.COMBINATIONS):
            return None, None, losses
        best = min(losses, key=losses.get)
        row = next(c for c, _ in grid.COMBINATIONS if c.name == best)
        return row, rates[best], losses

    def collect(self):
        """Runs what is missing; returns the per-row choices and cell results."""
        settings = self.settings
        results, choices = [], {}
        for table_row in settings.rows:
            row = table_row
            if table_row.name == "combo":
                row, lr, losses = self.choose_combination(choices)
                choices["combo"] = {
                    "learning_rate": lr,
                    "combination": None if row is None else row.name,
                    "label": None if row is None else row.label,
                    "validation_loss": losses,
                }
                if row is None:
                    continue
            else:
                lr, losses = self.tune(row)
                choices[row.name] = {
                    "learning_rate": lr,
                    "validation_loss": {f"{k:g}": v for k, v in losses.items()},
                }
            if lr is None:
                continue
            for fraction in settings.fractions:
                for seed in settings.seeds:
                    report = self.run_cell(row, fraction, seed, lr)
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
                            "run_dir": grid.run_dir(settings, row, fraction, seed, lr),
                        }
                    )
        return choices, results

    def collect_investigations(self, choices):
        """Runs (or reads) the ablations whose parent row was run."""
        results = []
        fraction = grid.INVESTIGATION_FRACTION
        for row, parent in grid.INVESTIGATIONS:
            lr = choices.get(parent, {}).get("learning_rate")
            if lr is None:
                continue
            for seed in self.settings.seeds:
                report = self.run_cell(row, fraction, seed, lr)
                if report is not None:
                    results.append(
                        {
                            "row": row.name,
                            "parent": parent,
                            "fraction": fraction,
                            "seed": seed,
                            "learning_rate": lr,
                            "accuracy": report["accuracy"],
                            "balanced_accuracy": report["balanced_accuracy"],
                            "seconds": report["seconds"],
                            "run_dir": grid.run_dir(self.settings, row, fraction, seed, lr),
                        }
                    )
        return results

    # ---- shift robustness ---------------------------------------------------

    def shift_report(self, run, test_cache):
        """Zhang's shift consistency and the accuracy along a diagonal shift
        sweep of one run's model on the test images, cached in
        `<run_dir>/shift.json`; None when absent and nothing may be measured."""
        path = os.path.join(run["run_dir"], "shift.json")
        stored = cache.read_json(path)
        if stored is not None or self.settings.table_only:
            return stored
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
            "max_shift": grid.MAX_SHIFT,
            "consistency": evaluation.shift_consistency(
                model, images, max_shift=grid.MAX_SHIFT, num_pairs=5
            ),
            "sweep": evaluation.accuracy_vs_shift(model, images, labels, max_shift=grid.MAX_SHIFT),
        }
        atomic_write_text(path, json.dumps(result) + "\n")
        keras.backend.clear_session()
        return result

    def collect_shift(self, results):
        """Shift reports of every run of the rows in `grid.SHIFT_ROWS`, by
        `(row, fraction, seed)`."""
        from keras_seltransfer import training

        runs = [r for r in results if r["row"] in grid.SHIFT_ROWS]
        if not runs:
            return {}
        # The target's held-out test split (the one every run is scored on).
        _, test = training.load_train_test(self.settings.target)
        test_cache = {"source": test}
        out = {}
        for run in runs:
            report = self.shift_report(run, test_cache)
            if report is not None:
                out[(run["row"], run["fraction"], run["seed"])] = report
        return out
