"""Evaluation: accuracy, balanced accuracy, per-class accuracy, confusion matrix."""

import datetime
import json
import os

import numpy as np
from sklearn import metrics

from keras_seltransfer.utils.io import atomic_write_text


def predict_dataset(model, dataset):
    """Runs `model` over a finite `(images, labels)` dataset.

    Returns:
        `(probabilities [N, classes], labels [N])` as NumPy arrays.
    """
    probs, labels = [], []
    for images, batch_labels in dataset:
        probs.append(np.asarray(model(images, training=False), dtype=np.float32))
        labels.append(np.asarray(batch_labels))
    if not probs:
        raise ValueError("The evaluation dataset is empty: nothing to evaluate.")
    return np.concatenate(probs), np.concatenate(labels).astype(np.int64)


def classification_report(labels, probabilities, class_names):
    """Computes the metrics reported for every run.

    On imbalanced data accuracy alone hides a model that always answers the
    majority class, so balanced accuracy (the mean of per-class recall, the
    "mean class accuracy" of the fine-grained literature) is reported beside
    it.

    Args:
        labels: true labels `[N]`.
        probabilities: predicted class probabilities `[N, classes]`.
        class_names: class names in label order.

    Returns:
        A JSON-serialisable dict: `accuracy`, `balanced_accuracy`,
        `per_class_accuracy` (name -> recall, None for a class absent from
        `labels`), `confusion_matrix` (rows true, columns predicted),
        `support`, `num_examples`, `class_names`.
    """
    labels = np.asarray(labels, dtype=np.int64)
    probabilities = np.asarray(probabilities)
    if probabilities.ndim != 2 or probabilities.shape[0] != labels.shape[0]:
        raise ValueError(
            "`probabilities` must be [N, classes] with N = len(labels). "
            f"Received: probabilities.shape={probabilities.shape}, len(labels)={len(labels)}"
        )
    num_classes = len(class_names)
    if probabilities.shape[1] != num_classes:
        raise ValueError(
            f"The model predicts {probabilities.shape[1]} classes but "
            f"{num_classes} class names were given. Received: class_names={list(class_names)}"
        )
    predictions = probabilities.argmax(axis=1)
    cm = metrics.confusion_matrix(labels, predictions, labels=np.arange(num_classes))
    support = cm.sum(axis=1)
    per_class = {
        str(name): (float(cm[i, i] / support[i]) if support[i] else None)
        for i, name in enumerate(class_names)
    }
    present = support > 0
    balanced = float(np.mean(np.diag(cm)[present] / support[present]))
    return {
        "num_examples": int(labels.shape[0]),
        "accuracy": float(metrics.accuracy_score(labels, predictions)),
        "balanced_accuracy": balanced,
        "per_class_accuracy": per_class,
        "support": {str(n): int(s) for n, s in zip(class_names, support)},
        "confusion_matrix": cm.tolist(),
        "class_names": [str(c) for c in class_names],
    }


def format_markdown(report, title="Evaluation report"):
    """Renders a report dict (plus any extra keys) as Markdown."""
    lines = [f"# {title}", ""]
    for key in ("method", "target", "backbone", "fraction", "seed", "epochs_run"):
        if key in report:
            lines.append(f"- {key}: {report[key]}")
    lines += [
        f"- examples: {report['num_examples']}",
        f"- accuracy: {report['accuracy']:.4f}",
        f"- balanced accuracy: {report['balanced_accuracy']:.4f}",
        "",
        "| class | support | accuracy |",
        "|---|---:|---:|",
    ]
    for name, acc in report["per_class_accuracy"].items():
        shown = "n/a" if acc is None else f"{acc:.4f}"
        lines.append(f"| {name} | {report['support'][name]} | {shown} |")
    names = report["class_names"]
    lines += ["", "Confusion matrix (rows: true, columns: predicted)", ""]
    lines.append("| | " + " | ".join(names) + " |")
    lines.append("|---" * (len(names) + 1) + "|")
    for name, row in zip(names, report["confusion_matrix"]):
        lines.append(f"| {name} | " + " | ".join(str(v) for v in row) + " |")
    return "\n".join(lines) + "\n"


def write_report(report, directory, stem="report", title="Evaluation report"):
    """Writes `<stem>.json` and `<stem>.md` into `directory`, atomically.

    Returns:
        `(json_path, markdown_path)`.
    """
    report = dict(report)
    report.setdefault("written_at", datetime.datetime.now(datetime.timezone.utc).isoformat())
    json_path = os.path.join(directory, f"{stem}.json")
    md_path = os.path.join(directory, f"{stem}.md")
    atomic_write_text(json_path, json.dumps(report, indent=2, sort_keys=True) + "\n")
    atomic_write_text(md_path, format_markdown(report, title=title))
    return json_path, md_path
