"""Tables, results.json and plots of the deconfounded protocol.

Built from the records `ProtocolRunner` returns, so they can be rebuilt
from the cache alone (`--table_only`).
"""

import json
import os

from tools.results import protocol
from tools.results import stats
from tools.results.protocol_runner import best_baseline
from tools.results.tables import cell
from tools.results.tables import splice

MARKER = "<!-- deconfounded-table -->"
METRICS = ("balanced_accuracy", "accuracy")


def settings_text(settings, choices, results, controls, run_seconds, environment):
    """The paragraph above the tables: data, protocol, budget, machine, cost."""
    env = environment
    seconds = sum(run_seconds.values())
    seeds = ", ".join(
        f"{f:.0%}: {len(protocol.seeds_for(f, settings.seeds))}" for f in settings.fractions
    )
    best = best_baseline(choices)
    return (
        f"Target {settings.target} (fixed held-out test split), source {settings.source}"
        f"{'' if settings.max_source is None else f' (first {settings.max_source} images)'}, "
        f"backbone `{settings.backbone}` at {settings.image_size}px. Every run: Adam with cosine "
        f"decay, batch {settings.batch_size}, flips, {settings.epochs} epochs keeping the best "
        f"validation epoch; joint rows at single-task steps per epoch (equal optimizer steps). "
        f"Search per row: {settings.trials} trials at {settings.tune_fraction:.0%}, each scored "
        f"by the validation cross-entropy averaged over seeds "
        f"{', '.join(map(str, settings.tune_seeds))} (stage 1: learning rate "
        f"{{{', '.join(f'{x:g}' for x in protocol.LEARNING_RATES)}}} x BatchNorm "
        "{frozen, train}, the linear probe: its features; stage 2: the row's own settings, then "
        "neighbouring learning rates). Cells: test accuracy / balanced accuracy, mean ± population "
        f"std over seeds ({seeds}). Best baseline (lowest tuned validation loss): "
        f"{best or '-'}. {env['machine']}, TensorFlow {env['tensorflow']}, Keras {env['keras']}; "
        f"{len(results)} cells and {len(controls)} control cells, {len(run_seconds)} runs with "
        f"the search, {seconds / 3600:.2f} h of run time in all (sum of the runs' own times)."
    )


def main_table(settings, choices, results):
    """Rows x fractions, with each row's chosen configuration and its score."""
    head = " | ".join(f"{f:.0%}" for f in settings.fractions)
    lines = [
        f"| row | paper | kind | chosen on validation | val. loss | {head} |",
        "|---|---|---|---|---|" + "---|" * len(settings.fractions),
    ]
    for row in settings.rows:
        choice = choices.get(row.name, {})
        loss = choice.get("validation_loss")
        trial = protocol.trial_slug(choice["overrides"], row.overrides) if choice.get("overrides") else "-"
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

    Returns:
        A list of dicts: row, fraction, metric, seeds, mean, low, high,
        verdict (only where both rows have at least 2 common seeds).
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


def paper_claims(results, settings, references=protocol.PAPER_REFERENCES):
    """Paired differences of each method to the row its paper compares with
    (`protocol.PAPER_REFERENCES`), for the rows this run has."""
    names = {row.name for row in settings.rows}
    out = []
    for row, reference in references:
        if row in names and reference in names:
            out += paired_rows(results, reference, settings.fractions, [row])
    return out


def _position(labels, name):
    return list(labels).index(name) if name in labels else len(labels)


def paired_table(paired, labels):
    """Markdown of `paired_rows`: one line per row and fraction, balanced
    accuracy then accuracy."""
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


def controls_table(settings, results, controls):
    """The SJFT controls beside their parent, per control fraction."""
    if not controls:
        return ""
    head = " | ".join(f"{f:.0%}" for f in settings.control_fractions)
    lines = [f"| row | {head} |", "|---|" + "---|" * len(settings.control_fractions)]
    for name in ["sjft"] + [c[0] for c in protocol.CONTROLS]:
        source = results if name == "sjft" else controls
        runs = [r for r in source if r["row"] == name]
        if not runs:
            continue
        label = protocol.ROWS_BY_NAME["sjft"].label if name == "sjft" else protocol.CONTROLS_BY_NAME[name][1]
        cells = [cell([r for r in runs if r["fraction"] == f]) for f in settings.control_fractions]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def labels_of(settings):
    """Row and control names -> table labels."""
    labels = {row.name: row.label for row in settings.rows}
    labels.update({c[0]: c[1] for c in protocol.CONTROLS})
    return labels


def body(settings, choices, results, controls):
    """The tables: main, paired differences to the best baseline, controls
    and their paired differences to sjft."""
    labels = labels_of(settings)
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
    claims = paper_claims(results, settings)
    if claims:
        text += ("\n\nEach method minus the row its paper claims to improve on (tuned "
                 "fine-tuning, under the same protocol), per seed:\n\n" + paired_table(claims, labels))
    control_paired = paired_rows(results + controls, "sjft", settings.control_fractions,
                                 [c[0] for c in protocol.CONTROLS])
    table = controls_table(settings, results, controls)
    if table:
        text += ("\n\nSJFT controls (sjft's chosen configuration with one change):\n\n" + table)
        if control_paired:
            text += ("\n\nEach control minus sjft, per seed (a negative difference: the change "
                     "hurts):\n\n" + paired_table(control_paired, labels))
    return text, paired + claims + control_paired


def validation_curves(settings, choices, results):
    """Per row, the validation loss per epoch of its chosen configuration at
    the tuning fraction and seed 0 (read from the run's report)."""
    curves = {}
    for row in settings.rows:
        runs = [r for r in results if r["row"] == row.name
                and r["fraction"] == settings.tune_fraction and r["seed"] == min(settings.tune_seeds)]
        if not runs:
            continue
        path = os.path.join(runs[0]["run_dir"], "report.json")
        if not os.path.isfile(path):
            continue
        with open(path) as f:
            history = json.load(f).get("history", {})
        for key in ("val_crossentropy", "val_target_crossentropy"):
            if history.get(key):
                curves[row.name] = history[key]
                break
    return curves


def plot_validation_curves(settings, curves, path):
    """Validation cross-entropy per epoch of every row's chosen run."""
    from keras_seltransfer.utils.io import atomic_write_bytes
    from tools.results.plots import figure_bytes
    from tools.results.plots import pyplot

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    labels = labels_of(settings)
    for name, values in curves.items():
        ax.plot(range(1, len(values) + 1), values, label=labels.get(name, name), marker=".")
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation cross-entropy")
    ax.set_title(f"Validation loss per epoch, chosen configuration, {settings.tune_fraction:.0%}, seed "
                 f"{min(settings.tune_seeds)}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    atomic_write_bytes(path, figure_bytes(fig))


def summary_marker(target):
    """The marker pair that holds one target's tables in a summary file.

    >>> summary_marker("elpv")
    '<!-- deconfounded-table:elpv -->'
    """
    from keras_seltransfer.utils.naming import spec_slug

    return f"<!-- deconfounded-table:{spec_slug(target)} -->"


def splice_summary(path, target, text):
    """Replaces the target's block of the summary file `path`.

    Only a file that already holds the target's marker pair is changed (the
    discussion around the block is kept); returns whether it was.
    """
    marker = summary_marker(target)
    if not os.path.isfile(path):
        return False
    with open(path) as f:
        if f.read().count(marker) != 2:
            return False
    splice(path, marker, text)
    return True


def write_outputs(settings, header, text, document):
    """Writes results_table.md, the block of RESULTS.md and results.json, and
    the target's block of `settings.summary`; returns the paths written."""
    from keras_seltransfer.utils.io import atomic_write_text

    os.makedirs(settings.output_dir, exist_ok=True)
    written = [os.path.join(settings.output_dir, name)
               for name in ("results_table.md", "RESULTS.md", "results.json")]
    atomic_write_text(written[0], header + "\n\n" + text + "\n")
    splice(written[1], MARKER, header + "\n\n" + text)
    atomic_write_text(written[2], json.dumps(document, indent=2) + "\n")
    if settings.summary and splice_summary(settings.summary, settings.target, header + "\n\n" + text):
        written.append(settings.summary)
    return written


__all__ = [
    "body",
    "main_table",
    "paired_rows",
    "paper_claims",
    "paired_table",
    "plot_validation_curves",
    "settings_text",
    "splice_summary",
    "summary_marker",
    "validation_curves",
    "write_outputs",
]
