"""`pretrain`: a backbone trained with a classification head on a source set."""

import os
import time

import keras
import tensorflow as tf

from keras_seltransfer import data as data_lib
from keras_seltransfer import distribute
from keras_seltransfer import evaluation
from keras_seltransfer.models import backbones
from keras_seltransfer.models.classifier import build_classifier
from keras_seltransfer.training import loop
from keras_seltransfer.training.config import PretrainConfig
from keras_seltransfer.training.reporting import run_environment
from keras_seltransfer.utils.io import save_model_atomic


def pretrain(config):
    """Trains a backbone with a classification head on a source data set.

    This is how pretrained backbones are made without internet access: the
    classifier is saved as `<output_dir>/model.keras`, and
    `load_backbone(path)` cuts it at its `"features"` layer. Writes
    `config.json`, `report.json` / `report.md` (source test accuracy) and
    TensorBoard logs beside it; resumes from `backup/` when interrupted.
    The run owns `config.output_dir` as `finetune` owns its own (the lock
    file `run.lock`; `config.force`).

    Args:
        config: a `PretrainConfig`.

    Returns:
        A dict with the report and the paths written.

    Raises:
        RunLockedError: if another run owns `config.output_dir`.

    Example:

    ```python
    outputs = pretrain(PretrainConfig(source="fashion_mnist", epochs=3))
    backbone = keras_seltransfer.models.load_backbone(outputs["model"], (64, 64, 1))
    ```
    """
    if not isinstance(config, PretrainConfig):
        raise TypeError(
            f"`config` must be a PretrainConfig. Received: config of type {type(config).__name__}"
        )
    with loop.run_directory_lock(config):
        return _pretrain(config)


def _pretrain(config):
    start = time.time()
    keras.utils.set_random_seed(config.seed)
    if config.deterministic:
        tf.config.experimental.enable_op_determinism()
    strategy = distribute.get_strategy(config.strategy)  # first: see `finetune`
    train_full, test = data_lib.load_train_test(
        config.source, config.test_fraction, config.split_seed, channels=config.channels
    )
    if config.fraction < 1.0:
        train_full = train_full.subset(
            data_lib.low_data_subset(train_full.labels, fraction=config.fraction, seed=config.seed)
        )
    train_idx, val_idx = data_lib.train_val_split(
        train_full.labels, val_fraction=config.val_fraction, seed=config.seed
    )
    train, val = train_full.subset(train_idx), train_full.subset(val_idx)
    is_chief = distribute.is_chief()
    run_dir = config.output_dir
    os.makedirs(run_dir, exist_ok=True)
    channels = config.channels or train_full.channels
    with loop.dtype_policy(config.precision):
        with strategy.scope():
            backbone = backbones.load_backbone(
                config.backbone,
                (config.image_size, config.image_size, channels),
                weights=config.backbone_weights,
            )
            model = build_classifier(
                backbone, train_full.num_classes, head_name="source_head", name="pretrained"
            )
        train_data, val_data, steps = loop.classifier_data(strategy, train, val, config, channels)
        with strategy.scope():
            model.compile(
                optimizer=loop.optimizer_for(config, steps),
                loss="sparse_categorical_crossentropy",
                metrics=loop.classifier_metrics(),
            )
        fit_info = loop.fit(
            model, train_data, val_data, config, run_dir, is_chief, steps=steps
        )
    report = loop.evaluate_model(
        model,
        test,
        config.batch_size,
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


__all__ = ["pretrain"]
