"""`--method=linear_probe`: logistic regression on standardised frozen features.

The backbone stays frozen. The features of the target training and
validation images are computed once, in inference mode (`Model.predict`,
with a progress bar), standardised with the training images' mean `mu` and
standard deviation `sigma`, and a multinomial logistic regression is fit by
L-BFGS (`sklearn.linear_model.LogisticRegression`) for each inverse
regularisation strength `C` of `probe_c_grid`; the `C` with the lowest
validation cross-entropy is kept. The standardisation is then folded into
a Dense softmax head on the (unchanged) backbone,

    W' = W / sigma,    b' = b - (mu / sigma) W,

so `model.keras` and the SavedModel are ordinary classifiers from raw
images whose probabilities are the regression's. No SGD epoch runs
(`MethodSetup.fit=False`).

The features are a searchable setting: `probe_layer` names any layer of
the backbone (default: the backbone's output, the input of the head) and
`probe_pooling` reduces its feature map by global average pooling or by
flattening, optionally after a fixed `probe_pool_size` average pool.

Reference: the linear-probe baseline of Kumar, Raghunathan, Jones, Ma and
Liang, "Fine-Tuning can Distort Pretrained Features and Underperform
Out-of-Distribution", ICLR 2022 (their probe: L-BFGS logistic regression on
normalised features, regularisation chosen on validation data).
"""

import dataclasses
import math

import keras
import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import log_loss
from sklearn.preprocessing import StandardScaler

from keras_seltransfer import data as data_lib
from keras_seltransfer.methods.base import Method
from keras_seltransfer.methods.base import MethodSetup
from keras_seltransfer.methods.registry import register
from keras_seltransfer.utils.options import option

PROBE_POOLINGS = ("avg", "flatten")
# L-BFGS keeps a (classes x features) gradient and the standardised
# feature matrix in float64; past this the probe is slow and the fit is far
# more features than the few hundred images can determine.
MAX_PROBE_FEATURES = 32768
HEAD_NAME = "target_head"


@dataclasses.dataclass
class ProbeOptions:
    """Options of the linear probe (`linear_probe`, and the probe stage of `lp_ft`)."""

    probe_c_grid: str = option(
        "1e-4,1e-3,1e-2,0.1,1,10,100",
        "linear_probe, lp_ft: comma-separated inverse regularisation strengths C of the "
        "logistic regression; the one with the lowest validation cross-entropy is kept.",
    )

    @staticmethod
    def validate(config):
        """Raises ValueError for a `probe_c_grid` that is not a list of positive numbers."""
        c_values(config.probe_c_grid)


@dataclasses.dataclass
class ProbeFeatureOptions:
    """Options of `--method=linear_probe`: which features the probe reads."""

    probe_layer: str = option(
        None,
        "linear_probe: name of the backbone layer whose output the probe reads. Unset: the "
        "backbone's output (the pooled features).",
    )
    probe_pooling: str = option(
        "avg",
        "linear_probe: how a feature map is reduced to a vector: avg (global average "
        f"pooling) or flatten (at most {MAX_PROBE_FEATURES} features).",
        choices=PROBE_POOLINGS,
    )
    probe_pool_size: int = option(
        1,
        "linear_probe: with --probe_pooling=flatten, average-pool the map over this many "
        "pixels per side (stride the same) before flattening; 1: no pooling.",
        lower=1,
    )


def c_values(spec):
    """The C values of a `probe_c_grid` spec.

    Args:
        spec: comma-separated positive numbers, e.g. `"0.01,0.1,1"`.

    Returns:
        A tuple of floats, in the given order.

    Raises:
        ValueError: if `spec` holds no number or a non-positive one.

    Example:

    >>> c_values("1e-2, 0.1,1")
    (0.01, 0.1, 1.0)
    """
    try:
        values = tuple(float(part) for part in str(spec).split(",") if part.strip())
    except ValueError:
        values = ()
    if not values or not all(math.isfinite(v) and v > 0 for v in values):
        raise ValueError(
            "`probe_c_grid` must be a comma-separated list of positive numbers, e.g. "
            f"'0.01,0.1,1'. Received: probe_c_grid={spec!r}"
        )
    return values


def probe_features_model(model, layer=None, pooling="avg", pool_size=1):
    """The model from a classifier's images to the feature vectors a probe reads.

    Args:
        model: a functional classifier whose head is the layer `"target_head"`
            (as `build_classifier` makes), or a backbone without one.
        layer: name of the layer whose output is read; None: the input of the
            head (the backbone's output), or the output of a backbone.
        pooling: `"avg"` (global average pooling of a feature map) or
            `"flatten"`; a vector output is used as it is.
        pool_size: with `"flatten"`, the size and stride of an average pool
            applied first (1: none).

    Returns:
        A `keras.Model` sharing the classifier's input and layers, with a
        float `[batch, features]` output.

    Raises:
        ValueError: for an unknown layer (a few valid names are listed), a bad
            `pooling` or `pool_size`, or more than `MAX_PROBE_FEATURES`
            features.

    Example:

    >>> from keras_seltransfer import models
    >>> classifier = models.build_classifier(models.small_cnn((16, 16, 1), widths=(4, 8)), 2)
    >>> probe_features_model(classifier).output_shape
    (None, 8)
    >>> probe_features_model(classifier, "block1_relu", "flatten", pool_size=2).output_shape
    (None, 64)
    """
    if pooling not in PROBE_POOLINGS:
        raise ValueError(f"`pooling` must be one of {PROBE_POOLINGS}. Received: pooling={pooling!r}")
    if isinstance(pool_size, bool) or not isinstance(pool_size, (int, np.integer)) or pool_size < 1:
        raise ValueError(f"`pool_size` must be an int >= 1. Received: pool_size={pool_size!r}")
    names = [candidate.name for candidate in model.layers]
    if layer is None:
        features = (
            model.get_layer(HEAD_NAME).input if HEAD_NAME in names else model.outputs[0]
        )
    elif layer not in names or layer == HEAD_NAME:
        maps = [n for n in names if n != HEAD_NAME and ("relu" in n or "pool" in n)][-8:]
        raise ValueError(
            f"`probe_layer` must name a layer of the backbone {model.name!r}, e.g. "
            f"{', '.join(maps or names[-8:])}. Received: probe_layer={layer!r}"
        )
    else:
        features = model.get_layer(layer).output
    rank = len(features.shape)
    if rank == 4:
        if pooling == "avg":
            features = keras.layers.GlobalAveragePooling2D(name="probe_avgpool")(features)
        else:
            if pool_size > 1:
                if min(features.shape[1:3]) < pool_size:
                    raise ValueError(
                        f"`probe_pool_size` must be at most the feature map's size "
                        f"{tuple(features.shape[1:3])}. Received: probe_pool_size={pool_size}"
                    )
                features = keras.layers.AveragePooling2D(pool_size, name="probe_pool")(features)
            features = keras.layers.Flatten(name="probe_flatten")(features)
    elif rank != 2:
        raise ValueError(
            "`probe_layer` must output a feature map [batch, height, width, channels] or a "
            f"vector [batch, features]. Received: probe_layer={layer!r} with output shape "
            f"{tuple(features.shape)}"
        )
    count = int(features.shape[-1])
    if count > MAX_PROBE_FEATURES:
        raise ValueError(
            f"The probe would read {count} features, more than the {MAX_PROBE_FEATURES} "
            "allowed: choose a later `probe_layer`, `probe_pooling='avg'` or a larger "
            f"`probe_pool_size`. Received: probe_layer={layer!r}, probe_pooling={pooling!r}, "
            f"probe_pool_size={pool_size}"
        )
    return keras.Model(model.inputs[0], features, name=f"{model.name}_probe_features")


def extract_features(features_model, source, image_size, batch_size, verbose=1):
    """The features of every image of `source`, in order, in inference mode.

    Args:
        features_model: a model from images to `[batch, features]`.
        source: an `ImageSource`.
        image_size: the size images are resized to.
        batch_size: images per `predict` batch.
        verbose: Keras progress output of `predict` (1: a progress bar).

    Returns:
        `(features, labels)`: float64 `[n, features]` and int `[n]` arrays.

    Example:

    ```python
    x, y = extract_features(probe_features_model(classifier), train, 64, batch_size=32)
    ```
    """
    channels = int(features_model.inputs[0].shape[-1])
    dataset = data_lib.make_dataset(source, image_size, batch_size, channels=channels)
    features = features_model.predict(dataset.map(lambda x, y: x), verbose=verbose)
    return np.asarray(features, np.float64), np.asarray(source.labels, np.int64)


@dataclasses.dataclass
class ProbeFit:
    """A fitted linear probe: the standardisation and the softmax weights.

    Attributes:
        mean: per-feature mean of the training features.
        scale: per-feature standard deviation (1 where it is 0).
        coef: `[classes, features]` softmax weights on standardised features.
        intercept: `[classes]` softmax biases.
        c: the chosen inverse regularisation strength.
        scores: one dict per C tried (`C`, `val_crossentropy`, `val_accuracy`,
            `train_accuracy`, `iterations`).
        estimator: the chosen `LogisticRegression`; `scaler`: the `StandardScaler`.

    Example:

    ```python
    fit = fit_probe(train_x, train_y, val_x, val_y, (0.1, 1.0), num_classes=2)
    kernel, bias = fit.folded()  # a Dense head on the raw features
    ```
    """

    mean: np.ndarray
    scale: np.ndarray
    coef: np.ndarray
    intercept: np.ndarray
    c: float
    scores: list
    estimator: object = None
    scaler: object = None

    def folded(self):
        """`(kernel [features, classes], bias [classes])` of `fold_standardisation`."""
        return fold_standardisation(self.coef, self.intercept, self.mean, self.scale)

    def report(self):
        """The JSON-serialisable summary of the fit."""
        return {"C": self.c, "c_grid": self.scores, "features": int(self.mean.shape[0])}


def fold_standardisation(coef, intercept, mean, scale):
    """Folds a standardisation into the softmax weights that follow it.

    `coef @ ((x - mean) / scale) + intercept == kernel.T @ x + bias` with
    `kernel = (coef / scale).T` and `bias = intercept - coef @ (mean / scale)`.

    Args:
        coef: `[classes, features]` weights on standardised features.
        intercept: `[classes]` biases.
        mean: `[features]` means.
        scale: `[features]` standard deviations (nonzero).

    Returns:
        `(kernel, bias)`: a Dense layer's `[features, classes]` kernel and
        `[classes]` bias on the raw features (float64).

    Example:

    >>> kernel, bias = fold_standardisation(np.array([[2.0]]), np.array([1.0]),
    ...                                     np.array([3.0]), np.array([4.0]))
    >>> kernel.tolist(), bias.tolist()
    ([[0.5]], [-0.5])
    """
    coef = np.asarray(coef, np.float64)
    mean, scale = np.asarray(mean, np.float64), np.asarray(scale, np.float64)
    kernel = (coef / scale).T
    bias = np.asarray(intercept, np.float64) - coef @ (mean / scale)
    return kernel, bias


def softmax_weights(estimator, num_classes):
    """The `[num_classes, features]` softmax weights and biases of a fitted
    `LogisticRegression` (a binary one's sigmoid weight `w` becomes the
    softmax rows `-w/2, w/2`, which give the same probabilities)."""
    classes = np.asarray(estimator.classes_)
    if classes.tolist() != list(range(num_classes)):
        raise ValueError(
            f"The linear probe needs training images of every one of the {num_classes} "
            f"classes. Received: training labels {classes.tolist()}"
        )
    coef, intercept = estimator.coef_, estimator.intercept_
    if num_classes == 2:
        coef = np.concatenate([-coef / 2, coef / 2])
        intercept = np.array([-intercept[0] / 2, intercept[0] / 2])
    return np.asarray(coef, np.float64), np.asarray(intercept, np.float64)


def fit_probe(train_x, train_y, val_x, val_y, c_grid, num_classes, class_weight=None, seed=0):
    """Fits the linear probe for each C and keeps the best on validation.

    Features are standardised with the training features' statistics
    (`StandardScaler`); for each C a multinomial logistic regression is fit
    by L-BFGS (`LogisticRegression(C=C, max_iter=1000)`), and the C whose
    probabilities give the lowest validation cross-entropy is kept (the
    first on ties).

    Args:
        train_x: `[n, features]` training features; `train_y`: their labels.
        val_x: `[m, features]` validation features; `val_y`: their labels.
        c_grid: the C values to try.
        num_classes: number of classes (every one must be in `train_y`).
        class_weight: `{class: weight}` of the loss, or None.
        seed: the estimator's `random_state`.

    Returns:
        A `ProbeFit`.

    Raises:
        ValueError: if a class has no training image or `c_grid` is empty.

    Example:

    ```python
    fit = fit_probe(train_x, train_y, val_x, val_y, (0.01, 0.1, 1.0), num_classes=3)
    fit.c, [s["val_crossentropy"] for s in fit.scores]
    ```
    """
    c_grid = tuple(c_grid)
    if not c_grid:
        raise ValueError(f"`c_grid` must hold at least one value. Received: c_grid={c_grid}")
    scaler = StandardScaler().fit(train_x)
    train_s, val_s = scaler.transform(train_x), scaler.transform(val_x)
    labels = np.arange(num_classes)
    best, scores = None, []
    for c in c_grid:
        estimator = LogisticRegression(
            C=float(c), max_iter=1000, class_weight=class_weight, random_state=seed
        ).fit(train_s, train_y)
        softmax_weights(estimator, num_classes)  # every class was seen
        probabilities = estimator.predict_proba(val_s)
        score = {
            "C": float(c),
            "val_crossentropy": float(log_loss(val_y, probabilities, labels=labels)),
            "val_accuracy": float(np.mean(probabilities.argmax(-1) == val_y)),
            "train_accuracy": float(estimator.score(train_s, train_y)),
            "iterations": int(np.max(estimator.n_iter_)),
        }
        scores.append(score)
        if best is None or score["val_crossentropy"] < best[0]["val_crossentropy"]:
            best = (score, estimator)
    coef, intercept = softmax_weights(best[1], num_classes)
    return ProbeFit(
        mean=scaler.mean_, scale=scaler.scale_, coef=coef, intercept=intercept,
        c=best[0]["C"], scores=scores, estimator=best[1], scaler=scaler,
    )


def probe(config, features_model, context):
    """Extracts the run's training and validation features with
    `features_model` and fits the probe (`fit_probe`) with the run's
    `probe_c_grid`, class weights and seed; returns the `ProbeFit`."""
    verbose = min(config.verbose, 1)
    train_x, train_y = extract_features(
        features_model, context.train, config.image_size, config.batch_size, verbose
    )
    val_x, val_y = extract_features(
        features_model, context.val, config.image_size, config.batch_size, verbose
    )
    return fit_probe(
        train_x, train_y, val_x, val_y, c_values(config.probe_c_grid), context.num_classes,
        class_weight=context.class_weight, seed=config.seed,
    )


def set_head(head, kernel, bias):
    """Assigns a folded `(kernel, bias)` to a Dense head, checking its shape."""
    expected = tuple(head.kernel.shape)
    if tuple(kernel.shape) != expected:
        raise ValueError(
            f"The probe's kernel must have the head's shape {expected}. "
            f"Received: kernel shape={tuple(kernel.shape)}"
        )
    head.kernel.assign(kernel.astype(head.kernel.dtype))
    head.bias.assign(bias.astype(head.bias.dtype))


def probe_classifier(features_model, kernel, bias, name=None):
    """The classifier from raw images: `features_model` with a Dense softmax
    head named `"target_head"` holding `(kernel, bias)` (call in the strategy
    scope)."""
    head = keras.layers.Dense(
        int(kernel.shape[1]), activation="softmax", dtype="float32", name=HEAD_NAME
    )
    outputs = head(features_model.outputs[0])
    set_head(head, kernel, bias)
    return keras.Model(
        features_model.inputs[0], outputs, name=name or f"{features_model.name}_classifier"
    )


class LinearProbe(Method):
    """Logistic regression on standardised frozen features, ending as a Keras head."""

    name = "linear_probe"
    summary = (
        "linear probe: L-BFGS logistic regression on standardised frozen features (layer and "
        "pooling searchable, C chosen on validation cross-entropy), folded into a Dense head; "
        "no SGD epochs"
    )
    options = (ProbeOptions, ProbeFeatureOptions)
    order = 2

    def setup(self, config, model, context):
        """The report gains `"linear_probe"` (layer, pooling, C grid and scores)
        and `best_val_crossentropy`: the chosen C's validation cross-entropy,
        the score other methods report for their best epoch."""
        if config.sampling != "uniform":
            raise ValueError(
                "`sampling` does not apply to linear_probe, which fits on every training "
                "feature at once; use --class_weight=balanced to reweight classes. "
                f"Received: sampling={config.sampling!r}"
            )
        with context.strategy.scope():
            features_model = probe_features_model(
                model, config.probe_layer, config.probe_pooling, config.probe_pool_size
            )
        fit = probe(config, features_model, context)
        kernel, bias = fit.folded()
        with context.strategy.scope():
            classifier = probe_classifier(features_model, kernel, bias, name=model.name)
        chosen = min(score["val_crossentropy"] for score in fit.scores)
        report = {
            "best_val_crossentropy": float(chosen),
            "linear_probe": {
                "layer": config.probe_layer,
                "pooling": config.probe_pooling,
                "pool_size": config.probe_pool_size,
                **fit.report(),
            }
        }
        return MethodSetup(model=classifier, fit=False, report=lambda fit_info: report)


register(LinearProbe())
