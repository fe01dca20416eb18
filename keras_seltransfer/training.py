"""Whole workflows: pretrain a backbone on a source set, fine-tune it on a target set.

These functions take plain arguments (the absl apps in `apps/` map flags onto
them) and do everything a run needs: data loading and low-data subsetting,
the strategy, the model, `model.fit` with early stopping, resumable
checkpoints and TensorBoard logs, the evaluation report and the exports.
"""

import contextlib
import dataclasses
import json
import os
import platform
import time

import keras
import numpy as np
import tensorflow as tf
from sklearn.utils.class_weight import compute_class_weight

from keras_seltransfer import data as data_lib
from keras_seltransfer.callbacks import TrainingCheckpoint
from keras_seltransfer import distribute
from keras_seltransfer import evaluation
from keras_seltransfer.export import export_saved_model
from keras_seltransfer.models import backbones
from keras_seltransfer.models.classifier import build_classifier
from keras_seltransfer.models.classifier import set_batchnorm_mode
from keras_seltransfer.regularizers import apply_l2sp
from keras_seltransfer.utils.io import atomic_write_text
from keras_seltransfer.utils.io import save_model_atomic

DEFAULT_PRETRAIN_DIR = os.path.join("runs", "pretrain", "fashion_mnist-small_cnn-64")
DEFAULT_BACKBONE = os.path.join(DEFAULT_PRETRAIN_DIR, "model.keras")

# Fine-tuning methods this module runs. Each maps to a function that turns
# the freshly built classifier into what trains (see `_prepare_model`).
METHODS = ("baseline", "l2sp")
OPTIMIZERS = ("adam", "sgd")
PRECISIONS = ("float32", "mixed_float16", "mixed_bfloat16")


@dataclasses.dataclass
class FinetuneConfig:
    """Everything that defines a fine-tuning run (saved as `config.json`).

    Attributes:
        target: target data set spec (see `keras_seltransfer.data.load_dataset`).
        backbone: `.keras` path, built-in name or keras.applications name.
        method: one of `METHODS`.
        output_dir: run directory; defaults to
            `runs/finetune/<method>-<target>-<fraction>-seed<seed>`.
        image_size: square input size the images are resized to.
        channels: input channels; None takes the backbone's (saved models,
            applications) or the data's (built-in backbones).
        fraction: fraction of each class of the training split to keep
            (the low-data protocol); ignored when `per_class` is set.
        per_class: keep exactly this many training images per class.
        seed: seed of the subset, the validation split, initialisation and
            shuffling.
        test_fraction: share of a data set without a test split that is held
            out for testing, with `split_seed` (fixed across seeds and
            fractions, so every run is scored on the same images).
        split_seed: seed of that held-out split.
        val_fraction: share of the kept training images used for early
            stopping and model selection.
        epochs: maximum epochs.
        patience: early-stopping patience in epochs, on validation cross-entropy; the
            best epoch's weights are restored.
        batch_size: global batch size (split across replicas).
        learning_rate: initial learning rate (cosine-decayed to zero).
        optimizer: `"adam"` or `"sgd"` (momentum 0.9).
        weight_decay: decoupled weight decay of the optimizer.
        dropout: dropout before the classification head.
        batchnorm: `"frozen"` (pretrained statistics, the default for
            fine-tuning) or `"train"`; runs from scratch always train it.
        augment: training augmentation name (see `make_dataset`).
        class_weight: `"none"` or `"balanced"` (inverse class frequency).
        l2sp_alpha: L2-SP pull toward the pretrained weights (method l2sp).
        l2sp_beta: L2-SP decay of the new head (method l2sp).
        from_scratch: re-initialise the backbone (same architecture).
        backbone_weights: weights for named backbones (None, "imagenet", path).
        cut_layer: layer to cut a saved or application backbone at.
        strategy: distribution strategy name (see `distribute.get_strategy`).
        precision: `"float32"`, `"mixed_float16"` or `"mixed_bfloat16"`.
        deterministic: enable TensorFlow op determinism.
        export: write a SavedModel of the fine-tuned classifier.
        tensorboard: write TensorBoard logs.
        verbose: Keras progress output (0 silent, 1 progress bar, 2 per epoch).
    """

    target: str = "elpv"
    backbone: str = DEFAULT_BACKBONE
    method: str = "baseline"
    output_dir: str = None
    image_size: int = 64
    channels: int = None
    fraction: float = 1.0
    per_class: int = None
    seed: int = 0
    test_fraction: float = 0.25
    split_seed: int = 0
    val_fraction: float = 0.2
    epochs: int = 30
    patience: int = 8
    batch_size: int = 32
    learning_rate: float = 1e-3
    optimizer: str = "adam"
    weight_decay: float = 0.0
    dropout: float = 0.0
    batchnorm: str = "frozen"
    augment: str = "flip"
    class_weight: str = "none"
    l2sp_alpha: float = 0.1
    l2sp_beta: float = 0.01
    from_scratch: bool = False
    backbone_weights: str = None
    cut_layer: str = None
    strategy: str = "auto"
    precision: str = "float32"
    deterministic: bool = False
    export: bool = True
    tensorboard: bool = True
    verbose: int = 1

    def __post_init__(self):
        _check_choice("method", self.method, METHODS)
        _check_choice("optimizer", self.optimizer, OPTIMIZERS)
        _check_choice("precision", self.precision, PRECISIONS)
        _check_choice("batchnorm", self.batchnorm, ("frozen", "train"))
        _check_choice("class_weight", self.class_weight, ("none", "balanced"))
        _check_common(self)
        if self.per_class is None and not 0.0 < float(self.fraction) <= 1.0:
            raise ValueError(
                f"`fraction` must be in (0, 1]. Received: fraction={self.fraction}"
            )
        if self.per_class is not None and int(self.per_class) < 1:
            raise ValueError(
                f"`per_class` must be a positive int. Received: per_class={self.per_class}"
            )
        if not 0.0 < float(self.test_fraction) < 1.0:
            raise ValueError(
                f"`test_fraction` must be in (0, 1). Received: test_fraction={self.test_fraction}"
            )
        if self.patience < 1:
            raise ValueError(f"`patience` must be >= 1. Received: patience={self.patience}")
        if self.output_dir is None:
            amount = (
                f"{self.per_class}pc" if self.per_class is not None else f"{self.fraction:g}"
            )
            target = self.target.replace(":", "_").replace(os.sep, "_")
            self.output_dir = os.path.join(
                "runs", "finetune", f"{self.method}-{target}-{amount}-seed{self.seed}"
            )


@dataclasses.dataclass
class PretrainConfig:
    """Everything that defines a pretraining run (saved as `config.json`).

    Attributes mean the same as in `FinetuneConfig`; in addition:
        source: source data set spec.
        output_dir: run directory; the trained classifier is written to
            `<output_dir>/model.keras` (cut at its `"features"` layer when
            used as a backbone).
        fraction: fraction of each source class to train on (for quick runs).
    """

    source: str = "fashion_mnist"
    backbone: str = "small_cnn"
    output_dir: str = DEFAULT_PRETRAIN_DIR
    image_size: int = 64
    channels: int = None
    fraction: float = 1.0
    seed: int = 0
    test_fraction: float = 0.2
    split_seed: int = 0
    val_fraction: float = 0.05
    epochs: int = 3
    patience: int = 3
    batch_size: int = 64
    learning_rate: float = 1e-3
    optimizer: str = "adam"
    weight_decay: float = 0.0
    augment: str = "none"
    backbone_weights: str = None
    strategy: str = "auto"
    precision: str = "float32"
    deterministic: bool = False
    tensorboard: bool = True
    verbose: int = 1

    def __post_init__(self):
        _check_choice("optimizer", self.optimizer, OPTIMIZERS)
        _check_choice("precision", self.precision, PRECISIONS)
        _check_common(self)
        if not 0.0 < float(self.fraction) <= 1.0:
            raise ValueError(
                f"`fraction` must be in (0, 1]. Received: fraction={self.fraction}"
            )


def _check_choice(name, value, choices):
    if value not in choices:
        raise ValueError(f"`{name}` must be one of {choices}. Received: {name}={value!r}")


def _check_common(config):
    for name in ("image_size", "batch_size", "epochs"):
        value = getattr(config, name)
        if not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"`{name}` must be a positive int. Received: {name}={value!r}")
    if config.learning_rate <= 0:
        raise ValueError(
            f"`learning_rate` must be > 0. Received: learning_rate={config.learning_rate}"
        )
    if not 0.0 < float(config.val_fraction) < 1.0:
        raise ValueError(
            f"`val_fraction` must be in (0, 1). Received: val_fraction={config.val_fraction}"
        )
    if config.channels not in (None, 1, 3):
        raise ValueError(f"`channels` must be 1, 3 or None. Received: channels={config.channels}")


@contextlib.contextmanager
def dtype_policy(name):
    """Sets the global Keras dtype policy for the duration of a block."""
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(name)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)


def load_train_test(spec, test_fraction=0.25, split_seed=0):
    """Loads a data set spec as `(train, test)` ImageSources.

    Data sets with their own test split (Fashion-MNIST, TFDS, image folders
    with `train/` and `test/` sub-folders) use it; others (ELPV, a single
    folder, a `.npz`) are split once, stratified, with `split_seed`, so the
    held-out images never depend on the training seed or fraction.
    """
    if spec == "fashion_mnist" or spec.startswith("tfds:"):
        return data_lib.load_dataset(spec, "train"), data_lib.load_dataset(spec, "test")
    if spec.startswith("folder:"):
        root = spec[len("folder:"):]
        if os.path.isdir(os.path.join(root, "train")) and os.path.isdir(
            os.path.join(root, "test")
        ):
            return data_lib.load_dataset(spec, "train"), data_lib.load_dataset(spec, "test")
    source = data_lib.load_dataset(spec)
    train_idx, test_idx = data_lib.holdout_split(
        source.labels, test_fraction=test_fraction, seed=split_seed
    )
    return source.subset(train_idx), source.subset(test_idx)


def _metrics():
    # The plain cross-entropy, reported beside `loss` (which also holds any
    # weight penalties) so early stopping can monitor it.
    return [
        "accuracy",
        keras.metrics.SparseCategoricalCrossentropy(name="crossentropy"),
    ]


def _make_optimizer(config, steps_per_epoch):
    schedule = keras.optimizers.schedules.CosineDecay(
        config.learning_rate, decay_steps=max(1, config.epochs * steps_per_epoch)
    )
    kwargs = {"weight_decay": config.weight_decay or None}
    if config.optimizer == "sgd":
        return keras.optimizers.SGD(schedule, momentum=0.9, **kwargs)
    return keras.optimizers.Adam(schedule, **kwargs)


def mean_std(values):
    """`(mean, population std)` of a list of numbers, as the result tables report."""
    values = np.asarray(values, dtype=np.float64)
    return float(values.mean()), float(values.std())


def run_environment():
    """Versions and machine facts recorded with every result."""
    return {
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "python": platform.python_version(),
        "machine": f"{platform.machine()} {platform.system()}, {os.cpu_count()} CPUs",
        "gpus": len(tf.config.list_physical_devices("GPU")),
    }


def _fit(model, strategy, train, val, config, run_dir, is_chief, class_weight=None):
    """Trains with early stopping, resumable checkpoints and logs."""
    channels = int(model.inputs[0].shape[-1])
    global_batch = config.batch_size
    steps = data_lib.steps_per_epoch(len(train), global_batch)
    train_ds = data_lib.distributed_dataset(
        strategy,
        train,
        global_batch,
        config.image_size,
        training=True,
        channels=channels,
        augment=config.augment,
        seed=config.seed,
        repeat=True,
    )
    val_ds = data_lib.make_dataset(
        val, config.image_size, global_batch, channels=channels
    )
    # Only the chief keeps checkpoints and logs; other workers write to a
    # scratch directory that is discarded.
    work_dir = run_dir if is_chief else os.path.join(run_dir, ".worker_scratch")
    # Early stopping and model selection watch the validation cross-entropy,
    # not `val_loss`: Keras adds weight penalties (L2-SP) to `val_loss`, and a
    # penalty that grows as the weights leave their start would stop training
    # for the wrong reason.
    early_stopping = keras.callbacks.EarlyStopping(
        monitor="val_crossentropy",
        patience=config.patience,
        restore_best_weights=True,
        verbose=min(config.verbose, 1),
    )
    checkpoint = TrainingCheckpoint(os.path.join(work_dir, "backup"), early_stopping=early_stopping)
    initial_epoch = checkpoint.restore(model)
    if initial_epoch and config.verbose:
        print(f"Resuming from the checkpoint after epoch {initial_epoch}.")
    # The checkpoint comes after early stopping so it can re-apply its state.
    callbacks = [early_stopping, checkpoint]
    if config.tensorboard:
        callbacks.append(keras.callbacks.TensorBoard(os.path.join(work_dir, "logs")))
    history = model.fit(
        train_ds,
        epochs=config.epochs,
        initial_epoch=initial_epoch,
        steps_per_epoch=steps,
        validation_data=val_ds,
        callbacks=callbacks,
        class_weight=class_weight,
        # The pipeline shuffles, seeded, before repeating.
        shuffle=False,
        verbose=config.verbose,
    )
    return {
        "history": {k: [float(v) for v in vs] for k, vs in history.history.items()},
        "epochs_run": initial_epoch + len(history.epoch),
        "resumed_from_epoch": initial_epoch,
        "best_val_crossentropy": (
            None if early_stopping.best is None else float(early_stopping.best)
        ),
    }


def _evaluate(model, test, config, extra):
    channels = int(model.inputs[0].shape[-1])
    test_ds = data_lib.make_dataset(test, config.image_size, config.batch_size, channels=channels)
    probabilities, labels = evaluation.predict_dataset(model, test_ds)
    report = evaluation.classification_report(labels, probabilities, test.class_names)
    report.update(extra)
    return report


def _split_train_val(train, val_fraction, seed):
    train_idx, val_idx = data_lib.train_val_split(train.labels, val_fraction=val_fraction, seed=seed)
    return train.subset(train_idx), train.subset(val_idx)


def _prepare_model(config, strategy, num_classes, data_channels):
    """Builds the classifier for `config.method` inside the strategy scope."""
    shape_channels = config.channels
    if shape_channels is None and not backbones.is_backbone_path(config.backbone):
        if backbones.is_builtin_backbone(config.backbone):
            shape_channels = data_channels
    input_shape = (config.image_size, config.image_size, shape_channels)
    with strategy.scope():
        backbone = backbones.load_backbone(
            config.backbone,
            input_shape,
            weights=config.backbone_weights,
            cut_layer=config.cut_layer,
        )
        if config.precision != "float32" and backbones.is_backbone_path(config.backbone):
            backbone = backbones.with_dtype_policy(backbone, config.precision)
        if config.from_scratch:
            backbone = backbones.reinitialize(backbone, seed=config.seed)
        model = build_classifier(backbone, num_classes, dropout=config.dropout)
        set_batchnorm_mode(model, "train" if config.from_scratch else config.batchnorm)
        if config.method == "l2sp":
            apply_l2sp(model, alpha=config.l2sp_alpha, beta=config.l2sp_beta)
    return model


def finetune(config):
    """Fine-tunes a backbone on a target data set and writes the run's outputs.

    Writes into `config.output_dir`: `config.json`, `model.keras` (the
    fine-tuned classifier), `report.json` / `report.md` (test-set accuracy,
    balanced accuracy, per-class accuracy, confusion matrix, history),
    `saved_model/` (when `config.export`), `logs/` (TensorBoard). An
    interrupted run resumes from `backup/` when rerun with the same output
    directory. Every file is written atomically.

    Args:
        config: a `FinetuneConfig`.

    Returns:
        A dict with the report and the paths written.
    """
    if not isinstance(config, FinetuneConfig):
        raise TypeError(
            f"`config` must be a FinetuneConfig. Received: config of type {type(config).__name__}"
        )
    if backbones.is_backbone_path(config.backbone) and not os.path.isfile(config.backbone):
        hint = (
            " Run `python -m apps.pretrain` first to create it."
            if os.path.normpath(config.backbone) == os.path.normpath(DEFAULT_BACKBONE)
            else ""
        )
        raise FileNotFoundError(
            f"Backbone file not found: {config.backbone!r}.{hint}"
        )
    start = time.time()
    keras.utils.set_random_seed(config.seed)
    if config.deterministic:
        tf.config.experimental.enable_op_determinism()
    train_full, test = load_train_test(config.target, config.test_fraction, config.split_seed)
    kept = data_lib.low_data_subset(
        train_full.labels,
        fraction=None if config.per_class is not None else config.fraction,
        per_class=config.per_class,
        seed=config.seed,
    )
    train, val = _split_train_val(train_full.subset(kept), config.val_fraction, config.seed)

    strategy = distribute.get_strategy(config.strategy)
    is_chief = distribute.is_chief()
    run_dir = config.output_dir
    os.makedirs(run_dir, exist_ok=True)
    if is_chief:
        atomic_write_text(
            os.path.join(run_dir, "config.json"),
            json.dumps(dataclasses.asdict(config), indent=2, sort_keys=True) + "\n",
        )
    class_weight = None
    if config.class_weight == "balanced":
        present = np.unique(train.labels)
        weights = compute_class_weight("balanced", classes=present, y=train.labels)
        class_weight = {int(c): float(w) for c, w in zip(present, weights)}

    with dtype_policy(config.precision):
        model = _prepare_model(config, strategy, train_full.num_classes, train_full.channels)
        with strategy.scope():
            steps = data_lib.steps_per_epoch(len(train), config.batch_size)
            model.compile(
                optimizer=_make_optimizer(config, steps),
                loss="sparse_categorical_crossentropy",
                metrics=_metrics(),
            )
        fit_info = _fit(model, strategy, train, val, config, run_dir, is_chief, class_weight)

    report = _evaluate(
        model,
        test,
        config,
        {
            "method": config.method,
            "target": config.target,
            "backbone": config.backbone,
            "fraction": config.fraction if config.per_class is None else None,
            "per_class": config.per_class,
            "seed": config.seed,
            "train_examples": len(train),
            "val_examples": len(val),
            **fit_info,
            "strategy": distribute.describe_strategy(strategy),
            "seconds": round(time.time() - start, 1),
            "environment": run_environment(),
        },
    )
    outputs = {"report": report, "output_dir": os.path.abspath(run_dir)}
    if not is_chief:
        return outputs
    outputs["model"] = os.path.join(run_dir, "model.keras")
    save_model_atomic(model, outputs["model"])
    if config.export:
        outputs["saved_model"] = export_saved_model(
            model, os.path.join(run_dir, "saved_model"), class_names=test.class_names
        )
    outputs["report_json"], outputs["report_md"] = evaluation.write_report(
        report, run_dir, title=f"Fine-tuning report: {config.method} on {config.target}"
    )
    return outputs


def pretrain(config):
    """Trains a backbone with a classification head on a source data set.

    This is how pretrained backbones are made without internet access: the
    classifier is saved as `<output_dir>/model.keras`, and
    `load_backbone(path)` cuts it at its `"features"` layer. Writes
    `config.json`, `report.json` / `report.md` (source test accuracy) and
    TensorBoard logs beside it; resumes from `backup/` when interrupted.

    Args:
        config: a `PretrainConfig`.

    Returns:
        A dict with the report and the paths written.
    """
    if not isinstance(config, PretrainConfig):
        raise TypeError(
            f"`config` must be a PretrainConfig. Received: config of type {type(config).__name__}"
        )
    start = time.time()
    keras.utils.set_random_seed(config.seed)
    if config.deterministic:
        tf.config.experimental.enable_op_determinism()
    train_full, test = load_train_test(config.source, config.test_fraction, config.split_seed)
    if config.fraction < 1.0:
        train_full = train_full.subset(
            data_lib.low_data_subset(train_full.labels, fraction=config.fraction, seed=config.seed)
        )
    train, val = _split_train_val(train_full, config.val_fraction, config.seed)
    strategy = distribute.get_strategy(config.strategy)
    is_chief = distribute.is_chief()
    run_dir = config.output_dir
    os.makedirs(run_dir, exist_ok=True)
    if is_chief:
        atomic_write_text(
            os.path.join(run_dir, "config.json"),
            json.dumps(dataclasses.asdict(config), indent=2, sort_keys=True) + "\n",
        )
    channels = config.channels or train_full.channels
    with dtype_policy(config.precision):
        with strategy.scope():
            backbone = backbones.load_backbone(
                config.backbone,
                (config.image_size, config.image_size, channels),
                weights=config.backbone_weights,
            )
            model = build_classifier(
                backbone, train_full.num_classes, head_name="source_head", name="pretrained"
            )
            steps = data_lib.steps_per_epoch(len(train), config.batch_size)
            model.compile(
                optimizer=_make_optimizer(config, steps),
                loss="sparse_categorical_crossentropy",
                metrics=_metrics(),
            )
        fit_info = _fit(model, strategy, train, val, config, run_dir, is_chief)
    report = _evaluate(
        model,
        test,
        config,
        {
            "source": config.source,
            "backbone": config.backbone,
            "seed": config.seed,
            "train_examples": len(train),
            **fit_info,
            "strategy": distribute.describe_strategy(strategy),
            "seconds": round(time.time() - start, 1),
            "environment": run_environment(),
        },
    )
    outputs = {"report": report, "output_dir": os.path.abspath(run_dir)}
    if is_chief:
        outputs["model"] = os.path.join(run_dir, "model.keras")
        save_model_atomic(model, outputs["model"])
        outputs["report_json"], outputs["report_md"] = evaluation.write_report(
            report, run_dir, title=f"Pretraining report: {config.backbone} on {config.source}"
        )
    return outputs


__all__ = [
    "DEFAULT_BACKBONE",
    "DEFAULT_PRETRAIN_DIR",
    "FinetuneConfig",
    "METHODS",
    "PretrainConfig",
    "finetune",
    "load_train_test",
    "pretrain",
]
