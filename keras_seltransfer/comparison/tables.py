"""The Markdown tables and results.json of a comparison.

Built from the records `ComparisonRunner.collect` returns (plain dicts, one
per cell: row, fraction, seed, accuracy, balanced accuracy, ...), so they
can be rebuilt from the run cache alone (`table_only`).
"""

import json
import os

from keras_seltransfer.comparison import search
from keras_seltransfer.comparison import stats
from keras_seltransfer.comparison.runner import best_baseline

METRICS = ("balanced_accuracy", "accuracy")


def cell(runs):
    """One table cell: `accuracy / balanced accuracy`, each as mean ± population
    std over the runs; "-" when there are none.

    Args:
        runs: cell records (dicts with `accuracy` and `balanced_accuracy`).

    Returns:
        A string such as `"0.688 ± 0.000 / 0.500 ± 0.000"`.

    Example:

    >>> cell([{"accuracy": 0.5, "balanced_accuracy": 0.25}])
    '0.500 ± 0.000 / 0.250 ± 0.000'
    """
    from keras_seltransfer.training import mean_std

    if not runs:
        return "-"
    acc = mean_std([r["accuracy"] for r in runs])
    bal = mean_std([r["balanced_accuracy"] for r in runs])
    return f"{acc[0]:.3f} ± {acc[1]:.3f} / {bal[0]:.3f} ± {bal[1]:.3f}"


def settings_text(settings, choices, results, run_seconds, environment, controls=()):
    """The paragraph above the tables: data, protocol, budget, machine, cost.

    Args:
        settings: the `ComparisonSettings`.
        choices: per row, what its search chose (`ComparisonRunner.collect`).
        results: cell records.
        run_seconds: seconds of every run used, by run directory.
        environment: `training.run_environment()`.
        controls: cell records of further runs beside the rows (counted).

    Returns:
        A string.

    Example:

    >>> settings_text(settings, choices, results, runner.run_seconds,
    ...               training.run_environment())  # doctest: +SKIP
    'Target elpv (fixed held-out test split), ...'
    """
    env = environment
    seconds = sum(run_seconds.values())
    seeds = ", ".join(
        f"{f:.0%}: {len(search.seeds_for(f, settings.seeds))}" for f in settings.fractions
    )
    best = best_baseline(choices)
    weights = getattr(settings, "backbone_weights", None)
    source = "" if settings.source is None else f", source {settings.source}" + (
        "" if settings.max_source is None else f" (first {settings.max_source} images)"
    )
    cells = f"{len(results)} cells" + (f" and {len(controls)} control cells" if controls else "")
    return (
        f"Target {settings.target} (fixed held-out test split){source}, "
        f"backbone `{settings.backbone}`{'' if weights is None else f' ({weights} weights)'} at "
        f"{settings.image_size}px. Every run: Adam with cosine decay, batch {settings.batch_size}, "
        f"flips, {settings.epochs} epochs keeping the best validation epoch; joint rows at "
        "single-task steps per epoch (equal optimizer steps). "
        f"Search per row: {settings.trials} trials at {settings.tune_fraction:.0%}, each scored "
        f"by the validation cross-entropy averaged over seeds "
        f"{', '.join(map(str, settings.tune_seeds))} (stage 1: learning rate "
        f"{{{', '.join(f'{x:g}' for x in search.LEARNING_RATES)}}} x BatchNorm "
        "{frozen, train}, the linear probe: its features; stage 2: the row's own settings, then "
        "neighbouring learning rates). Cells: test accuracy / balanced accuracy, mean ± population "
        f"std over seeds ({seeds}). Best baseline (lowest tuned validation loss): "
        f"{best or '-'}. {env['machine']}, TensorFlow {env['tensorflow']}, Keras {env['keras']}; "
        f"{cells}, {len(run_seconds)} runs with the search, {seconds / 3600:.2f} h of run time "
        "in all (sum of the runs' own times)."
    )


def main_table(settings, choices, results):
    """Rows x fractions, with each row's chosen configuration and its score.

    Args:
        settings: the `ComparisonSettings` (its rows and fractions are shown).
        choices: per row, what its search chose.
        results: cell records.

    Returns:
        The Markdown table.

    Example:

    >>> print(main_table(settings, choices, results))  # doctest: +SKIP
    | row | paper | kind | chosen on validation | val. loss | 15% |
    ...
    """
    head = " | ".join(f"{f:.0%}" for f in settings.fractions)
    lines = [
        f"| row | paper | kind | chosen on validation | val. loss | {head} |",
        "|---|---|---|---|---|" + "---|" * len(settings.fractions),
    ]
    for row in settings.rows:
        choice = choices.get(row.name, {})
        loss = choice.get("validation_loss")
        trial = (search.trial_slug(choice["overrides"], row.overrides)
                 if choice.get("overrides") else "-")
        cells = [
            cell([r for r in results if r["row"] == row.name and r["fraction"] == f])
            for f in settings.fractions
        ]
        lines.append(
            f"| {row.label} | {row.paper} | {row.kind} | {trial} | "
            f"{'-' if loss is None else f'{loss:.4f}'} | " + " | ".join(cells) + " |"
        )
    return "\n".join(lines)


def paired_rows(results, reference, fractions, names, metrics=METRICS):
    """Paired differences of each named row to `reference`, per fraction.

    Args:
        results: cell records.
        reference: the row every other is compared with.
        fractions: the fractions compared.
        names: the rows compared (`reference` itself is skipped).
        metrics: the record fields compared.

    Returns:
        A list of dicts: row, reference, fraction, metric, seeds, mean, low,
        high, verdict (only where both rows have at least 2 common seeds).

    Example:

    >>> cells = [{"row": r, "fraction": 0.15, "seed": s, "accuracy": a, "balanced_accuracy": a}
    ...          for r, values in (("a", (0.7, 0.8)), ("b", (0.6, 0.65)))
    ...          for s, a in enumerate(values)]
    >>> [p["verdict"] for p in paired_rows(cells, "b", [0.15], ["a"], ["accuracy"])]
    ['no difference']
    """
    out = []
    for name in names:
        if name == reference:
            continue
        for fraction in fractions:
            for metric in metrics:
                seeds, diffs = stats.paired_differences(results, name, reference, fraction, metric)
                if len(diffs) < 2:
                    continue
                mean, low, high = stats.paired_interval(diffs)
                out.append({
                    "row": name, "reference": reference, "fraction": fraction, "metric": metric,
                    "seeds": seeds, "mean": mean, "low": low, "high": high,
                    "verdict": stats.verdict(low, high),
                })
    return out


def _position(labels, name):
    return list(labels).index(name) if name in labels else len(labels)


def paired_table(paired, labels):
    """Markdown of `paired_rows`: one line per row and fraction, balanced
    accuracy then accuracy.

    Args:
        paired: what `paired_rows` returns.
        labels: row names -> table labels, in table order.

    Returns:
        The Markdown table; "" when `paired` is empty.

    Example:

    >>> paired_table(paired_rows(cells, "baseline", [0.15], ["sjft"]),
    ...              {"baseline": "Fine-tuning", "sjft": "SJFT"})  # doctest: +SKIP
    """
    if not paired:
        return ""
    lines = [
        "| row minus reference | fraction | balanced accuracy [95% interval] | accuracy [95% interval] | seeds |",
        "|---|---|---|---|---|",
    ]
    keys = sorted({(p["row"], p["reference"], p["fraction"]) for p in paired},
                  key=lambda k: (_position(labels, k[0]), k[2], _position(labels, k[1])))
    for row, reference, fraction in keys:
        parts = {}
        for p in paired:
            if (p["row"], p["reference"], p["fraction"]) == (row, reference, fraction):
                parts[p["metric"]] = p
        text = []
        for metric in METRICS:
            p = parts.get(metric)
            text.append("-" if p is None else
                        f"{p['mean']:+.3f} [{p['low']:+.3f}, {p['high']:+.3f}] {p['verdict']}")
        seeds = len(next(iter(parts.values()))["seeds"])
        lines.append(f"| {labels.get(row, row)} - {labels.get(reference, reference)} | "
                     f"{fraction:.0%} | {text[0]} | {text[1]} | {seeds} |")
    return "\n".join(lines)


def body(settings, choices, results):
    """The main table, then the paired differences to the best baseline.

    Args:
        settings: the `ComparisonSettings`.
        choices: per row, what its search chose.
        results: cell records.

    Returns:
        `(markdown, paired)`: the tables and the `paired_rows` they show.

    Example:

    >>> text, paired = body(settings, choices, results)  # doctest: +SKIP
    """
    labels = {row.name: row.label for row in settings.rows}
    text = main_table(settings, choices, results)
    best = best_baseline(choices)
    paired = []
    if best is not None:
        paired = paired_rows(results, best, settings.fractions, [r.name for r in settings.rows])
        if paired:
            text += (
                f"\n\nPaired differences to the best baseline ({labels.get(best, best)}), per seed, "
                "test balanced accuracy and accuracy, mean [95% Student-t interval]; "
                "better/worse only when the interval excludes zero:\n\n" + paired_table(paired, labels)
            )
    return text, paired


def write_outputs(output_dir, header, text, document):
    """Writes results_table.md and results.json atomically.

    Args:
        output_dir: the directory (made when missing).
        header: the settings paragraph.
        text: the tables (`body`).
        document: the content of results.json.

    Returns:
        The paths written.

    Example:

    >>> write_outputs("runs/compare/x", header, text, document)  # doctest: +SKIP
    ['runs/compare/x/results_table.md', 'runs/compare/x/results.json']
    """
    from keras_seltransfer.utils.io import atomic_write_text

    os.makedirs(output_dir, exist_ok=True)
    written = [os.path.join(output_dir, name) for name in ("results_table.md", "results.json")]
    atomic_write_text(written[0], header + "\n\n" + text + "\n")
    atomic_write_text(written[1], json.dumps(document, indent=2) + "\n")
    return written


__all__ = [
    "body",
    "cell",
    "main_table",
    "paired_rows",
    "paired_table",
    "settings_text",
    "write_outputs",
]
