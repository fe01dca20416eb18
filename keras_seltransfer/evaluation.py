"""Evaluation: accuracy, balanced accuracy, per-class accuracy, confusion matrix."""

import datetime
import json
import os

import numpy as np
from sklearn import metrics

from keras_seltransfer.utils.io import atomic_write_text
from keras_seltransfer.utils.validation import check_choice
from keras_seltransfer.utils.validation import is_int


def predict_dataset(model, dataset):
    """Runs `model` over a finite `(images, labels)` dataset.

    Returns:
        `(probabilities [N, classes], labels [N])` as NumPy arrays.

    Example:

    ```python
    dataset = tf.data.Dataset.from_tensor_slices((images, labels)).batch(32)
    probabilities, labels = predict_dataset(model, dataset)
    ```
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

    Example:

    ```python
    report = classification_report(
        labels=np.array([0, 0, 0, 1]),
        probabilities=np.array([[0.9, 0.1], [0.8, 0.2], [0.7, 0.3], [0.6, 0.4]]),
        class_names=["ok", "defect"],
    )
    report["accuracy"]  # 0.75
    report["balanced_accuracy"]  # 0.5: the always-"ok" model finds no defect
    report["confusion_matrix"]  # [[3, 0], [1, 0]]
    ```
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
    """Renders a report dict (plus any extra keys) as Markdown.

    Example:

    ```python
    print(format_markdown(report, title="ELPV test set"))
    ```
    """
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

    Example:

    ```python
    json_path, markdown_path = write_report(report, "runs/elpv", stem="test_report")
    ```
    """
    report = dict(report)
    report.setdefault("written_at", datetime.datetime.now(datetime.timezone.utc).isoformat())
    json_path = os.path.join(directory, f"{stem}.json")
    md_path = os.path.join(directory, f"{stem}.md")
    atomic_write_text(json_path, json.dumps(report, indent=2, sort_keys=True) + "\n")
    atomic_write_text(md_path, format_markdown(report, title=title))
    return json_path, md_path


# Shift robustness (Zhang, ICML 2019) ------------------------------------------

SHIFT_PAD_MODES = ("reflect", "edge", "constant", "wrap")
SHIFT_DIRECTIONS = ("diagonal", "horizontal", "vertical")


def _check_shift_args(model, images, max_shift, pad_mode):
    if not is_int(max_shift) or max_shift < 0:
        raise ValueError(f"`max_shift` must be an int >= 0. Received: max_shift={max_shift!r}")
    if pad_mode is not None and pad_mode not in SHIFT_PAD_MODES:
        raise ValueError(
            f"`pad_mode` must be one of {SHIFT_PAD_MODES} or None. Received: pad_mode={pad_mode!r}"
        )
    images = np.asarray(images)
    if images.ndim != 4 or not len(images):
        raise ValueError(
            "`images` must be a non-empty batch [N, height, width, channels]. "
            f"Received: images.shape={images.shape}"
        )
    height, width = (int(d) for d in model.inputs[0].shape[1:3])
    margin = 0 if pad_mode is not None else 2 * max_shift
    if images.shape[1:3] != (height + margin, width + margin):
        expected = (
            f"the model's input size {(height, width)}"
            if pad_mode is not None
            else f"{(height + margin, width + margin)} (the model's input plus a margin of "
            f"max_shift={max_shift} pixels each side, as pad_mode=None expects)"
        )
        raise ValueError(
            f"`images` must be of {expected}. Received: images.shape={images.shape}"
        )
    if pad_mode is not None and max_shift:
        images = np.pad(
            images,
            ((0, 0), (max_shift, max_shift), (max_shift, max_shift), (0, 0)),
            mode=pad_mode,
        )
    return images, height, width


def _crop_classes(model, padded, offsets, height, width, batch_size):
    """Predicted classes `[N, K]` of crops of the padded images: `offsets` is
    `[K, 2]` (the same `(row, column)` offsets for every image) or `[N, K, 2]`
    (offsets per image)."""
    offsets = np.asarray(offsets, dtype=np.int64)
    if offsets.ndim == 2:
        offsets = np.broadcast_to(offsets, (len(padded),) + offsets.shape)
    count = offsets.shape[1]
    rows = offsets[:, :, 0, None] + np.arange(height)  # [N, K, height]
    cols = offsets[:, :, 1, None] + np.arange(width)  # [N, K, width]
    classes = np.empty((len(padded), count), dtype=np.int64)
    # As many images per prediction call as make about 4096 crops.
    chunk = max(1, 4096 // count)
    for start in range(0, len(padded), chunk):
        stop = min(start + chunk, len(padded))
        index = np.arange(start, stop)[:, None, None, None]
        crops = padded[index, rows[start:stop, :, :, None], cols[start:stop, :, None, :]]
        crops = crops.reshape((-1, height, width) + padded.shape[3:]).astype(np.float32)
        probabilities = model.predict(crops, batch_size=batch_size, verbose=0)
        classes[start:stop] = np.asarray(probabilities).argmax(-1).reshape(stop - start, count)
    return classes


def shift_consistency(
    model, images, max_shift=8, num_pairs=5, seed=0, pad_mode="reflect", batch_size=64
):
    """How often the predicted class survives a shift of the input (Zhang, ICML 2019).

    Zhang's consistency is the probability that the network predicts the
    same class for two shifted copies of one image,
    `E[1{argmax f(shift_a(x)) == argmax f(shift_b(x))}]`, over images and two
    independent, uniformly drawn shifts `a`, `b` of at most `max_shift`
    pixels in each direction. A shift is a crop: each image is padded by
    `max_shift` pixels on every side (`pad_mode`, NumPy's `np.pad` modes;
    `"wrap"` makes the shifts circular) and the model's input size is cut out
    at offsets `(dy, dx)` in `[0, 2 * max_shift]^2` (the unshifted image at
    `(max_shift, max_shift)`). With `pad_mode=None` the images must already
    be larger by `max_shift` each side, and the crops see real surroundings
    (Zhang's ImageNet protocol: random crops of a larger resized image).

    With `num_pairs` an int, that many random pairs of shifts are drawn per
    image (seeded). With `num_pairs=None` every shift is evaluated and the
    expectation over all ordered pairs is computed exactly: per image,
    `sum_c n_c^2 / K^2` for `K = (2 * max_shift + 1)^2` shifts, `n_c` of them
    predicted as class `c`.

    Args:
        model: a classifier from images to class probabilities.
        images: `[N, height, width, channels]` raw images at the model's
            input size (at that size plus `2 * max_shift` when
            `pad_mode=None`).
        max_shift: largest shift in pixels along each axis.
        num_pairs: random shift pairs per image, or None for all pairs.
        seed: seed of the drawn shifts.
        pad_mode: `"reflect"`, `"edge"`, `"constant"` (zeros), `"wrap"`, or
            None (see above).
        batch_size: prediction batch size.

    Returns:
        The consistency, a float in [0, 1].

    Raises:
        ValueError: for bad arguments or images of the wrong size.

    Example:

    ```python
    # `model` maps [N, 32, 32, 1] raw images to class probabilities.
    shift_consistency(model, images, max_shift=4, num_pairs=5)  # e.g. 0.93
    shift_consistency(model, images, max_shift=4, num_pairs=None)  # every pair, exactly
    ```

    Reference:
        Zhang. Making Convolutional Networks Shift-Invariant Again. ICML 2019.
    """
    padded, height, width = _check_shift_args(model, images, max_shift, pad_mode)
    span = 2 * max_shift + 1
    if num_pairs is None:
        offsets = [(dy, dx) for dy in range(span) for dx in range(span)]
        classes = _crop_classes(model, padded, offsets, height, width, batch_size)
        num_classes = int(classes.max()) + 1
        counts = np.stack([(classes == c).sum(axis=1) for c in range(num_classes)], axis=1)
        return float(np.mean((counts.astype(np.float64) ** 2).sum(axis=1) / len(offsets) ** 2))
    if not is_int(num_pairs) or num_pairs < 1:
        raise ValueError(
            f"`num_pairs` must be a positive int or None. Received: num_pairs={num_pairs!r}"
        )
    rng = np.random.default_rng(seed)
    # Two independent shifts per pair: crops 2p and 2p+1 of each image.
    drawn = rng.integers(0, span, size=(len(padded), 2 * num_pairs, 2))
    classes = _crop_classes(model, padded, drawn, height, width, batch_size)
    return float(np.mean(classes[:, 0::2] == classes[:, 1::2]))


def accuracy_vs_shift(
    model, images, labels, max_shift=8, direction="diagonal", pad_mode="reflect", batch_size=64
):
    """Accuracy of a classifier as the input is shifted pixel by pixel.

    Zhang's plots of a prediction along a sweep of shifts: every image is
    shifted by `s = -max_shift, ..., max_shift` pixels (`"diagonal"`: down
    and right by `s`, `"horizontal"` or `"vertical"`: along one axis), by
    cropping it from a padded copy as in `shift_consistency` (the crop at
    offset `max_shift + s` along the shifted axes, so a positive `s` moves
    the content up / left).

    Args:
        model: a classifier from images to class probabilities.
        images: `[N, height, width, channels]` raw images (see
            `shift_consistency` for `pad_mode=None`).
        labels: `[N]` true classes.
        max_shift: largest shift in pixels.
        direction: `"diagonal"`, `"horizontal"` or `"vertical"`.
        pad_mode: as in `shift_consistency`.
        batch_size: prediction batch size.

    Returns:
        A dict with `shifts` (the list of s), `accuracy` (accuracy at each
        shift) and `agreement` (the fraction of images whose prediction
        equals their prediction at shift 0).

    Raises:
        ValueError: for bad arguments or images of the wrong size.

    Example:

    ```python
    curve = accuracy_vs_shift(model, images, labels, max_shift=4, direction="horizontal")
    curve["shifts"]  # [-4, -3, ..., 4]
    curve["accuracy"]  # accuracy at each shift
    ```
    """
    check_choice(direction, "direction", SHIFT_DIRECTIONS)
    padded, height, width = _check_shift_args(model, images, max_shift, pad_mode)
    labels = np.asarray(labels, dtype=np.int64)
    if labels.shape != (len(padded),):
        raise ValueError(
            f"`labels` must be [N] with N = len(images) = {len(padded)}. "
            f"Received: labels.shape={labels.shape}"
        )
    shifts = list(range(-max_shift, max_shift + 1))
    dy = {"diagonal": 1, "horizontal": 0, "vertical": 1}[direction]
    dx = {"diagonal": 1, "horizontal": 1, "vertical": 0}[direction]
    offsets = [(max_shift + dy * s, max_shift + dx * s) for s in shifts]
    classes = _crop_classes(model, padded, offsets, height, width, batch_size)
    centre = classes[:, shifts.index(0)]
    return {
        "shifts": shifts,
        "accuracy": [float(v) for v in (classes == labels[:, None]).mean(axis=0)],
        "agreement": [float(v) for v in (classes == centre[:, None]).mean(axis=0)],
    }


__all__ = [
    "SHIFT_DIRECTIONS",
    "SHIFT_PAD_MODES",
    "accuracy_vs_shift",
    "classification_report",
    "format_markdown",
    "predict_dataset",
    "shift_consistency",
    "write_report",
]
