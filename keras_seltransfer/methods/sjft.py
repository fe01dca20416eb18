"""Selective joint fine-tuning (Ge & Yu, CVPR 2017) and its ablations.

`--method=sjft` trains one backbone with two heads on batches of half target
images and half source images, each source image a random neighbour (by
low-level filter-bank statistics, `keras_seltransfer.retrieval`) of one of
the batch's target images; the neighbour lists of hard target images grow
as training goes (`AdaptiveNeighbourGrowth`). The ablations of the paper:
`sjft_nogrowth` (no growth), `sjft_all` (all source images drawn
uniformly), `sjft_random` (as many random source images as sjft selects);
with `--from_scratch`, selective joint training from scratch.

The neighbours come from `index_dir` (`apps.build_index`), built there when
missing, with a conv bank tapping the backbone the run fine-tunes (a `.keras`
file or any name `models.load_backbone` takes). `model.keras` and the SavedModel hold the backbone with the target
head only, `multitask.keras` the model with both heads.
"""

import dataclasses
import os
import warnings

import keras
import numpy as np

from keras_seltransfer import data as data_lib
from keras_seltransfer.callbacks import AdaptiveNeighbourGrowth
from keras_seltransfer.callbacks import BatchNormRecalibration
from keras_seltransfer.methods.base import Method
from keras_seltransfer.methods.base import MethodSetup
from keras_seltransfer.methods.registry import get
from keras_seltransfer.utils.options import option
from keras_seltransfer.methods.registry import register
from keras_seltransfer.models import backbones
from keras_seltransfer.models.multitask import build_multitask_model
from keras_seltransfer.models.multitask import joint_compile_args
from keras_seltransfer.models.multitask import target_model
from keras_seltransfer.retrieval import workflow
from keras_seltransfer.retrieval.filter_banks import BANKS
from keras_seltransfer.retrieval.run_record import conv_bank_key
from keras_seltransfer.retrieval.similarity import AUTO_FAST_MIN_SOURCES
from keras_seltransfer.retrieval.similarity import resolve_search_mode
from keras_seltransfer.retrieval.similarity import SEARCH_MODES
from keras_seltransfer.utils.io import load_npz
from keras_seltransfer.utils.naming import spec_slug

INDEX_BANKS = BANKS
# Which BatchNorm statistics an sjft model with trained BatchNorm validates
# and serves with (see `SJFTOptions.joint_bn_stats`).
JOINT_BN_STATS = ("target", "mixture_exact", "mixture")
# When neighbour lists grow (see `SJFTOptions.growth_mode`).
GROWTH_MODES = ("epochs", "rounds")
# How many optimizer steps a joint epoch has (see `SJFTOptions.joint_steps`).
JOINT_STEPS = ("cover_targets", "single_task")


@dataclasses.dataclass
class SJFTOptions:
    """Options of the selective joint fine-tuning methods."""

    index_dir: str = option(
        None,
        "sjft: directory of a retrieval run (apps.build_index) whose neighbours.npz lists "
        "each target training image's nearest source images; built there when missing (with "
        "target fraction 1, which serves every fraction and seed). Default: "
        "runs/index/<source>-<target>-gabor, or runs/index/<source>-<target>-conv-<network> "
        "with <network> naming --backbone, --backbone_weights and --image_size (another "
        "network gets another index).",
    )
    index_bank: str = option(
        "conv",
        "sjft: filter bank used when the index is built: conv (the first two conv layers of "
        "the network the run fine-tunes: --backbone with --backbone_weights, a .keras file or "
        "a name) or gabor.",
        choices=INDEX_BANKS,
    )
    index_search_mode: str = option(
        "auto",
        "sjft: how the index is searched when it is built (apps.build_index --search_mode): "
        "exact, fast (float32 GEMM with exact re-scoring of the nearest survivors; may miss "
        "a rare neighbour) or auto (fast from "
        f"{AUTO_FAST_MIN_SOURCES:,} source images). An index searched in another mode is "
        "refused; the default index directory of fast ends in -fast.",
        choices=SEARCH_MODES,
    )
    k0: int = option(10, "sjft: initial neighbours per target image.", lower=1)
    k_max: int = option(
        200,
        "sjft: neighbours kept per target when building the index; lists grow to at most "
        "min(k_max, max_level*k0).",
        lower=1,
    )
    max_level: int = option(
        10,
        "sjft: highest sampling level, the authors' highest_sample_level (10 in their released "
        "prototxt): lists grow to at most max_level*k0 neighbours and no target image is drawn "
        "more than max_level times per epoch. 0: no cap (lists grow to k_max, and one hard "
        "image could take 18 of an epoch's 240 target draws on ELPV at 15%).",
        lower=0,
    )
    target_draws: str = option(
        "neighbours",
        "sjft: how an epoch's target draws are shared: neighbours draws each target image in "
        "proportion to its list length K_i (a hard image whose list grew is repeated, up to "
        "max_level times per epoch); uniform draws every target image equally while the lists "
        "still grow (the control that separates growth from repetition).",
        choices=data_lib.TARGET_DRAWS,
    )
    joint_steps: str = option(
        "cover_targets",
        "sjft: optimizer steps per joint epoch: cover_targets has ceil(N / (batch/2)) steps, "
        "enough half-batches to draw every target image once (twice the steps of a "
        "single-task epoch); single_task has ceil(N / batch) steps, the same number as "
        "fine-tuning, for comparisons at equal optimizer steps.",
        choices=JOINT_STEPS,
    )
    growth_period: int = option(2, "sjft: epochs per neighbour-growth round.", lower=1)
    growth_mode: str = option(
        "epochs",
        "sjft: epochs grows the lists every growth_period epochs under one learning-rate "
        "schedule; rounds makes every growth_period epochs a round with its own (restarted) "
        "cosine schedule and grows the lists between rounds, as the authors train each round "
        "as a separate run (rounds had a higher validation cross-entropy on ELPV, level on "
        "digits).",
        choices=GROWTH_MODES,
    )
    joint_bn_stats: str = option(
        "mixture_exact",
        "sjft with BatchNorm trained: the statistics the model validates and serves with. "
        "target: re-estimated on the target training images (unaugmented) before every "
        "validation and after training; mixture_exact: re-estimated then on the epoch's mixed "
        "source/target training batches (the statistics training normalised with, exact "
        "instead of moving averages that lag the weights); mixture: the moving averages of the "
        "mixed batches (collapses on targets unlike the source). Training is the same either "
        "way. Default mixture_exact: the lowest validation cross-entropy on ELPV and on "
        "digits (15%, 3 seeds).",
        choices=JOINT_BN_STATS,
    )
    sigma0: float = option(
        4.0, "sjft: growth of misclassified images, in units of k0.", lower=0.0
    )
    sigma1: float = option(
        2.0, "sjft: growth of correct but uncertain images, in units of k0.", lower=0.0
    )
    delta: float = option(
        None,
        "sjft: entropy (nats) from which a correct prediction counts as uncertain. Unset: half "
        "the maximum entropy, ln(classes)/2.",
        type=float, lower=0.0,
    )
    target_weight: float = option(
        0.5, "sjft: weight of the target cross-entropy in the joint loss.", above=0.0
    )
    source_weight: float = option(
        0.5, "sjft: weight of the source cross-entropy in the joint loss.", lower=0.0
    )

    @staticmethod
    def validate(config):
        """Checks across options, and the default `index_dir`."""
        if config.k0 > config.k_max:
            raise ValueError(f"`k0` ({config.k0}) must not exceed `k_max` ({config.k_max}).")
        if config.is_joint and config.batch_size % 2:
            raise ValueError(
                "The sjft methods need an even `batch_size` (half target, half source). "
                f"Received: batch_size={config.batch_size}"
            )
        if config.index_dir is None:
            bank = config.index_bank
            if bank == "conv":
                bank += "-" + conv_bank_key(
                    config.backbone, config.backbone_weights, config.image_size
                )
            # Auto and exact share a directory: they agree below the auto
            # threshold, and `load_neighbours` refuses a mismatch above it.
            suffix = "-fast" if config.index_search_mode == "fast" else ""
            config.index_dir = os.path.join(
                "runs",
                "index",
                f"{spec_slug(config.source)}-{spec_slug(config.target)}-{bank}{suffix}",
            )


def index_config(config, data_channels=None):
    """The retrieval run an sjft run uses when it builds its own index.

    Its conv bank taps the network the run fine-tunes, as pretrained: the
    same `backbone`, `backbone_weights` and `image_size` (before any
    `from_scratch` re-initialisation), loaded in memory; a built-in backbone
    takes `config.channels`, or `data_channels` when unset, as the run's does.
    """
    conv = config.index_bank == "conv"
    channels = config.channels
    if channels is None and conv and backbones.is_builtin_backbone(config.backbone):
        channels = data_channels
    return workflow.IndexConfig(
        source=config.source,
        target=config.target,
        # The whole training split: one index serves every fraction and seed.
        target_fraction=1.0,
        seed=0,
        test_fraction=config.test_fraction,
        split_seed=config.split_seed,
        bank=config.index_bank,
        backbone=config.backbone if conv else None,
        backbone_weights=config.backbone_weights if conv else None,
        channels=channels,
        k_max=config.k_max,
        search_mode=config.index_search_mode,
        image_size=config.image_size,
        output_dir=config.index_dir,
        progress=config.verbose > 0,
        force=config.force,
    )


def load_neighbours(config, train_ids, data_channels=None):
    """Neighbour lists of the target training images of an sjft run.

    Reads `<config.index_dir>/neighbours.npz`, building the index there first
    when it is missing (`index_config`), checks that it was built for this
    run's target and source (same data sets and held-out split), warns when
    its conv bank tapped another network than the run's, and returns the
    rows of the images in `train_ids` (positions in the target's training
    split). `data_channels` are the target images' channels (see
    `index_config`). Runs that share an index directory and find it
    missing build it once: the first holds the index's lock, the others
    wait for it and then read what it built.

    Returns:
        `(neighbour_ids, index_config)`: `[len(train_ids), k]` source
        positions sorted nearest first, and the index's `IndexConfig`.
    """
    path = os.path.join(config.index_dir, "neighbours.npz")
    if not os.path.isfile(path):
        if config.verbose:
            print(f"No neighbour index at {path}; building it (see apps.build_index).")
        workflow.build_neighbours(index_config(config, data_channels), wait=True)
    target_ids, neighbour_ids, built = workflow.read_neighbours(path)
    if config.index_bank == "conv" and built.bank == "conv":
        network = conv_bank_key(config.backbone, config.backbone_weights, config.image_size)
        if conv_bank_key(built.backbone, built.backbone_weights, built.image_size) != network:
            warnings.warn(
                f"The conv bank of the index in {config.index_dir} tapped backbone="
                f"{built.backbone!r} (weights {built.backbone_weights!r}, image_size="
                f"{built.image_size}), not this run's backbone={config.backbone!r} (weights "
                f"{config.backbone_weights!r}, image_size={config.image_size}): its neighbours "
                "were chosen by another network's filters. Leave --index_dir unset for an index "
                "of this network.",
                stacklevel=2,
            )
    for name in ("target", "source", "test_fraction", "split_seed"):
        if getattr(built, name) != getattr(config, name):
            raise ValueError(
                f"The index in {config.index_dir} was built with {name}="
                f"{getattr(built, name)!r}, but this run has {name}="
                f"{getattr(config, name)!r}; pass another --index_dir."
            )
    expected_mode = config.index_search_mode
    if expected_mode == "auto":
        expected_mode = resolve_search_mode(expected_mode, _num_sources(path, built))
    if built.search_mode != expected_mode:
        raise ValueError(
            f"The index in {config.index_dir} was searched in search_mode="
            f"{built.search_mode!r}, but this run has index_search_mode="
            f"{config.index_search_mode!r} ({expected_mode} for this source); pass "
            f"--index_search_mode={built.search_mode} or another --index_dir."
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
    return neighbour_ids[[rows[int(t)] for t in train_ids]], built


def _num_sources(path, built):
    """Source images searched by the index `path` (built with `built`)."""
    stored = load_npz(path, what="neighbour index")
    if "num_sources" in stored:
        return int(stored["num_sources"])
    # Indexes written before the count was kept: count the source.
    return len(workflow.source_training_images(built))


def rounds_schedule(config, steps_per_epoch):
    """One cosine cycle per growth round: each round starts again from the
    initial learning rate, as each of the authors' rounds is a new run."""
    return keras.optimizers.schedules.CosineDecayRestarts(
        config.learning_rate,
        first_decay_steps=max(1, config.growth_period * steps_per_epoch),
        t_mul=1.0,
        m_mul=1.0,
    )


def schedule_for(config):
    """The learning-rate schedule maker of an sjft run: `rounds_schedule`
    with `growth_mode="rounds"` (method sjft), else None (the training
    loop's cosine decay over the run)."""
    if config.method == "sjft" and config.growth_mode == "rounds":
        return rounds_schedule
    return None


# The samplings whose target images have neighbour lists.
NEIGHBOUR_SAMPLINGS = ("selected", "selected_nogrowth", "random_neighbours")


def joint_steps(config, num_targets):
    """Optimizer steps of one joint epoch under `config.joint_steps`.

    Args:
        config: a `FinetuneConfig` of a joint method.
        num_targets: target training images.

    Returns:
        `ceil(num_targets / (batch_size / 2))` for `"cover_targets"`,
        `ceil(num_targets / batch_size)` for `"single_task"`.

    Example:

    >>> config = FinetuneConfig(method="sjft", batch_size=32, joint_steps="single_task")
    >>> joint_steps(config, 236)
    8
    """
    if config.joint_steps == "single_task":
        return data_lib.steps_per_epoch(num_targets, config.batch_size)
    return data_lib.joint_steps_per_epoch(num_targets, config.batch_size)


class JointFinetuning(Method):
    """Joint fine-tuning on the target and a (selected) source sample."""

    options = (SJFTOptions,)
    default_batchnorm = "train"
    joint = True

    def __init__(self, name, sampling, summary, order, grows=False):
        self.name = name
        self.sampling = sampling
        self.summary = summary
        self.order = order
        self.grows = grows

    def prepare(self, config, context):
        """Reads (or builds) the neighbour index and makes the sampler."""
        neighbour_ids, built = load_neighbours(
            config, context.state["train_ids"], context.data_channels
        )
        source = workflow.source_training_images(built)
        capped = self.sampling in NEIGHBOUR_SAMPLINGS and config.max_level
        context.state["source"] = source
        context.state["sampler"] = data_lib.make_sampler(
            self.sampling,
            neighbour_ids,
            source.labels,
            k0=config.k0,
            k_max=config.k_max,
            seed=config.seed,
            max_level=config.max_level if capped else None,
            target_draws=config.target_draws,
        )

    def build_model(self, config, context):
        """The two-head model: the backbone, a source head and a target head."""
        return build_multitask_model(
            context.load_backbone(),
            context.state["sampler"].num_source_classes,
            context.num_classes,
            dropout=config.dropout,
        )

    def setup(self, config, model, context):
        """Joint pipelines, the sampler and growth callbacks, both heads'
        losses; the report gains the sampling, neighbour counts and how
        often target images were drawn."""
        sampler, source, train = context.state["sampler"], context.state["source"], context.train
        channels = int(model.inputs[0].shape[-1])
        target_images = data_lib.prepared_images(train, config.image_size, channels)
        joint_data = dict(
            channels=channels, augment=config.augment, target_images=target_images
        )
        train_ds = data_lib.make_joint_dataset(
            train, source, sampler, config.image_size, config.batch_size,
            strategy=context.strategy, target_class_weight=context.class_weight, **joint_data,
        )
        val_ds = data_lib.joint_validation_dataset(
            context.val, config.image_size, config.batch_size, channels=channels
        )
        steps = joint_steps(config, len(train))
        callbacks = [sampler]
        # Training normalises every batch with its own statistics; only the
        # moving statistics served in inference mode depend on this choice.
        bn_stats = "frozen" if config.batchnorm_mode == "frozen" else config.joint_bn_stats
        if bn_stats == "target":
            callbacks.append(BatchNormRecalibration(target_images, batch_size=config.batch_size))
        elif bn_stats == "mixture_exact":
            # A plain (undistributed) copy of the training pipeline: it draws
            # the batches of the epoch the sampler callback has set.
            callbacks.append(BatchNormRecalibration(data_lib.make_joint_dataset(
                train, source, sampler, config.image_size, config.batch_size, **joint_data
            )))
        growth = None
        if self.grows:
            growth = AdaptiveNeighbourGrowth(
                sampler,
                target_images,
                train.labels,
                period=config.growth_period,
                sigma0=config.sigma0,
                sigma1=config.sigma1,
                delta=config.delta,
                log_dir=(
                    os.path.join(context.run_dir, "logs", "growth")
                    if config.tensorboard and context.is_chief
                    else None
                ),
                draws_per_epoch=steps * (config.batch_size // 2),
            )
            callbacks.append(growth)

        def report(fit_info):
            extra = {
                "source": config.source,
                "index_dir": config.index_dir,
                "sampling": self.sampling,
                "source_candidates": int(len(sampler.candidate_ids)),
                "source_classes": [source.class_names[c] for c in sampler.source_classes],
                "steps_per_epoch": steps,
                "batchnorm_statistics": bn_stats,
            }
            if sampler.uses_neighbours:
                extra.update(_neighbour_report(sampler, growth, steps, config, fit_info))
            return extra

        # The metrics' variables must be the strategy's, so every replica
        # and worker adds to the same totals; made outside its scope they
        # count only this worker's examples (a different target_accuracy on
        # each worker).
        with context.strategy.scope():
            compile_kwargs = joint_compile_args(config.target_weight, config.source_weight)
        return MethodSetup(
            model=model,
            classifier=target_model(model, name=f"{model.name}_target"),
            callbacks=callbacks,
            state_variables=sampler.state_variables(),
            compile_kwargs=compile_kwargs,
            # The joint pipeline ends after each epoch (its length follows
            # the neighbour counts), so `fit` runs every epoch to its end.
            train_data=lambda initial_epoch: train_ds,
            epoch_dataset=True,
            val_data=val_ds,
            steps_per_epoch=steps,
            monitor="val_target_crossentropy",
            accuracy="target_accuracy",
            learning_rate_schedule=schedule_for(config),
            saved_models={"multitask.keras": model},
            report=report,
        )


def _neighbour_report(sampler, growth, steps, config, fit_info):
    counts = sampler.get_neighbour_counts()
    extra = {
        "neighbour_counts": {
            "k0": sampler.k0,
            "k_cap": sampler.k_max,
            "max_level": sampler.max_level,
            "mean": float(counts.mean()),
            "max": int(counts.max()),
            "grown": int((counts > sampler.k0).sum()),
        }
    }
    # How often each target image is drawn per epoch: at the end, and in
    # the epoch where one image was drawn the most (growth runs only).
    draws = sampler.repetition_counts(steps * (config.batch_size // 2), epoch=fit_info["epochs_run"])
    extra["repetition"] = {
        "final_max_draws": int(draws.max()),
        "final_histogram": np.bincount(draws).tolist(),
    }
    if growth is not None and growth.max_draws:
        extra["repetition"]["max_draws_per_epoch"] = max(growth.max_draws)
        extra["repetition"]["worst_histogram"] = growth.worst_histogram
    return extra


SJFT = register(JointFinetuning(
    "sjft", "selected",
    "selective joint fine-tuning (Ge and Yu, CVPR 2017): every batch is half target images "
    "and half source images, each a random neighbour (by low-level filter-bank statistics) of "
    "one of the batch's target images; a source head learns the source labels beside the "
    "target head; the neighbour lists of hard target images grow as training goes. The "
    "neighbours come from --index_dir (apps.build_index), built there when missing.",
    order=10, grows=True,
))
register(JointFinetuning(
    "sjft_nogrowth", "selected_nogrowth",
    "the paper's ablation without iterative neighbour growth", order=11,
))
register(JointFinetuning(
    "sjft_all", "all", "the paper's ablation: all source images drawn uniformly", order=12
))
register(JointFinetuning(
    "sjft_random", "random",
    "the paper's ablation: as many random source images as sjft selects (with "
    "--from_scratch, every sjft method is selective joint training from scratch)",
    order=13,
))
register(JointFinetuning(
    "sjft_random_neighbours", "random_neighbours",
    "the control that isolates selection: every target image gets a list of random source "
    "images (from a random pool as large as sjft's selected union), grown and sampled "
    "exactly as sjft's lists are",
    order=14, grows=True,
))
