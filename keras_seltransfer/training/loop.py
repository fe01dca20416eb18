"""The general training loop: optimizer, `fit` with early stopping and
resumable checkpoints, and evaluation, shared by every method and by
pretraining."""

import contextlib
import dataclasses
import json
import os
import warnings

import keras

from keras_seltransfer import data as data_lib
from keras_seltransfer import distribute
from keras_seltransfer import evaluation
from keras_seltransfer.callbacks import TrainingCheckpoint
from keras_seltransfer.callbacks import ValidationCollapseMonitor
from keras_seltransfer.optimizers import make_optimizer
from keras_seltransfer.utils.io import atomic_write_text
from keras_seltransfer.utils.run_lock import RunLock


@contextlib.contextmanager
def dtype_policy(name):
    """Sets the global Keras dtype policy for the duration of a block.

    The previous policy is restored on leaving the block, also on error.

    Args:
        name: a Keras dtype policy name (`"float32"`, `"mixed_float16"`,
            `"mixed_bfloat16"`).

    Example:

    >>> import keras
    >>> with dtype_policy("mixed_bfloat16"):
    ...     keras.layers.Dense(2).compute_dtype
    'bfloat16'
    >>> keras.config.dtype_policy().name
    'float32'
    """
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(name)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)


def run_directory_lock(config):
    """The lock a run holds on `config.output_dir` while it writes there.

    A `RunLock` of `config.output_dir` (with `config.force`) on the chief;
    on the other workers of a multi-worker strategy a lock that does
    nothing. Only the chief writes the run directory; a worker writes its
    throwaway `<output_dir>/.worker_scratch` and must not contend for the
    chief's lock, which it would find held (on a shared file system) or
    absent (on its own disk). Workers take no lock of their own: their
    scratch is never read as a result, and a worker restarted on another
    host would be refused by the lock its predecessor left.

    Args:
        config: a `FinetuneConfig` or `PretrainConfig`.

    Returns:
        A context manager.

    Raises:
        ValueError: if `TF_CONFIG` is malformed.

    Example:

    ```python
    with run_directory_lock(config):  # RunLockedError if another run has it
        summary = fit(model, train_data, val_data, config, config.output_dir, is_chief=True)
    ```
    """
    if not distribute.is_chief():
        return contextlib.nullcontext()
    return RunLock(config.output_dir, force=config.force)


def classifier_metrics():
    """Accuracy and the plain cross-entropy of a single-output classifier.

    The cross-entropy, logged as `crossentropy`, is reported beside `loss`
    (which also holds any weight penalties) so early stopping can monitor
    `val_crossentropy`.

    Returns:
        A new list of metrics for `compile` (sparse integer labels).

    Example:

    ```python
    model.compile(optimizer, "sparse_categorical_crossentropy", metrics=classifier_metrics())
    ```
    """
    return [
        "accuracy",
        keras.metrics.SparseCategoricalCrossentropy(name="crossentropy"),
    ]


def optimizer_for(config, steps_per_epoch, lr_multipliers=None, schedule=None):
    """The run's optimizer, made from its config.

    `config.optimizer` (`sgd` with momentum 0.9) with cosine decay of
    `config.learning_rate` to zero over `config.epochs * steps_per_epoch`
    steps (or the schedule `schedule(config, steps_per_epoch)` makes),
    `config.weight_decay` and optional per-variable learning-rate
    multipliers (`keras_seltransfer.optimizers.make_optimizer`).

    Args:
        config: a `FinetuneConfig` or `PretrainConfig`.
        steps_per_epoch: training steps per epoch.
        lr_multipliers: `{regular expression on variable paths: factor}`, or
            None.
        schedule: a function `(config, steps_per_epoch) ->` learning-rate
            schedule, or None for the cosine decay.

    Returns:
        A `keras.optimizers.Optimizer`.

    Example:

    ```python
    config = FinetuneConfig(backbone="small_cnn", optimizer="sgd", epochs=10)
    optimizer = optimizer_for(config, steps_per_epoch=50, lr_multipliers={"^target_head/": 10.0})
    # a MultiplierSGD, learning rate 1e-3 cosine-decayed over 500 steps
    ```
    """
    if schedule is None:
        learning_rate = keras.optimizers.schedules.CosineDecay(
            config.learning_rate, decay_steps=max(1, config.epochs * steps_per_epoch)
        )
    else:
        learning_rate = schedule(config, steps_per_epoch)
    kwargs = {"weight_decay": config.weight_decay or None}
    if config.optimizer == "sgd":
        kwargs["momentum"] = 0.9
    return make_optimizer(config.optimizer, learning_rate, lr_multipliers=lr_multipliers, **kwargs)


def classifier_data(strategy, train, val, config, channels, sampling="uniform"):
    """The single-task input pipelines of a classifier run.

    With `sampling="balanced"` every training batch draws its images from
    the classes with equal probability (`make_dataset`'s `sampling`); an
    epoch keeps the same number of steps as with uniform sampling.

    Args:
        strategy: the run's `tf.distribute.Strategy`.
        train: the training `ImageSource`.
        val: the validation `ImageSource`.
        config: the run's config (`batch_size`, `image_size`, `augment`,
            `seed`).
        channels: channels the model takes (images are converted).
        sampling: `"uniform"` or `"balanced"` (see above).

    Returns:
        `(train_data, val_data, steps)`: a function from the number of
        epochs already done to the repeated, augmented, distributed training
        dataset (skipping the batches an interrupted run had consumed), the
        validation dataset, and the training steps per epoch.

    Example:

    ```python
    train_data, val_data, steps = classifier_data(strategy, train, val, config, channels=1)
    model.fit(train_data(0), epochs=config.epochs, steps_per_epoch=steps,
              validation_data=val_data)
    ```
    """
    steps = data_lib.steps_per_epoch(len(train), config.batch_size)

    def train_data(initial_epoch):
        return data_lib.distributed_dataset(
            strategy,
            train,
            config.batch_size,
            config.image_size,
            training=True,
            channels=channels,
            augment=config.augment,
            seed=config.seed,
            repeat=True,
            skip_steps=initial_epoch * steps,
            sampling=sampling,
        )

    val_data = data_lib.make_dataset(val, config.image_size, config.batch_size, channels=channels)
    return train_data, val_data, steps


def fit(
    model,
    train_data,
    val_data,
    config,
    run_dir,
    is_chief,
    *,
    steps=None,
    class_weight=None,
    monitor="val_crossentropy",
    accuracy="accuracy",
    callbacks=(),
    state_variables=None,
):
    """Trains with early stopping, resumable checkpoints and logs.

    `train_data` is a function from the number of epochs already finished
    (nonzero when resuming) to the dataset to train on from there.
    `steps` is None when that dataset ends after each epoch.

    `callbacks` run after early stopping and before the checkpoint (so the
    checkpoint saves the state they leave at the end of an epoch) and
    TensorBoard (so it logs what they add to the logs). A
    `ValidationCollapseMonitor` on the `accuracy` metric warns when
    validation accuracy falls while training accuracy rises; the returned
    `validation_collapse` lists the flagged epochs.

    The chief writes `config.json` here, once everything before training has
    succeeded.

    Args:
        model: the compiled model.
        train_data: see above.
        val_data: the validation dataset.
        config: the run's config (`epochs`, `patience`, `verbose`,
            `tensorboard`; saved as `config.json`).
        run_dir: the run directory (`backup/`, `logs/`, `config.json`).
        is_chief: whether this worker writes outputs.
        steps: training steps per epoch, or None (see above).
        class_weight: `fit`'s `class_weight`, or None.
        monitor: the validation metric early stopping minimises.
        accuracy: the training-log name of the accuracy metric.
        callbacks: extra callbacks (see above).
        state_variables: training state checkpointed besides the model's
            weights (`name -> tf.Variable`), or None.

    Returns:
        A dict: `history`, `epochs_run`, `resumed_from_epoch`,
        `best_<monitor>` and `validation_collapse`.

    Example:

    ```python
    train_data, val_data, steps = classifier_data(strategy, train, val, config, channels=1)
    with strategy.scope():
        model.compile(optimizer_for(config, steps), "sparse_categorical_crossentropy",
                      metrics=classifier_metrics())
    summary = fit(model, train_data, val_data, config, config.output_dir, is_chief=True,
                  steps=steps)
    summary["epochs_run"], summary["best_val_crossentropy"]
    ```
    """
    # Only the chief keeps checkpoints and logs; other workers write to a
    # scratch directory that is discarded.
    work_dir = run_dir if is_chief else os.path.join(run_dir, ".worker_scratch")
    # Early stopping and model selection watch the validation cross-entropy,
    # not `val_loss`: Keras adds weight penalties (L2-SP) to `val_loss`, and a
    # penalty that grows as the weights leave their start would stop training
    # for the wrong reason.
    early_stopping = keras.callbacks.EarlyStopping(
        monitor=monitor,
        mode="min",
        patience=config.patience,
        restore_best_weights=True,
        verbose=min(config.verbose, 1),
    )
    checkpoint = TrainingCheckpoint(
        os.path.join(work_dir, "backup"),
        early_stopping=early_stopping,
        state_variables=state_variables or None,
    )
    # Checked before restoring: restoring builds the optimizer, whose
    # variables' creation is itself a collective operation.
    state = checkpoint.read_state()
    _check_same_resume_epoch(model, 0 if state is None else int(state["epoch"]), run_dir)
    initial_epoch = checkpoint.restore(model)
    if is_chief:
        _write_config(config, run_dir)
    if initial_epoch and config.verbose:
        print(f"Resuming from the checkpoint after epoch {initial_epoch}.")
    collapse = ValidationCollapseMonitor(accuracy)
    # The checkpoint comes after early stopping so it can re-apply its state.
    all_callbacks = [early_stopping, *callbacks, collapse, checkpoint]
    if config.tensorboard:
        all_callbacks.append(keras.callbacks.TensorBoard(os.path.join(work_dir, "logs")))
    with warnings.catch_warnings():
        # A finite distributed dataset (the joint pipeline) ends its first
        # epoch with this warning because its length is unknown until then.
        warnings.filterwarnings("ignore", message="Your input ran out of data")
        history = model.fit(
            train_data(initial_epoch),
            epochs=config.epochs,
            initial_epoch=initial_epoch,
            steps_per_epoch=steps,
            validation_data=val_data,
            callbacks=all_callbacks,
            class_weight=class_weight,
            # The pipelines shuffle, seeded, themselves.
            shuffle=False,
            verbose=config.verbose,
        )
    return {
        "history": {k: [float(v) for v in vs] for k, vs in history.history.items()},
        "epochs_run": initial_epoch + len(history.epoch),
        "resumed_from_epoch": initial_epoch,
        "best_" + monitor: (
            None if early_stopping.best is None else float(early_stopping.best)
        ),
        "validation_collapse": {
            "detected": bool(collapse.collapsed_epochs),
            "epochs": [epoch + 1 for epoch in collapse.collapsed_epochs],
            "window": collapse.window,
            "min_drop": collapse.min_drop,
        },
    }


def _check_same_resume_epoch(model, epoch, run_dir):
    """Refuses to train when the workers of a multi-worker run would resume
    from checkpoints of different epochs: each keeps its own (a worker
    killed between the chief's save and its own, or restarted without its
    disk, lags), and training on from different weights, schedules and
    data positions would leave the workers' copies of the model out of
    step."""
    strategy = getattr(model, "distribute_strategy", None)
    if strategy is None:
        return
    epochs = distribute.worker_values(strategy, epoch)
    if len(set(epochs)) > 1:
        scratch = os.path.join(run_dir, ".worker_scratch", "backup")
        raise ValueError(
            f"The workers' checkpoints are of different epochs: {epochs} (worker 0 first; "
            "0 is no checkpoint), so they cannot resume together. Each worker keeps its own "
            f"checkpoint (the chief in {os.path.join(run_dir, 'backup')}, the others in "
            f"{scratch}). Copy the chief's backup directory to {scratch} on every other worker "
            "and restart them all, or delete those directories on every worker to start afresh."
        )


def _write_config(config, run_dir):
    # Written only once data, model and method are set up: a rerun that
    # fails on bad input leaves the record of the run whose model and report
    # are in the directory.
    atomic_write_text(
        os.path.join(run_dir, "config.json"),
        json.dumps(dataclasses.asdict(config), indent=2, sort_keys=True) + "\n",
    )


def no_fit(config, run_dir, is_chief, monitor="val_crossentropy"):
    """The summary of a run whose model the method trained itself (no `fit`).

    Writes `config.json` (on the chief), as `fit` does, and returns `fit`'s
    summary keys for a run of no epochs.

    Args:
        config: the run's config (saved as `config.json`).
        run_dir: the run directory.
        is_chief: whether this worker writes outputs.
        monitor: the validation metric `fit` would have monitored.

    Returns:
        A dict: empty `history`, `epochs_run` 0, `resumed_from_epoch` 0,
        `best_<monitor>` None and no `validation_collapse`.

    Example:

    ```python
    summary = no_fit(config, config.output_dir, is_chief=True)
    summary["epochs_run"]  # 0
    ```
    """
    if is_chief:
        _write_config(config, run_dir)
    return {
        "history": {},
        "epochs_run": 0,
        "resumed_from_epoch": 0,
        "best_" + monitor: None,
        "validation_collapse": {"detected": False, "epochs": []},
    }


def evaluate_model(model, images, batch_size, extra=None, strategy=None):
    """The classification report (`evaluation.classification_report`) of
    `model` on `images` (an `ImageSource`), resized to the model's input
    size and converted to its channels, with `extra` entries added.

    With a `strategy` of several replicas (the model built or loaded in its
    scope), `model.predict` splits each batch of `batch_size` images over
    the replicas (and workers: under `MultiWorkerMirroredStrategy` every
    worker runs this and gets every prediction, in order); otherwise the
    model predicts batch by batch in this process.

    Example:

    ```python
    _, test = keras_seltransfer.data.load_train_test("elpv")
    report = evaluate_model(keras.saving.load_model("model.keras"), test, batch_size=64)
    ```
    """
    height, width, channels = (int(d) for d in model.inputs[0].shape[1:])
    dataset = data_lib.make_dataset(images, (height, width), batch_size, channels=channels)
    if strategy is not None and strategy.num_replicas_in_sync > 1:
        with strategy.scope():
            probabilities = model.predict(dataset, verbose=0)
        # The dataset keeps the source's order.
        labels = images.labels
    else:
        probabilities, labels = evaluation.predict_dataset(model, dataset)
    report = evaluation.classification_report(labels, probabilities, images.class_names)
    report.update(extra or {})
    return report


__all__ = [
    "classifier_data",
    "classifier_metrics",
    "dtype_policy",
    "evaluate_model",
    "fit",
    "no_fit",
    "optimizer_for",
    "run_directory_lock",
]
