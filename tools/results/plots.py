"""The PNG plots of tools/reproduce.py, drawn from the cache (matplotlib, Agg).

Accuracy versus target fraction, retrieval examples, neighbour-set growth,
AdaFilter gate usage per layer, and accuracy versus input shift. Every plot
is written atomically; a plot whose runs are missing is skipped.
"""

import json
import os

from keras_seltransfer.comparison import plots as comparison_plots
from keras_seltransfer.comparison.plots import figure_bytes
from keras_seltransfer.comparison.plots import pyplot
from tools.results import grid


def _write(path, fig):
    from keras_seltransfer.utils.io import atomic_write_bytes

    atomic_write_bytes(path, figure_bytes(fig))


def plot_accuracy(settings, results, path):
    """Test accuracy and balanced accuracy versus target fraction, one line
    per row (`comparison.plots.plot_accuracy`); on ELPV with the accuracy
    of always answering "functional"."""
    comparison_plots.plot_accuracy(
        settings.rows, settings.fractions, results, path,
        f"{settings.target} test accuracy versus target training data (mean ± std over seeds)",
        reference_accuracy=0.6875 if settings.target == "elpv" else None,
    )


def plot_growth(results, path):
    """Neighbour-set growth over training of the full SJFT rows (seed 0).

    Returns:
        Whether the plot was written.
    """
    runs = [r for r in results if r["row"] == "sjft" and r["seed"] == 0]
    if not runs:
        return False
    fig, ax = pyplot().subplots(figsize=(7, 4.5))
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
    _write(path, fig)
    return True


def write_retrieval_examples(settings, path):
    """Target images beside their selected (nearest) and farthest source images.

    Returns:
        Whether the image was written (False without a conv-bank index).
    """
    directory = grid.index_dir(settings, "conv")
    if not os.path.isfile(os.path.join(directory, "neighbours.npz")):
        return False
    from keras_seltransfer.retrieval import neighbour_grid
    from keras_seltransfer.utils.io import atomic_write_bytes

    atomic_write_bytes(path, neighbour_grid(directory, rows=6, columns=6, tile=48, seed=0))
    return True


def plot_shift(settings, shift, path):
    """Accuracy along the diagonal shift sweep, per row (seed mean), at the
    smallest and largest fractions.

    Returns:
        Whether the plot was written.
    """
    import numpy as np

    if not shift:
        return False
    fractions = sorted({f for (_, f, _) in shift})
    shown = [fractions[0], fractions[-1]] if len(fractions) > 1 else fractions
    fig, axes = pyplot().subplots(1, len(shown), figsize=(6.5 * len(shown), 4.5), squeeze=False)
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
    _write(path, fig)
    return True


def plot_gate_usage(results, path):
    """AdaFilter: share of fine-tuned filters chosen per gated layer (hard
    gates on the validation images), per fraction, mean over seeds.

    Returns:
        Whether the plot was written.
    """
    import numpy as np

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
    fig, ax = pyplot().subplots(figsize=(8, 4.5))
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
    _write(path, fig)
    return True


def write_plots(settings, results, shift):
    """Writes every plot whose runs exist into `settings.output_dir`.

    Args:
        settings: the invocation's `grid.Settings`.
        results: cell records of the table rows.
        shift: shift reports by `(row, fraction, seed)`.

    Returns:
        The file names written, in order.
    """
    written = []
    out = settings.output_dir
    if results:
        plot_accuracy(settings, results, os.path.join(out, "accuracy_vs_fraction.png"))
        written.append("accuracy_vs_fraction.png")
    if plot_growth(results, os.path.join(out, "neighbour_growth.png")):
        written.append("neighbour_growth.png")
    if write_retrieval_examples(settings, os.path.join(out, "retrieval_examples.png")):
        written.append("retrieval_examples.png")
    if plot_gate_usage(results, os.path.join(out, "adafilter_gate_usage.png")):
        written.append("adafilter_gate_usage.png")
    if plot_shift(settings, shift, os.path.join(out, "shift_consistency.png")):
        written.append("shift_consistency.png")
    return written
