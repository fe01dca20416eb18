"""One comparison from start to end: search, grid, tables, plot, results.json."""

import os

from keras_seltransfer.comparison import plots
from keras_seltransfer.comparison import search
from keras_seltransfer.comparison import tables
from keras_seltransfer.comparison.runner import ComparisonRunner
from keras_seltransfer.comparison.runner import best_baseline
from keras_seltransfer.utils.run_lock import RunLock


def compare(settings, plot=True, program="compare"):
    """Runs (or reads from the cache) a whole comparison and writes its outputs.

    Every row is searched on validation with the same budget, its chosen
    configuration run at every fraction and seed, and each row compared
    with the best baseline by paired per-seed differences. Writes
    `results_table.md`, `results.json` and (with `plot` and matplotlib
    installed) `accuracy_vs_fraction.png` into `settings.output_dir`, each
    atomically. The comparison owns `settings.output_dir` while it runs (its
    lock file `run.lock`, see `keras_seltransfer.utils.RunLock`), and every
    run of the cache owns its own directory as `finetune` does.

    Args:
        settings: a `ComparisonSettings`.
        plot: whether to draw the accuracy-versus-fraction plot.
        program: the name progress lines start with.

    Returns:
        A dict: `header` (settings paragraph), `text` (the tables),
        `document` (the content of results.json), `written` (paths),
        `trained` (runs trained by this call; the others came from the
        cache) and `planned` (runs of the whole comparison).

    Raises:
        ValueError: for rows that name unknown methods or fields, a search
            budget smaller than a row's stage 1, or a run cache made with
            other settings.
        RunLockedError: if another comparison owns `settings.output_dir`,
            or another run one of the runs' directories.

    Example:

    >>> settings = ComparisonSettings(
    ...     rows=search.select_rows(["linear_probe", "baseline"]), fractions=[0.15, 0.3],
    ...     seeds=[0, 1, 2], tune_seeds=[0], tune_fraction=0.15, epochs=30,
    ...     output_dir="runs/compare/cells", runs_dir="runs/compare/cells/runs",
    ...     backbone="resnet50", backbone_weights="imagenet", target="folder:/data/cells",
    ...     source=None, image_size=224, batch_size=32)
    >>> outputs = compare(settings)  # doctest: +SKIP
    >>> print(outputs["text"])  # doctest: +SKIP
    """
    search.validate_rows(settings.rows)
    for row in settings.rows:
        search.stage1_trials(row, settings.trials)
    force = getattr(settings, "force", False)
    with RunLock(settings.output_dir, force=force, what=f"the comparison {settings.output_dir!r}"):
        return _compare(settings, plot, program)


def _compare(settings, plot, program):
    from keras_seltransfer import methods
    from keras_seltransfer import training

    # Import every method's code now, so a comparison that runs for hours
    # uses one version of it throughout.
    methods.names()
    runner = ComparisonRunner(settings, program)
    runner.ensure_backbone()
    choices, results = runner.collect()
    environment = training.run_environment()
    header = tables.settings_text(settings, choices, results, runner.run_seconds, environment)
    text, paired = tables.body(settings, choices, results)
    document = {
        "protocol": search.__doc__,
        "settings": header,
        "environment": environment,
        "best_baseline": best_baseline(choices),
        "choices": choices,
        "runs": results,
        "paired": paired,
    }
    written = tables.write_outputs(settings.output_dir, header, text, document)
    if plot and results:
        try:
            plots.pyplot()
        except ImportError:
            runner.log("matplotlib is not installed (pip install keras_seltransfer[plots]): no plot")
        else:
            path = os.path.join(settings.output_dir, "accuracy_vs_fraction.png")
            plots.plot_accuracy(
                settings.rows, settings.fractions, results, path,
                f"{settings.target} test accuracy versus target training data "
                "(mean ± std over seeds)",
            )
            written.append(path)
    return {
        "header": header,
        "text": text,
        "document": document,
        "written": written,
        "trained": runner.trained,
        "planned": runner.planned,
    }


__all__ = ["compare"]
