"""The PNG plots of a comparison (matplotlib with the Agg backend).

matplotlib is an optional dependency (the `plots` extra); every plot is
written atomically.
"""

import io

import numpy as np


def pyplot():
    """matplotlib's pyplot with the non-interactive Agg backend.

    Raises:
        ImportError: when matplotlib is not installed (`pip install
            keras_seltransfer[plots]`).

    Example:

    >>> fig, ax = pyplot().subplots()  # doctest: +SKIP
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def figure_bytes(fig):
    """The PNG bytes of a matplotlib figure (110 dpi, tight), closing it.

    Args:
        fig: a `matplotlib.figure.Figure`.

    Returns:
        bytes.

    Example:

    >>> fig, ax = pyplot().subplots()  # doctest: +SKIP
    >>> figure_bytes(fig)[:8]  # doctest: +SKIP
    b'\\x89PNG\\r\\n\\x1a\\n'
    """
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    pyplot().close(fig)
    return buffer.getvalue()


def plot_accuracy(rows, fractions, results, path, title, reference_accuracy=None):
    """Test accuracy and balanced accuracy versus target fraction, one line
    per row (mean ± std over seeds), written atomically as a PNG.

    Args:
        rows: the rows drawn (with `name` and `label`), in legend order.
        fractions: the target fractions (x axis, log scale).
        results: cell records.
        path: the PNG file.
        title: the figure's title.
        reference_accuracy: an accuracy drawn as a dotted line (e.g. that of
            always answering the majority class), or None.

    Example:

    >>> plot_accuracy(settings.rows, settings.fractions, results,
    ...               "accuracy_vs_fraction.png", "elpv")  # doctest: +SKIP
    """
    from keras_seltransfer.utils.io import atomic_write_bytes

    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    for metric, ax in zip(("accuracy", "balanced_accuracy"), axes):
        for row in rows:
            xs, ms, ss = [], [], []
            for f in fractions:
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
        ax.set_xticks(list(fractions), [f"{f:.0%}" for f in fractions])
        ax.set_xlabel("target training data")
        ax.set_ylabel(metric.replace("_", " "))
        ax.grid(alpha=0.3)
        if metric == "accuracy" and reference_accuracy is not None:
            ax.axhline(reference_accuracy, color="grey", linewidth=0.8, linestyle=":")
    axes[1].legend(fontsize=7, loc="lower right")
    fig.suptitle(title)
    atomic_write_bytes(path, figure_bytes(fig))


__all__ = ["figure_bytes", "plot_accuracy", "pyplot"]
