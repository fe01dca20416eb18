"""Tables, results.json and plots of the deconfounded protocol.

The main table and the paired differences to the best baseline are the
library's (`keras_seltransfer.comparison.tables`); this module adds the
paper claims, the SJFT controls, the validation curves and the summary
file. Built from the records `ProtocolRunner` returns, so they can be
rebuilt from the cache alone (`--table_only`).
"""

import json
import os

from keras_seltransfer.comparison import tables
from keras_seltransfer.comparison.tables import cell
from keras_seltransfer.comparison.tables import paired_rows
from keras_seltransfer.comparison.tables import paired_table
from tools.results import protocol
from tools.results.tables import splice

MARKER = "<!-- deconfounded-table -->"


def settings_text(settings, choices, results, controls, run_seconds, environment):
    """The paragraph above the tables (`comparison.tables.settings_text`)."""
    return tables.settings_text(settings, choices, results, run_seconds, environment, controls)


def paper_claims(results, settings, references=protocol.PAPER_REFERENCES):
    """Paired differences of each method to the row its paper compares with
    (`protocol.PAPER_REFERENCES`), for the rows this run has."""
    names = {row.name for row in settings.rows}
    out = []
    for row, reference in references:
        if row in names and reference in names:
            out += paired_rows(results, reference, settings.fractions, [row])
    return out


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
    text, paired = tables.body(settings, choices, results)
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
    from keras_seltransfer.comparison.plots import figure_bytes
    from keras_seltransfer.comparison.plots import pyplot
    from keras_seltransfer.utils.io import atomic_write_bytes

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
    """Writes results_table.md and results.json (`comparison.tables.write_outputs`),
    the block of RESULTS.md, and the target's block of `settings.summary`;
    returns the paths written."""
    written = tables.write_outputs(settings.output_dir, header, text, document)
    results_md = os.path.join(settings.output_dir, "RESULTS.md")
    splice(results_md, MARKER, header + "\n\n" + text)
    written.append(results_md)
    if settings.summary and splice_summary(settings.summary, settings.target, header + "\n\n" + text):
        written.append(settings.summary)
    return written


__all__ = [
    "body",
    "paper_claims",
    "plot_validation_curves",
    "settings_text",
    "splice_summary",
    "summary_marker",
    "validation_curves",
    "write_outputs",
]
