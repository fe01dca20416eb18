"""`finetune`: one run of any registered method, end to end."""

import os
import time
import warnings

import keras
import numpy as np
import tensorflow as tf
from sklearn.utils.class_weight import compute_class_weight

from keras_seltransfer import data as data_lib
from keras_seltransfer import distribute
from keras_seltransfer import evaluation
from keras_seltransfer import methods
from keras_seltransfer.export import export_saved_model
from keras_seltransfer.models import backbones
from keras_seltransfer.models import surgery
from keras_seltransfer.models.classifier import set_batchnorm_mode
from keras_seltransfer.training import loop
from keras_seltransfer.training.config import FinetuneConfig
from keras_seltransfer.training.defaults import DEFAULT_BACKBONE
from keras_seltransfer.training.reporting import run_environment
from keras_seltransfer.utils.io import save_model_atomic


def finetune_split(config):
    """The images a fine-tuning run uses, chosen exactly as `finetune` does.

    Loads `config.target` with its held-out test split (`test_fraction`,
    `split_seed`), keeps `fraction` (or `per_class` images) of each training
    class and splits the kept images into training and validation
    (`val_fraction`), all seeded by `config.seed`.

    Args:
        config: a `FinetuneConfig` (only its data fields are read).

    Returns:
        `(train_full, test, train_ids, val_ids)`: the target's whole training
        split, its test split, and the positions in `train_full` of the
        images trained on and of those kept for validation.

    Example:

    ```python
    config = FinetuneConfig(target="elpv", fraction=0.15, seed=1)
    train_full, test, train_ids, val_ids = finetune_split(config)
    train, val = train_full.subset(train_ids), train_full.subset(val_ids)
    ```
    """
    train_full, test = data_lib.load_train_test(
        config.target, config.test_fraction, config.split_seed, channels=config.channels
    )
    kept = data_lib.low_data_subset(
        train_full.labels,
        fraction=None if config.per_class is not None else config.fraction,
        per_class=config.per_class,
        seed=config.seed,
    )
    train_idx, val_idx = data_lib.train_val_split(
        train_full.labels[kept], val_fraction=config.val_fraction, seed=config.seed
    )
    return train_full, test, np.asarray(kept)[train_idx], np.asarray(kept)[val_idx]


def load_backbone(config, data_channels):
    """The backbone of `config` (call inside the strategy scope).

    Loads `config.backbone` (`keras_seltransfer.models.load_backbone`: a
    `.keras` file, a built-in, `keras.applications` or `"kerashub:<preset>"`
    name) with `config.backbone_weights` at `config.image_size`, with
    `config.channels` or, when unset, the data's channels for a built-in
    backbone (a saved or named backbone keeps its own); casts a saved
    backbone to `config.precision` and re-initialises it when
    `config.from_scratch`. A named backbone without weights (random
    initialisation) is fine-tuned with a warning.

    Args:
        config: a `FinetuneConfig` (or any config with its backbone fields).
        data_channels: channels of the target images as stored.

    Returns:
        A `keras.Model` from images to pooled features.

    Example:

    ```python
    config = FinetuneConfig(backbone="small_cnn", image_size=32)
    with strategy.scope():
        backbone = load_backbone(config, data_channels=1)  # input (None, 32, 32, 1)
    ```
    """
    named = not backbones.is_backbone_path(config.backbone)
    if named and not backbones.is_builtin_backbone(config.backbone):
        if config.backbone_weights is None and not getattr(config, "from_scratch", False):
            warnings.warn(
                f"Backbone {config.backbone!r} starts from random weights: pass "
                "--backbone_weights=imagenet (keras.applications) or --backbone_weights=preset "
                "(KerasHub) to fine-tune pretrained ones.",
                stacklevel=2,
            )
    shape_channels = config.channels
    if shape_channels is None and named:
        if backbones.is_builtin_backbone(config.backbone):
            shape_channels = data_channels
    backbone = backbones.load_backbone(
        config.backbone,
        (config.image_size, config.image_size, shape_channels),
        weights=config.backbone_weights,
        cut_layer=config.cut_layer,
    )
    if config.precision != "float32" and backbones.is_backbone_path(config.backbone):
        backbone = backbones.with_dtype_policy(backbone, config.precision)
    if getattr(config, "from_scratch", False):
        backbone = backbones.reinitialize(backbone, seed=config.seed)
    return backbone


def backbone_loader(config, data_channels):
    """A function of no arguments returning fresh copies of the run's backbone.

    The first call loads it (`load_backbone`) with nested models inlined
    (`models.surgery.flatten`: ConvNeXt's `Sequential` blocks, a wrapped
    application), so methods find every layer by name at the top level;
    later calls clone that model
    (`keras.models.clone_model`) and give the clone its weights as they were
    when first loaded. So every copy a method asks for (the network fine-tuned,
    the frozen reference of L2-SP, DELTA and KTFT, SJFT's conv bank) has the
    same layer names and starting weights, also for a `keras.applications`
    backbone with random weights, whose unnamed layers get new names
    (`activation_162`, ...) and new random weights each time it is built.

    Args:
        config: a `FinetuneConfig`.
        data_channels: channels of the target images as stored.

    Returns:
        The loader (call it inside the strategy scope).

    Example:

    ```python
    load = backbone_loader(FinetuneConfig(backbone="MobileNetV3Small", image_size=32), 1)
    tuned, reference = load(), load()  # same names, same weights
    ```
    """
    first = {}

    def load():
        if "model" not in first:
            model = surgery.flatten(load_backbone(config, data_channels))
            first["model"], first["weights"] = model, model.get_weights()
            return model
        copy = keras.models.clone_model(first["model"])
        copy.set_weights(first["weights"])
        return copy

    return load


def _check_backbone_file(config):
    if backbones.is_backbone_path(config.backbone) and not os.path.isfile(config.backbone):
        hint = (
            " Run `python -m apps.pretrain` first to create it."
            if os.path.normpath(config.backbone) == os.path.normpath(DEFAULT_BACKBONE)
            else ""
        )
        raise FileNotFoundError(f"Backbone file not found: {config.backbone!r}.{hint}")


def _class_weight(config, labels):
    if config.class_weight != "balanced":
        return None
    present = np.unique(labels)
    weights = compute_class_weight("balanced", classes=present, y=labels)
    return {int(c): float(w) for c, w in zip(present, weights)}


def finetune(config):
    """Fine-tunes a backbone on a target data set and writes the run's outputs.

    With `config.method == "auto"` it chooses the method first, by k-fold
    cross-validation on the training images, and trains the choice
    (`keras_seltransfer.training.auto.finetune_auto`).

    The loop is the same for every method (`keras_seltransfer.methods`):
    data -> the method's model (a classifier, or SJFT's two-head model) ->
    BatchNorm mode -> `config.compose` transforms -> the method's setup ->
    compile -> `fit` -> evaluation -> saving.

    Writes into `config.output_dir`: `config.json`, `model.keras` (the
    fine-tuned classifier), `report.json` / `report.md` (test-set accuracy,
    balanced accuracy, per-class accuracy, confusion matrix, history),
    `saved_model/` (when `config.export`), `logs/` (TensorBoard) and any
    extra model the method saves (SJFT: `multitask.keras`). An interrupted
    run resumes from `backup/` when rerun with the same output directory.
    Every file is written atomically.

    The run owns `config.output_dir` from start to end: before anything is
    written it takes the directory's lock file (`run.lock`, see
    `keras_seltransfer.utils.RunLock`), and a second run of the same
    directory is refused while this one runs; `config.force` takes over a
    lock whose owner cannot be checked (another host). The auto mode holds
    one lock for the whole run, its folds under `<output_dir>/auto/`
    included.

    Args:
        config: a `FinetuneConfig`.

    Returns:
        A dict with the report and the paths written.

    Raises:
        RunLockedError: if another run owns `config.output_dir`.

    Example:

    ```python
    outputs = finetune(FinetuneConfig(target="elpv", method="sjft", fraction=0.15))
    print(outputs["report"]["balanced_accuracy"], outputs["model"])
    ```
    """
    if not isinstance(config, FinetuneConfig):
        raise TypeError(
            f"`config` must be a FinetuneConfig. Received: config of type {type(config).__name__}"
        )
    with loop.run_directory_lock(config):
        if config.method == methods.AUTO:
            # Imported here: the auto mode runs `finetune` for its candidates.
            from keras_seltransfer.training import auto

            return auto.finetune_auto(config)
        return _finetune(config)


def _finetune(config):
    _check_backbone_file(config)
    start = time.time()
    strategy, train_full, test, train_ids, val_ids = _start(config)
    setup, context, fit_info, extra = _train(config, strategy, train_full, train_ids, val_ids)
    report = loop.evaluate_model(
        setup.classifier,
        test,
        config.batch_size,
        {
            **_run_facts(config, context, strategy, start),
            **fit_info,
            **extra,
        },
    )
    return _save(config, setup, report, test.class_names, context.is_chief)


def fit_and_score(config, train_ids, val_ids):
    """Trains `config`'s method on chosen images and scores it on the others.

    The run of `finetune` on the images of `config.target`'s training split
    at positions `train_ids`, with early stopping and model selection on
    those at `val_ids`, and its classification report on the `val_ids`
    images: the test split is never loaded into the model, nothing is
    exported and no model is saved (one fold of cross-validation; see
    `keras_seltransfer.training.auto`). An interrupted fit resumes from
    `config.output_dir`'s checkpoint; the directory is locked for the fit
    as `finetune` locks its run's.

    Args:
        config: a `FinetuneConfig` of a registered method.
        train_ids: positions in the target's training split to train on.
        val_ids: positions to stop on and score on (disjoint from `train_ids`).

    Returns:
        The classification report on the `val_ids` images (accuracy,
        balanced accuracy, ...) with the run's facts (`epochs_run`,
        `seconds`, ...).

    Raises:
        ValueError: if the positions overlap or are out of range.
        RunLockedError: if another run owns `config.output_dir`.

    Example:

    ```python
    train_full, _, train_ids, val_ids = finetune_split(config)
    report = fit_and_score(config, train_ids, val_ids)
    report["balanced_accuracy"]
    ```
    """
    with loop.run_directory_lock(config):
        return _fit_and_score(config, train_ids, val_ids)


def _fit_and_score(config, train_ids, val_ids):
    _check_backbone_file(config)
    start = time.time()
    strategy, train_full, _, _, _ = _start(config)
    train_ids, val_ids = np.asarray(train_ids, int), np.asarray(val_ids, int)
    for name, ids in (("train_ids", train_ids), ("val_ids", val_ids)):
        if not len(ids) or ids.min() < 0 or ids.max() >= len(train_full):
            raise ValueError(
                f"`{name}` must be non-empty positions in the training split of "
                f"{config.target!r} (0 to {len(train_full) - 1}). Received: {len(ids)} "
                f"positions{'' if not len(ids) else f' from {ids.min()} to {ids.max()}'}"
            )
    if np.intersect1d(train_ids, val_ids).size:
        raise ValueError("`train_ids` and `val_ids` must be disjoint: a scored image was trained on.")
    setup, context, fit_info, extra = _train(config, strategy, train_full, train_ids, val_ids)
    return loop.evaluate_model(
        setup.classifier,
        context.val,
        config.batch_size,
        {**_run_facts(config, context, strategy, start), **fit_info, **extra},
    )


def _start(config):
    """Seeds, the strategy and the run's images (see `finetune_split`)."""
    keras.utils.set_random_seed(config.seed)
    if config.deterministic:
        tf.config.experimental.enable_op_determinism()
    # The strategy comes first: a multi-worker strategy configures
    # TensorFlow's collective ops, which must happen before anything starts
    # the runtime (the sjft selection creates variables).
    strategy = distribute.get_strategy(config.strategy)
    train_full, test, train_ids, val_ids = finetune_split(config)
    return strategy, train_full, test, train_ids, val_ids


def _train(config, strategy, train_full, train_ids, val_ids):
    """Prepares, builds and fits `config`'s method on the given images;
    returns `(setup, context, fit_info, extra report entries)`."""
    method = methods.get(config.method)
    context = methods.MethodContext(
        strategy=strategy,
        train=train_full.subset(train_ids),
        val=train_full.subset(val_ids),
        num_classes=train_full.num_classes,
        data_channels=train_full.channels,
        run_dir=config.output_dir,
        is_chief=distribute.is_chief(),
        class_weight=_class_weight(config, train_full.labels[train_ids]),
        load_backbone=backbone_loader(config, train_full.channels),
        state={"train_ids": train_ids},
    )
    method.prepare(config, context)
    # Preparing (building a missing index) may draw random numbers; seeding
    # again makes the model's initialisation the same either way.
    keras.utils.set_random_seed(config.seed)
    os.makedirs(config.output_dir, exist_ok=True)
    with loop.dtype_policy(config.precision):
        setup = _setup(config, method, context)
        fit_info = _compile_and_fit(config, setup, context)
        extra = setup.report(fit_info) if setup.report is not None else {}
    return setup, context, fit_info, extra


def _run_facts(config, context, strategy, start):
    return {
        "method": config.method,
        "target": config.target,
        "backbone": config.backbone,
        "fraction": config.fraction if config.per_class is None else None,
        "per_class": config.per_class,
        "seed": config.seed,
        "train_examples": len(context.train),
        "val_examples": len(context.val),
        "strategy": distribute.describe_strategy(strategy),
        "seconds": round(time.time() - start, 1),
        "environment": run_environment(),
    }


def _setup(config, method, context):
    """The method's model, BatchNorm mode and composed transforms (in the
    strategy scope), then its `MethodSetup`."""
    with context.strategy.scope():
        model = method.build_model(config, context)
        set_batchnorm_mode(model, config.batchnorm_mode)
        model = methods.apply_transforms(config, model, context)
    return method.setup(config, model, context)


def _compile_and_fit(config, setup, context):
    """Compiles `setup.model` (optimizer with the schedule and learning-rate
    multipliers of the method and transforms) and fits it on the method's
    data, or on the single-task pipelines of the target images; a setup
    with `fit=False` (a model the method trained itself) is neither compiled
    nor fitted."""
    if not setup.fit:
        return loop.no_fit(config, config.output_dir, context.is_chief, setup.monitor)
    if setup.train_data is not None and config.sampling != "uniform":
        raise ValueError(
            f"`sampling` applies to the single-task pipeline; --method={config.method} draws "
            f"its own batches. Received: sampling={config.sampling!r}"
        )
    if setup.train_data is None:
        channels = int(setup.model.inputs[0].shape[-1])
        train_data, val_data, steps = loop.classifier_data(
            context.strategy, context.train, context.val, config, channels, config.sampling
        )
        fit_steps, class_weight = steps, context.class_weight
    else:
        train_data, val_data, steps = setup.train_data, setup.val_data, setup.steps_per_epoch
        # The method's pipeline applies the class weights itself.
        fit_steps, class_weight = (None if setup.epoch_dataset else steps), None
    multipliers = {
        **(methods.transform_lr_multipliers(config, setup.model) or {}),
        **(setup.lr_multipliers or {}),
    }
    with context.strategy.scope():
        setup.model.compile(
            optimizer=loop.optimizer_for(
                config, steps, multipliers or None, setup.learning_rate_schedule
            ),
            **{
                "loss": "sparse_categorical_crossentropy",
                "metrics": loop.classifier_metrics(),
                **setup.compile_kwargs,
            },
        )
    return loop.fit(
        setup.model,
        train_data,
        val_data,
        config,
        config.output_dir,
        context.is_chief,
        steps=fit_steps,
        class_weight=class_weight,
        monitor=setup.monitor,
        accuracy=setup.accuracy,
        callbacks=setup.callbacks,
        state_variables=setup.state_variables,
    )


def _save(config, setup, report, class_names, is_chief):
    run_dir = config.output_dir
    outputs = {"report": report, "output_dir": os.path.abspath(run_dir)}
    if not is_chief:
        return outputs
    outputs["model"] = os.path.join(run_dir, "model.keras")
    save_model_atomic(setup.classifier, outputs["model"])
    for filename, model in setup.saved_models.items():
        # multitask.keras -> outputs["multitask_model"]
        key = os.path.splitext(filename)[0] + "_model"
        outputs[key] = os.path.join(run_dir, filename)
        save_model_atomic(model, outputs[key])
    if config.export:
        outputs["saved_model"] = export_saved_model(
            setup.export_model, os.path.join(run_dir, "saved_model"), class_names=class_names
        )
    outputs["report_json"], outputs["report_md"] = evaluation.write_report(
        report, run_dir, title=f"Fine-tuning report: {config.method} on {config.target}"
    )
    return outputs


__all__ = ["backbone_loader", "finetune", "finetune_split", "fit_and_score", "load_backbone"]
