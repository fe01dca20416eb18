"""The Markdown tables and results.json of tools/reproduce.py.

Everything here is built from the records the runner returns (plain dicts,
one per cell: row, fraction, seed, learning rate, accuracy, balanced
accuracy, ...), so the tables can be rebuilt from the cache alone.
"""

import json
import os

from keras_seltransfer.comparison.tables import cell
from tools.results import grid

MARKER = "<!-- results-table -->"


def table(settings, choices, results):
    """The results table (Markdown) in the paper's layout.

    Args:
        settings: the invocation's `grid.Settings` (rows and fractions shown).
        choices: per row name, `{"learning_rate": ..., "label": ...}` (the
            label only for the combination row).
        results: cell records.

    Returns:
        The table as a string, one line per row of `settings.rows`.
    """
    head = " | ".join(f"{f:.0%}" for f in settings.fractions)
    lines = [
        f"| row | paper | lr | {head} | authors' figure (their data) |",
        "|---|---|---|" + "---|" * len(settings.fractions) + "---|",
    ]
    for row in settings.rows:
        choice = choices.get(row.name, {})
        lr = choice.get("learning_rate")
        cells = [
            cell([r for r in results if r["row"] == row.name and r["fraction"] == f])
            for f in settings.fractions
        ]
        lr_text = "-" if lr is None else f"{lr:g}"
        label = row.label + (f": {choice['label']}" if choice.get("label") else "")
        lines.append(f"| {label} | {row.paper} | {lr_text} | " + " | ".join(cells) + f" | {row.reported} |")
    return "\n".join(lines)


def investigation_table(results, investigations):
    """The ablations beside their parent rows, at the investigation fraction.

    Args:
        results: cell records of the table rows.
        investigations: cell records of the ablations (with `row`).

    Returns:
        The table as a string; "" when no ablation was run.
    """
    fraction = grid.INVESTIGATION_FRACTION
    lines = [
        f"| row | parent row at {fraction:.0%} | ablation at {fraction:.0%} |",
        "|---|---|---|",
    ]
    for row, parent in grid.INVESTIGATIONS:
        runs = [r for r in investigations if r["row"] == row.name]
        if not runs:
            continue
        base = [r for r in results if r["row"] == parent and r["fraction"] == fraction]
        lines.append(f"| {row.label} | {cell(base)} | {cell(runs)} |")
    return "\n".join(lines) if len(lines) > 2 else ""


def shifted_accuracy(sweep):
    """Mean test accuracy over a shift sweep's non-zero shifts.

    Args:
        sweep: `{"shifts": [...], "accuracy": [...]}`, as
            `evaluation.accuracy_vs_shift` returns it.

    Returns:
        A float.

    Example:

    >>> shifted_accuracy({"shifts": [-1, 0, 1], "accuracy": [0.5, 1.0, 0.7]})
    0.6
    """
    values = [a for d, a in zip(sweep["shifts"], sweep["accuracy"]) if d != 0]
    return sum(values) / len(values)


def shift_table(settings, shift):
    """Shift consistency / mean shifted accuracy per row and fraction.

    Args:
        settings: the invocation's `grid.Settings`.
        shift: shift reports by `(row, fraction, seed)`.

    Returns:
        The table as a string.
    """
    from keras_seltransfer.training import mean_std

    rows = [r for r in settings.rows if r.name in grid.SHIFT_ROWS]
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
                shifted = mean_std([shifted_accuracy(v["sweep"]) for v in found])
                cells.append(f"{m:.3f} ± {s:.3f} / {shifted[0]:.3f} ± {shifted[1]:.3f}")
            else:
                cells.append("-")
        lines.append(f"| {row.label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def settings_text(settings, results, run_seconds, environment):
    """The paragraph above the tables: data, budget, tuning, machine, cost.

    Args:
        settings: the invocation's `grid.Settings`.
        results: cell records of the table.
        run_seconds: seconds of every run used, by run directory.
        environment: `training.run_environment()`.

    Returns:
        A string.
    """
    from keras_seltransfer import training

    env = environment
    seconds = sum(run_seconds.values())
    config = training.FinetuneConfig()
    return (
        f"Target {settings.target} (fixed held-out test split), source {settings.source}"
        f"{'' if settings.max_source is None else f' (first {settings.max_source} images)'}, "
        f"backbone `{settings.backbone}` at {settings.image_size}px; every run: Adam with cosine "
        f"decay, batch {settings.batch_size}, flips, {settings.epochs} epochs keeping the best "
        f"validation epoch (patience {settings.patience}), validation split "
        f"{config.val_fraction:.0%} of the kept training images; learning rate per row chosen "
        f"from {{{', '.join(f'{x:g}' for x in settings.lrs)}}} by validation cross-entropy at "
        f"{settings.tune_fraction:.0%}, seed 0. Cells: test accuracy / balanced accuracy, mean ± "
        f"population std over seeds {', '.join(map(str, settings.seeds))}. "
        f"{env['machine']}, TensorFlow {env['tensorflow']}, Keras {env['keras']}, Python "
        f"{env['python']}; {len(results)} cells, {len(run_seconds)} runs with the tuning "
        f"trials and ablations, {seconds / 3600:.2f} h of run time in all (sum of the runs' "
        "own times)."
    )


def body(settings, choices, results, investigations, shift):
    """The tables under the settings paragraph: results, ablations (when
    run) and shift consistency (when measured).

    Args:
        settings: the invocation's `grid.Settings`.
        choices: per-row learning-rate choices.
        results: cell records of the table rows.
        investigations: cell records of the ablations.
        shift: shift reports by `(row, fraction, seed)`.

    Returns:
        Markdown text.
    """
    text = table(settings, choices, results)
    ablations = investigation_table(results, investigations)
    if ablations:
        text += (
            "\n\nAblations (same budget and learning rate as the parent row; test accuracy / "
            "balanced accuracy, mean ± std over the same seeds):\n\n" + ablations
        )
    if shift:
        text += (
            f"\n\nShift consistency (Zhang, ICML 2019) on the test images: how often "
            f"two random shifts of up to {grid.MAX_SHIFT} pixels (reflect-padded crops, 5 pairs "
            "per image) give the same class; then the test accuracy averaged over the "
            f"diagonal shifts -{grid.MAX_SHIFT}..{grid.MAX_SHIFT} pixels except 0 (the curves of "
            "shift_consistency.png); mean ± std over seeds.\n\n" + shift_table(settings, shift)
        )
    return text


def results_document(header, environment, choices, results, investigations, shift):
    """The content of results.json.

    Args:
        header: the settings paragraph.
        environment: `training.run_environment()`.
        choices: per-row learning-rate choices.
        results: cell records of the table rows.
        investigations: cell records of the ablations.
        shift: shift reports by `(row, fraction, seed)`.

    Returns:
        A JSON-serialisable dict with the keys `settings`, `environment`,
        `choices`, `runs`, `investigations` and `shift_consistency`.
    """
    return {
        "settings": header,
        "environment": environment,
        "choices": choices,
        "runs": results,
        "investigations": investigations,
        "shift_consistency": [
            {"row": n, "fraction": f, "seed": s, "consistency": v["consistency"]}
            for (n, f, s), v in sorted(shift.items())
        ],
    }


def splice(path, marker, text):
    """Replaces the text between two `marker` lines of a Markdown file (or
    writes a new file holding only that block), atomically.

    Args:
        path: the Markdown file.
        marker: the line that opens and closes the block.
        text: the new block content.
    """
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


def write_tables(output_dir, header, text, document):
    """Writes results_table.md, the block of RESULTS.md and results.json.

    Args:
        output_dir: the directory (existing).
        header: the settings paragraph.
        text: the tables (`body`).
        document: the content of results.json (`results_document`).
    """
    from keras_seltransfer.utils.io import atomic_write_text

    atomic_write_text(os.path.join(output_dir, "results_table.md"), header + "\n\n" + text + "\n")
    splice(os.path.join(output_dir, "RESULTS.md"), MARKER, header + "\n\n" + text)
    atomic_write_text(
        os.path.join(output_dir, "results.json"), json.dumps(document, indent=2) + "\n"
    )
