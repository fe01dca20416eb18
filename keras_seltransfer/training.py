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
import warnings

import keras
import numpy as np
import tensorflow as tf
from sklearn.utils.class_weight import compute_class_weight

from keras_seltransfer import data as data_lib
from keras_seltransfer.data.protocol import load_train_test
from keras_seltransfer.callbacks import AdaptiveNeighbourGrowth
from keras_seltransfer.callbacks import BatchNormRecalibration
from keras_seltransfer.callbacks import TrainingCheckpoint
from keras_seltransfer.callbacks import ValidationCollapseMonitor
from keras_seltransfer import distribute
from keras_seltransfer import evaluation
from keras_seltransfer import recipes
from keras_seltransfer.export import export_saved_model
from keras_seltransfer.models import backbones
from keras_seltransfer.models.adafilter import FIRST_GATE_INPUTS
from keras_seltransfer.models.classifier import build_classifier
from keras_seltransfer.models.classifier import set_batchnorm_mode
from keras_seltransfer.models.filter_transfer import REINIT_BATCHNORM
from keras_seltransfer.models.multitask import build_multitask_model
from keras_seltransfer.models.multitask import joint_compile_args
from keras_seltransfer.models.multitask import target_model
from keras_seltransfer.optimizers import make_optimizer
from keras_seltransfer.regularizers import apply_l2sp
from keras_seltransfer.utils.io import atomic_write_text
from keras_seltransfer.utils.io import save_model_atomic

DEFAULT_PRETRAIN_DIR = os.path.join("runs", "pretrain", "fashion_mnist-small_cnn-64")
DEFAULT_BACKBONE = os.path.join(DEFAULT_PRETRAIN_DIR, "model.keras")

# Fine-tuning methods this module runs: single-task fine-tuning of a
# classifier (see `_prepare_model`) or selective joint fine-tuning of a
# two-head model (see `_finetune_joint`), with the sampling variant of each.
JOINT_VARIANTS = {
    "sjft": "selected",
    "sjft_nogrowth": "selected_nogrowth",
    "sjft_all": "all",
    "sjft_random": "random",
}
# Single-task methods with a recipe (keras_seltransfer.recipes): AdaFilter,
# selective filter transfer, anti-aliased fine-tuning and knowledge-transferred
# fine-tuning of the anti-aliased network.
RECIPE_METHODS = ("adafilter", "filter_transfer", "antialias_ft", "ktft")
METHODS = ("baseline", "l2sp") + tuple(JOINT_VARIANTS) + RECIPE_METHODS
GATE_ESTIMATORS = ("ste", "gumbel")
GATED_BATCHNORM_MODES = ("train", "frozen")
RELEVANCE_STATISTICS = ("mean", "frequency", "kl")
PRUNE_ACTIONS = ("mask", "reinit")
BLUR_PAD_TYPES = ("reflect", "replicate", "zero")
INDEX_BANKS = ("conv", "gabor")
OPTIMIZERS = ("adam", "sgd")
# Which BatchNorm statistics an sjft model with trained BatchNorm validates
# and serves with (see FinetuneConfig.joint_bn_stats).
JOINT_BN_STATS = ("target", "mixture_exact", "mixture")
# When neighbour lists grow (see FinetuneConfig.growth_mode).
GROWTH_MODES = ("epochs", "rounds")
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
        batchnorm: `"frozen"` (pretrained statistics) or `"train"`; None
            takes the method's default: frozen for baseline and l2sp, train
            for the sjft methods (BatchNorm normalises each mixed
            source/target batch with its own statistics, as in the authors'
            code; see `joint_bn_stats` for the statistics served). Runs from
            scratch always train it.
        augment: training augmentation name (see `make_dataset`).
        class_weight: `"none"` or `"balanced"` (inverse class frequency).
        l2sp_alpha: L2-SP pull toward the pretrained weights (method l2sp).
        l2sp_beta: L2-SP decay of the new head (method l2sp).
        source: source data set spec of the sjft methods (its training split
            is the pool the neighbours come from).
        index_dir: directory of a retrieval run (`apps.build_index`) whose
            `neighbours.npz` lists each target training image's nearest
            source images. Built there when missing (with target fraction 1,
            which serves every fraction and seed). Default:
            `runs/index/<source>-<target>-<index_bank>`.
        index_bank: filter bank used when the index is built: `"conv"` (the
            first two conv layers of `backbone`, which must then be a
            `.keras` file) or `"gabor"`.
        k0: initial neighbours per target image.
        k_max: neighbours kept per target when building the index; lists
            grow to at most `min(k_max, max_level * k0)`.
        max_level: sjft methods: highest sampling level, the authors'
            `highest_sample_level` (10 in their released prototxt): a list
            grows to at most `max_level * k0` neighbours and no target image
            is drawn more than `max_level` times per epoch. 0: no cap (the
            behaviour before this option: lists grow to `k_max`, 20 x k0 by
            default, and one hard image could take 18 of an epoch's 240
            target draws on ELPV at 15%).
        growth_period: epochs per neighbour-growth round (method sjft).
        growth_mode: method sjft (default `"epochs"`; `"rounds"` had a
            higher validation cross-entropy on ELPV, level on digits):
            `"epochs"` grows the lists every
            `growth_period` epochs under one learning-rate schedule;
            `"rounds"` makes every `growth_period` epochs a round with its
            own learning-rate schedule (cosine restarted at each round) and
            grows the lists between rounds, as the authors train each round
            as a separate run and measure hard images at its end.
        joint_bn_stats: sjft methods with BatchNorm trained: the statistics
            the model validates and serves with. `"target"` re-estimates
            every BatchNorm layer's moving statistics on the target training
            images (unaugmented) before every validation and after training
            (`BatchNormRecalibration`); `"mixture_exact"` re-estimates them
            at the same times on the epoch's mixed source/target training
            batches (the statistics training normalised with, exact instead
            of moving averages that lag the weights by several epochs when
            an epoch has few steps); `"mixture"` keeps the moving averages
            of the mixed batches (the behaviour before this option, which
            collapses on targets unlike the source). Training is the same
            either way (training batches use their own statistics); ignored
            when BatchNorm is frozen. Default `"mixture_exact"`: the lowest
            validation cross-entropy on ELPV and on digits (15%, 3 seeds).
        sigma0: growth of misclassified images, in units of `k0`.
        sigma1: growth of correct but uncertain images, in units of `k0`.
        delta: entropy threshold (nats) for "uncertain"; None is half the
            maximum entropy.
        target_weight: weight of the target cross-entropy in the joint loss.
        source_weight: weight of the source cross-entropy in the joint loss.
        gated_layers: AdaFilter: regular expression selecting the Conv2D
            layers to gate (by name, `re.search`); None gates every Conv2D
            and DepthwiseConv2D of the backbone.
        gate_estimator: AdaFilter: gradient estimator of the discrete gates,
            `"ste"` (hard threshold forward, sigmoid gradient backward) or
            `"gumbel"` (straight-through Gumbel-softmax).
        gate_temperature: AdaFilter: Gumbel-softmax temperature.
        gate_units: AdaFilter: hidden units of the shared recurrent gate.
        gate_usage_target: AdaFilter: target fraction of fine-tuned filters
            chosen; None adds no sparsity loss.
        gate_usage_weight: AdaFilter: weight of the sparsity loss.
        gated_batchnorm: AdaFilter: the fine-tuned path's batch norm (the
            paper's gated batch normalisation), `"train"` (batch statistics
            in training, its own moving averages and affine parameters, as
            in the paper) or `"frozen"` (a frozen copy of the pretrained
            one). Independent of `batchnorm`, which governs every other
            batch norm, the pretrained path's always staying frozen. With
            `"frozen"` in a frozen-BatchNorm run both paths start as the
            same function and the gates get no gradient until the
            fine-tuned kernels have moved.
        gate_lr_multiplier: AdaFilter: the gate network's learning rate as
            a multiple of `learning_rate` (same schedule; applied inside the
            Adam or SGD update, see `optimizers.MultiplierAdam`). The gates'
            gradient is a difference of two nearly equal paths, so with the
            shared rate they hardly move in a short run. Default 10, chosen
            on validation (ELPV 15%, 6 seeds; x1 and x100 tie on balanced
            accuracy, x10 has the lowest validation cross-entropy).
        first_gate_input: AdaFilter: what the first gate reads,
            `"features"` (the pooled output of the first gated layer's
            frozen pretrained path) or `"input"` (its pooled input, for a
            grayscale image one brightness value).
        gate_input_norm: AdaFilter: standardise each gate's pooled input per
            channel over the batch (moving averages at inference) before the
            gate network reads it, so it sees how an image differs from the
            others [inferred: not in the paper].
        relevance_statistic: filter transfer: `"mean"` (mean post-activation
            response), `"frequency"` (fraction of positive responses) or
            `"kl"` (symmetric KL between the filter's response distributions
            on source and target data; uses `source`).
        transfer_ratio: filter transfer: fraction of each layer's filters
            transferred (the most relevant); the rest are re-initialised.
        reinit_next: filter transfer: also re-initialise the next layer's
            input slices of the re-initialised filters (the next layers'
            pretrained weights would otherwise read random channels).
        reinit_batchnorm: filter transfer, when the run's BatchNorm is
            frozen: what the BatchNorm channels of re-initialised filters do
            (`set_reinitialized_batchnorm`): `"channels"` trains them (batch
            statistics, moving statistics kept current, scale and offset
            learnt) while transferred channels keep their pretrained ones;
            `"layer"` trains every BatchNorm layer that has a re-initialised
            channel as a whole; `"frozen"` keeps them at scale 1, offset 0
            and the statistics estimated once on the target images (stale
            once the filters train; the behaviour before this option).
        prune_period: filter transfer: epochs between `RelevancePruning`
            rounds during fine-tuning; 0 disables the callback.
        prune_fraction: filter transfer: fraction of each layer's filters
            masked by the end of training (reached on a linear schedule).
        prune_action: filter transfer: `"mask"` or `"reinit"` the filters
            that fall below the threshold.
        blur_filt_size: antialias_ft / ktft: BlurPool filter size (1-7).
        blur_pad_type: antialias_ft / ktft: BlurPool padding
            (`"reflect"`, `"replicate"` or `"zero"`).
        blur_keep_stem: antialias_ft / ktft: leave the strided convolution
            that reads the input strided (Zhang's released models), instead
            of running it at full resolution before a blur.
        recalibrate_batchnorm: antialias_ft / ktft / compose="antialias":
            images on which the anti-aliased network's BatchNorm moving
            statistics are re-estimated right after the BlurPool layers go
            in (`models.recalibrate_batchnorm`; the blur changes every
            activation's variance after the first subsampling, so the copied
            statistics are wrong): `"target"` (the target training images:
            the default, lowest validation cross-entropy on ELPV at 15%, and
            needs no source data), `"source"` (the training split of
            `source`, when that is the data the backbone was pretrained on)
            or `"none"` (keep the copied statistics).
        recalibration_images: at most this many images are used for it.
        ktft_pixel_weight: ktft: weight of the pixel-level loss (mean squared
            difference of stage feature maps); 0 disables it.
        ktft_global_weight: ktft: weight of the global-level loss (on the
            globally pooled stage features); 0 disables it.
        ktft_logit_weight: ktft: weight of the teacher-to-student KL
            divergence on the class probabilities; 0 disables it.
        ktft_layers: ktft: comma-separated names of the stage outputs the
            losses compare; None picks the output of every downsampling
            stage.
        compose: comma-separated model transforms applied, in order, to the
            model (classifier, or the two-head model of the sjft methods)
            before the method's own: `"antialias"` (BlurPool anti-aliasing
            with `blur_filt_size` / `blur_pad_type`) and `"adafilter"`
            (gated filters with the `gate_*` fields). The methods compose:
            `method="sjft", compose="adafilter"` is selective joint
            fine-tuning of an AdaFilter backbone; `method="filter_transfer",
            compose="antialias"` transfers the filters of the anti-aliased
            network.
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
    batchnorm: str = None
    augment: str = "flip"
    class_weight: str = "none"
    l2sp_alpha: float = 0.1
    l2sp_beta: float = 0.01
    source: str = "fashion_mnist"
    index_dir: str = None
    index_bank: str = "conv"
    k0: int = 10
    k_max: int = 200
    max_level: int = 10
    growth_period: int = 2
    growth_mode: str = "epochs"
    joint_bn_stats: str = "mixture_exact"
    sigma0: float = 4.0
    sigma1: float = 2.0
    delta: float = None
    target_weight: float = 0.5
    source_weight: float = 0.5
    gated_layers: str = None
    gate_estimator: str = "ste"
    gate_temperature: float = 1.0
    gate_units: int = 32
    gate_usage_target: float = None
    gate_usage_weight: float = 0.1
    gated_batchnorm: str = "train"
    gate_lr_multiplier: float = 10.0
    first_gate_input: str = "features"
    gate_input_norm: bool = False
    relevance_statistic: str = "mean"
    transfer_ratio: float = 0.5
    reinit_next: bool = False
    reinit_batchnorm: str = "channels"
    prune_period: int = 0
    prune_fraction: float = 0.25
    prune_action: str = "mask"
    blur_filt_size: int = 4
    blur_pad_type: str = "reflect"
    blur_keep_stem: bool = False
    recalibrate_batchnorm: str = "target"
    recalibration_images: int = 2000
    ktft_pixel_weight: float = 1.0
    ktft_global_weight: float = 1.0
    ktft_logit_weight: float = 0.0
    ktft_layers: str = None
    compose: str = None
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
        _check_choice("batchnorm", self.batchnorm, (None, "frozen", "train"))
        _check_choice("index_bank", self.index_bank, INDEX_BANKS)
        _check_choice("growth_mode", self.growth_mode, GROWTH_MODES)
        _check_choice("joint_bn_stats", self.joint_bn_stats, JOINT_BN_STATS)
        if (
            isinstance(self.max_level, bool)
            or not isinstance(self.max_level, (int, np.integer))
            or self.max_level < 0
        ):
            raise ValueError(
                "`max_level` must be an int >= 0 (0: no cap). "
                f"Received: max_level={self.max_level!r}"
            )
        for name in ("k0", "k_max", "growth_period"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"`{name}` must be a positive int. Received: {name}={value!r}")
        if self.k0 > self.k_max:
            raise ValueError(f"`k0` ({self.k0}) must not exceed `k_max` ({self.k_max}).")
        if self.sigma0 < 0 or self.sigma1 < 0 or (self.delta is not None and self.delta < 0):
            raise ValueError(
                "`sigma0`, `sigma1` and `delta` must be >= 0. Received: "
                f"sigma0={self.sigma0}, sigma1={self.sigma1}, delta={self.delta}"
            )
        if self.target_weight <= 0 or self.source_weight < 0:
            raise ValueError(
                "`target_weight` must be > 0 and `source_weight` >= 0. Received: "
                f"target_weight={self.target_weight}, source_weight={self.source_weight}"
            )
        if self.method in JOINT_VARIANTS and self.batch_size % 2:
            raise ValueError(
                "The sjft methods need an even `batch_size` (half target, half source). "
                f"Received: batch_size={self.batch_size}"
            )
        _check_choice("class_weight", self.class_weight, ("none", "balanced"))
        _check_choice("gate_estimator", self.gate_estimator, GATE_ESTIMATORS)
        _check_choice("gated_batchnorm", self.gated_batchnorm, GATED_BATCHNORM_MODES)
        _check_choice("first_gate_input", self.first_gate_input, FIRST_GATE_INPUTS)
        if (
            isinstance(self.gate_lr_multiplier, bool)
            or not isinstance(self.gate_lr_multiplier, (int, float, np.integer, np.floating))
            or not self.gate_lr_multiplier > 0
        ):
            raise ValueError(
                "`gate_lr_multiplier` must be a number > 0. "
                f"Received: gate_lr_multiplier={self.gate_lr_multiplier!r}"
            )
        _check_choice("relevance_statistic", self.relevance_statistic, RELEVANCE_STATISTICS)
        _check_choice("prune_action", self.prune_action, PRUNE_ACTIONS)
        _check_choice("reinit_batchnorm", self.reinit_batchnorm, REINIT_BATCHNORM)
        _check_choice("blur_pad_type", self.blur_pad_type, BLUR_PAD_TYPES)
        _check_choice(
            "recalibrate_batchnorm", self.recalibrate_batchnorm, recipes.RECALIBRATION_DATA
        )
        for name, low, high in (
            ("gate_units", 1, None),
            ("recalibration_images", 1, None),
            ("prune_period", 0, None),
            ("blur_filt_size", 1, 7),
        ):
            value = getattr(self, name)
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, np.integer))
                or value < low
                or (high is not None and value > high)
            ):
                bound = f"in [{low}, {high}]" if high is not None else f">= {low}"
                raise ValueError(f"`{name}` must be an int {bound}. Received: {name}={value!r}")
        if self.gate_temperature <= 0:
            raise ValueError(
                f"`gate_temperature` must be > 0. Received: gate_temperature={self.gate_temperature}"
            )
        if self.gate_usage_target is not None and not 0.0 <= self.gate_usage_target <= 1.0:
            raise ValueError(
                "`gate_usage_target` must be in [0, 1] or None. "
                f"Received: gate_usage_target={self.gate_usage_target}"
            )
        if not 0.0 < float(self.transfer_ratio) <= 1.0:
            raise ValueError(
                f"`transfer_ratio` must be in (0, 1]. Received: transfer_ratio={self.transfer_ratio}"
            )
        if not 0.0 <= float(self.prune_fraction) < 1.0:
            raise ValueError(
                f"`prune_fraction` must be in [0, 1). Received: prune_fraction={self.prune_fraction}"
            )
        for name in (
            "gate_usage_weight",
            "ktft_pixel_weight",
            "ktft_global_weight",
            "ktft_logit_weight",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"`{name}` must be >= 0. Received: {name}={getattr(self, name)}")
        recipes.check_compose(self.method, self.compose)
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
            self.output_dir = os.path.join(
                "runs", "finetune", f"{self.method}-{_slug(self.target)}-{amount}-seed{self.seed}"
            )
        if self.index_dir is None:
            self.index_dir = os.path.join(
                "runs", "index", f"{_slug(self.source)}-{_slug(self.target)}-{self.index_bank}"
            )

    @property
    def is_joint(self):
        """Whether the method is one of the selective joint fine-tuning ones."""
        return self.method in JOINT_VARIANTS

    @property
    def sampling_cap(self):
        """The sampler's `max_level`: None when `max_level` is 0 (no cap)."""
        return self.max_level or None

    @property
    def batchnorm_mode(self):
        """The BatchNorm mode this run uses (see `batchnorm`)."""
        if self.from_scratch:
            return "train"
        if self.batchnorm is not None:
            return self.batchnorm
        return "train" if self.is_joint else "frozen"


def _slug(spec):
    return spec.replace(":", "_").replace(os.sep, "_").strip("_")


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


def _metrics():
    # The plain cross-entropy, reported beside `loss` (which also holds any
    # weight penalties) so early stopping can monitor it.
    return [
        "accuracy",
        keras.metrics.SparseCategoricalCrossentropy(name="crossentropy"),
    ]


def _learning_rate_schedule(config, steps_per_epoch):
    """Cosine decay over the run, or one cosine cycle per growth round."""
    if getattr(config, "method", None) == "sjft" and config.growth_mode == "rounds":
        # One cosine cycle per growth round: each round starts again from the
        # initial learning rate, as each of the authors' rounds is a new run.
        schedule = keras.optimizers.schedules.CosineDecayRestarts(
            config.learning_rate,
            first_decay_steps=max(1, config.growth_period * steps_per_epoch),
            t_mul=1.0,
            m_mul=1.0,
        )
    else:
        schedule = keras.optimizers.schedules.CosineDecay(
            config.learning_rate, decay_steps=max(1, config.epochs * steps_per_epoch)
        )
    return schedule


def _make_optimizer(config, steps_per_epoch, lr_multipliers=None):
    schedule = _learning_rate_schedule(config, steps_per_epoch)
    kwargs = {"weight_decay": config.weight_decay or None}
    if config.optimizer == "sgd":
        kwargs["momentum"] = 0.9
    return make_optimizer(config.optimizer, schedule, lr_multipliers=lr_multipliers, **kwargs)


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


def _fit(
    model,
    train_ds,
    val_ds,
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

    `train_ds` is a dataset, or a function from the number of epochs already
    finished (nonzero when resuming) to the dataset to train on from there.

    `callbacks` run after early stopping and before the checkpoint (so the
    checkpoint saves the state they leave at the end of an epoch) and
    TensorBoard (so it logs what they add to the logs). A
    `ValidationCollapseMonitor` on the `accuracy` metric warns when
    validation accuracy falls while training accuracy rises; the returned
    `validation_collapse` lists the flagged epochs.

    The chief writes `config.json` here, once everything before training has
    succeeded.
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
        state_variables=state_variables,
    )
    initial_epoch = checkpoint.restore(model)
    if is_chief:
        # Written only now that data, model and method are set up: a rerun
        # that fails on bad input leaves the record of the run whose model
        # and report are in the directory.
        atomic_write_text(
            os.path.join(run_dir, "config.json"),
            json.dumps(dataclasses.asdict(config), indent=2, sort_keys=True) + "\n",
        )
    if initial_epoch and config.verbose:
        print(f"Resuming from the checkpoint after epoch {initial_epoch}.")
    if callable(train_ds):
        # A pipeline that starts where the interrupted run stopped.
        train_ds = train_ds(initial_epoch)
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
            train_ds,
            epochs=config.epochs,
            initial_epoch=initial_epoch,
            steps_per_epoch=steps,
            validation_data=val_ds,
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


def _fit_classifier(
    model,
    strategy,
    train,
    val,
    config,
    run_dir,
    is_chief,
    class_weight=None,
    callbacks=(),
    state_variables=None,
):
    """`_fit` on plain single-task pipelines of `train` and `val`."""
    channels = int(model.inputs[0].shape[-1])
    steps = data_lib.steps_per_epoch(len(train), config.batch_size)

    def train_ds(initial_epoch):
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
        )

    val_ds = data_lib.make_dataset(val, config.image_size, config.batch_size, channels=channels)
    return _fit(
        model,
        train_ds,
        val_ds,
        config,
        run_dir,
        is_chief,
        steps=steps,
        class_weight=class_weight,
        callbacks=callbacks,
        state_variables=state_variables or None,
    )


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


def finetune_split(config):
    """The images a fine-tuning run uses, chosen exactly as `finetune` does.

    Returns:
        `(train_full, test, train_ids, val_ids)`: the target's whole training
        split, its test split, and the positions in `train_full` of the
        images trained on and of those kept for validation.
    """
    train_full, test = load_train_test(
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


def _load_backbone(config, data_channels):
    """The backbone of `config` (call inside the strategy scope)."""
    shape_channels = config.channels
    if shape_channels is None and not backbones.is_backbone_path(config.backbone):
        if backbones.is_builtin_backbone(config.backbone):
            shape_channels = data_channels
    input_shape = (config.image_size, config.image_size, shape_channels)
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
    return backbone


def _prepare_model(config, strategy, num_classes, data_channels, train):
    """Builds the classifier for `config.method` inside the strategy scope
    (`train`: the target training images, for BatchNorm recalibration)."""
    with strategy.scope():
        backbone = _load_backbone(config, data_channels)
        model = build_classifier(backbone, num_classes, dropout=config.dropout)
        set_batchnorm_mode(model, config.batchnorm_mode)
        model = recipes.compose(
            config,
            model,
            recipes.recalibration_dataset(config, train, int(model.inputs[0].shape[-1])),
        )
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

    The sjft methods (selective joint fine-tuning, Ge & Yu, CVPR 2017) train
    a two-head model on batches of half target images and half source
    images drawn from each target image's nearest source images
    (`config.index_dir`, built there when missing), growing the neighbour
    lists of hard target images (method `sjft`); `model.keras` and the
    SavedModel hold the backbone with the target head only, and
    `multitask.keras` the model with both heads.

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
    # The strategy comes first: a multi-worker strategy configures
    # TensorFlow's collective ops, which must happen before anything starts
    # the runtime (the sjft selection creates variables).
    strategy = distribute.get_strategy(config.strategy)
    train_full, test, train_ids, val_ids = finetune_split(config)
    train, val = train_full.subset(train_ids), train_full.subset(val_ids)
    joint = _load_joint_selection(config, train_ids) if config.is_joint else None
    # Building a missing index draws random numbers; seeding again makes the
    # model's initialisation the same whether or not this run built it.
    keras.utils.set_random_seed(config.seed)

    is_chief = distribute.is_chief()
    run_dir = config.output_dir
    os.makedirs(run_dir, exist_ok=True)
    class_weight = None
    if config.class_weight == "balanced":
        present = np.unique(train.labels)
        weights = compute_class_weight("balanced", classes=present, y=train.labels)
        class_weight = {int(c): float(w) for c, w in zip(present, weights)}

    extra = {}
    with dtype_policy(config.precision):
        if joint is None:
            model = _prepare_model(
                config, strategy, train_full.num_classes, train_full.channels, train
            )
            steps = data_lib.steps_per_epoch(len(train), config.batch_size)
            context = recipes.RecipeContext(
                strategy=strategy,
                train=train,
                val=val,
                run_dir=run_dir,
                is_chief=is_chief,
                steps_per_epoch=steps,
                channels=int(model.inputs[0].shape[-1]),
                # The methods that anti-alias in their recipe (compose did it above otherwise).
                recalibration=(
                    recipes.recalibration_dataset(config, train, int(model.inputs[0].shape[-1]))
                    if config.method in recipes.COMPOSABLE["antialias"]
                    else None
                ),
            )
            method = recipes.setup(config, model, context)
            with strategy.scope():
                compile_kwargs = {
                    "loss": "sparse_categorical_crossentropy",
                    "metrics": _metrics(),
                    **method.compile_kwargs,
                }
                method.model.compile(
                    optimizer=_make_optimizer(config, steps, method.lr_multipliers),
                    **compile_kwargs,
                )
            fit_info = _fit_classifier(
                method.model,
                strategy,
                train,
                val,
                config,
                run_dir,
                is_chief,
                class_weight,
                callbacks=method.callbacks,
                state_variables=method.state_variables,
            )
            if method.report is not None:
                extra = method.report()
            classifier = joint_model = method.classifier
            export_model = method.export_model
        else:
            joint_model, fit_info, extra = _finetune_joint(
                config, strategy, joint, train, val, train_full, run_dir, is_chief, class_weight
            )
            classifier = export_model = target_model(
                joint_model, name=f"{joint_model.name}_target"
            )

    report = _evaluate(
        classifier,
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
            **extra,
            "strategy": distribute.describe_strategy(strategy),
            "seconds": round(time.time() - start, 1),
            "environment": run_environment(),
        },
    )
    outputs = {"report": report, "output_dir": os.path.abspath(run_dir)}
    if not is_chief:
        return outputs
    outputs["model"] = os.path.join(run_dir, "model.keras")
    save_model_atomic(classifier, outputs["model"])
    if joint is not None:
        outputs["multitask_model"] = os.path.join(run_dir, "multitask.keras")
        save_model_atomic(joint_model, outputs["multitask_model"])
    if config.export:
        outputs["saved_model"] = export_saved_model(
            export_model, os.path.join(run_dir, "saved_model"), class_names=test.class_names
        )
    outputs["report_json"], outputs["report_md"] = evaluation.write_report(
        report, run_dir, title=f"Fine-tuning report: {config.method} on {config.target}"
    )
    return outputs


def _index_config(config):
    """The retrieval run an sjft run uses when it builds its own index."""
    from keras_seltransfer.retrieval.workflow import IndexConfig

    return IndexConfig(
        source=config.source,
        target=config.target,
        # The whole training split: one index serves every fraction and seed.
        target_fraction=1.0,
        seed=0,
        test_fraction=config.test_fraction,
        split_seed=config.split_seed,
        bank=config.index_bank,
        backbone=config.backbone if config.index_bank == "conv" else None,
        k_max=config.k_max,
        image_size=config.image_size,
        output_dir=config.index_dir,
        progress=config.verbose > 0,
    )


def load_neighbours(config, train_ids):
    """Neighbour lists of the target training images of an sjft run.

    Reads `<config.index_dir>/neighbours.npz`, building the index there first
    when it is missing, checks that it was built for this run's target and
    source (same data sets and held-out split), and returns the rows of the
    images in `train_ids` (positions in the target's training split).

    Returns:
        `(neighbour_ids, index_config)`: `[len(train_ids), k]` source
        positions sorted nearest first, and the index's `IndexConfig`.
    """
    from keras_seltransfer.retrieval import workflow

    path = os.path.join(config.index_dir, "neighbours.npz")
    if not os.path.isfile(path):
        if config.index_bank == "conv" and not (
            backbones.is_backbone_path(config.backbone) and os.path.isfile(config.backbone)
        ):
            raise ValueError(
                f"No index at {path}, and the conv filter bank needs a saved backbone "
                f"(.keras file); received backbone={config.backbone!r}. Build one with "
                "`python -m apps.build_index`, pass --index_dir, or use --index_bank=gabor."
            )
        if config.verbose:
            print(f"No neighbour index at {path}; building it (see apps.build_index).")
        workflow.build_neighbours(_index_config(config))
    target_ids, neighbour_ids, index_config = workflow.read_neighbours(path)
    for name in ("target", "source", "test_fraction", "split_seed"):
        if getattr(index_config, name) != getattr(config, name):
            raise ValueError(
                f"The index in {config.index_dir} was built with {name}="
                f"{getattr(index_config, name)!r}, but this run has {name}="
                f"{getattr(config, name)!r}; pass another --index_dir."
            )
    rows = {int(t): i for i, t in enumerate(target_ids)}
    missing = [int(t) for t in train_ids if int(t) not in rows]
    if missing:
        raise ValueError(
            f"The index in {config.index_dir} has no neighbours for {len(missing)} of the "
            f"{len(train_ids)} training images (it was built for another fraction or seed); "
            "build it with --target_fraction=1, which covers every run."
        )
    if neighbour_ids.shape[1] < config.k0:
        raise ValueError(
            f"The index in {config.index_dir} keeps {neighbour_ids.shape[1]} neighbours per "
            f"target, fewer than k0={config.k0}."
        )
    return neighbour_ids[[rows[int(t)] for t in train_ids]], index_config


def _load_joint_selection(config, train_ids):
    """The sampler and source set of an sjft run."""
    from keras_seltransfer.retrieval.workflow import source_training_images

    neighbour_ids, index_config = load_neighbours(config, train_ids)
    source = source_training_images(index_config)
    sampler = data_lib.make_sampler(
        JOINT_VARIANTS[config.method],
        neighbour_ids,
        source.labels,
        k0=config.k0,
        k_max=config.k_max,
        seed=config.seed,
        max_level=config.sampling_cap if JOINT_VARIANTS[config.method].startswith("selected") else None,
    )
    return {"sampler": sampler, "source": source}


def _finetune_joint(config, strategy, joint, train, val, train_full, run_dir, is_chief, class_weight):
    """Selective joint fine-tuning: builds, compiles and trains the two-head model."""
    sampler, source = joint["sampler"], joint["source"]
    with strategy.scope():
        backbone = _load_backbone(config, train_full.channels)
        model = build_multitask_model(
            backbone,
            sampler.num_source_classes,
            train_full.num_classes,
            dropout=config.dropout,
        )
        set_batchnorm_mode(model, config.batchnorm_mode)
        model = recipes.compose(
            config,
            model,
            recipes.recalibration_dataset(config, train, int(model.inputs[0].shape[-1])),
        )
    channels = int(model.inputs[0].shape[-1])
    target_images = data_lib.prepared_images(train, config.image_size, channels)
    train_ds = data_lib.make_joint_dataset(
        train,
        source,
        sampler,
        config.image_size,
        config.batch_size,
        strategy=strategy,
        channels=channels,
        augment=config.augment,
        target_class_weight=class_weight,
        target_images=target_images,
    )
    val_ds = data_lib.joint_validation_dataset(
        val, config.image_size, config.batch_size, channels=channels
    )
    steps = data_lib.joint_steps_per_epoch(len(train), config.batch_size)
    with strategy.scope():
        model.compile(
            optimizer=_make_optimizer(config, steps, recipes.lr_multipliers(config, model)),
            **joint_compile_args(config.target_weight, config.source_weight),
        )
    callbacks = [sampler]
    # Training normalises every batch with its own statistics; only the
    # moving statistics served in inference mode depend on this choice.
    bn_stats = "frozen" if config.batchnorm_mode == "frozen" else config.joint_bn_stats
    if bn_stats == "target":
        callbacks.append(BatchNormRecalibration(target_images, batch_size=config.batch_size))
    elif bn_stats == "mixture_exact":
        # A plain (undistributed) copy of the training pipeline: it draws
        # the batches of the epoch the sampler callback has set.
        mixed = data_lib.make_joint_dataset(
            train,
            source,
            sampler,
            config.image_size,
            config.batch_size,
            channels=channels,
            augment=config.augment,
            target_images=target_images,
        )
        callbacks.append(BatchNormRecalibration(mixed))
    growth = None
    if config.method == "sjft":
        growth = AdaptiveNeighbourGrowth(
            sampler,
            target_images,
            train.labels,
            period=config.growth_period,
            sigma0=config.sigma0,
            sigma1=config.sigma1,
            delta=config.delta,
            log_dir=(
                os.path.join(run_dir, "logs", "growth")
                if config.tensorboard and is_chief
                else None
            ),
            draws_per_epoch=steps * (config.batch_size // 2),
        )
        callbacks.append(growth)
    fit_info = _fit(
        model,
        train_ds,
        val_ds,
        config,
        run_dir,
        is_chief,
        monitor="val_target_crossentropy",
        accuracy="target_accuracy",
        callbacks=callbacks,
        state_variables=sampler.state_variables(),
    )
    extra = {
        "source": config.source,
        "index_dir": config.index_dir,
        "sampling": JOINT_VARIANTS[config.method],
        "source_candidates": int(len(sampler.candidate_ids)),
        "source_classes": [source.class_names[c] for c in sampler.source_classes],
        "steps_per_epoch": steps,
        "batchnorm_statistics": bn_stats,
    }
    if sampler.uses_neighbours:
        counts = sampler.get_neighbour_counts()
        extra["neighbour_counts"] = {
            "k0": sampler.k0,
            "k_cap": sampler.k_max,
            "max_level": sampler.max_level,
            "mean": float(counts.mean()),
            "max": int(counts.max()),
            "grown": int((counts > sampler.k0).sum()),
        }
        # How often each target image is drawn per epoch: at the end, and in
        # the epoch where one image was drawn the most (growth runs only).
        draws = sampler.repetition_counts(
            steps * (config.batch_size // 2), epoch=fit_info["epochs_run"]
        )
        extra["repetition"] = {
            "final_max_draws": int(draws.max()),
            "final_histogram": np.bincount(draws).tolist(),
        }
        if growth is not None and growth.max_draws:
            extra["repetition"]["max_draws_per_epoch"] = max(growth.max_draws)
            extra["repetition"]["worst_histogram"] = growth.worst_histogram
    return model, fit_info, extra


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
    strategy = distribute.get_strategy(config.strategy)  # first: see `finetune`
    train_full, test = load_train_test(
        config.source, config.test_fraction, config.split_seed, channels=config.channels
    )
    if config.fraction < 1.0:
        train_full = train_full.subset(
            data_lib.low_data_subset(train_full.labels, fraction=config.fraction, seed=config.seed)
        )
    train, val = _split_train_val(train_full, config.val_fraction, config.seed)
    is_chief = distribute.is_chief()
    run_dir = config.output_dir
    os.makedirs(run_dir, exist_ok=True)
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
        fit_info = _fit_classifier(model, strategy, train, val, config, run_dir, is_chief)
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
    "JOINT_VARIANTS",
    "METHODS",
    "RECIPE_METHODS",
    "PretrainConfig",
    "finetune",
    "finetune_split",
    "load_neighbours",
    "load_train_test",
    "pretrain",
]
