"""The configs of a fine-tuning run and of a pretraining run.

`FinetuneConfig` is generated: the options every run has (declared here)
followed by the options of every registered method
(`keras_seltransfer.methods`), each declared once with its default, help
text and allowed values. The config docstring, the flags of `apps.finetune`
and their `--help` are generated from the same declarations, so the three
cannot disagree. A run's config is saved flat, as `config.json`.
"""

import dataclasses
import os
import textwrap

from keras_seltransfer import methods
from keras_seltransfer.data.pipeline import AUGMENTATIONS
from keras_seltransfer.data.pipeline import SAMPLINGS
from keras_seltransfer.distribute import STRATEGY_NAMES
from keras_seltransfer.utils.options import check_option
from keras_seltransfer.utils.options import option
from keras_seltransfer.utils.options import option_info
from keras_seltransfer.training import defaults
from keras_seltransfer.utils.naming import spec_slug


def _shared(**overrides):
    """The options of every training run, as `(name, type, field)`;
    `overrides` change defaults."""
    specs = {
        "backbone": (defaults.DEFAULT_BACKBONE, dict(
            help="Backbone: a .keras file (e.g. from apps.pretrain), a built-in name "
            "(small_cnn), any keras.applications name (ResNet50, MobileNetV2, ConvNeXtTiny, "
            "...) or kerashub:<preset> (a KerasHub preset name or local preset directory).")),
        "backbone_weights": (None, dict(
            help="Weights for a named backbone: 'imagenet' (keras.applications; needs internet "
            "on first use), 'preset' (a KerasHub preset's own) or a weights file. Unset: random "
            "initialisation.")),
        "output_dir": (None, dict(
            help="Run directory for the model, report, logs and checkpoints.")),
        "image_size": (64, dict(
            help="Square input size in pixels the images are resized to.",
            lower=8, upper=defaults.MAX_IMAGE_SIZE)),
        "channels": (None, dict(
            help="Input channels (1 or 3). Unset: the backbone's (saved models, applications) "
            "or the data's (built-in backbones).", type=int, choices=(1, 3))),
        "fraction": (1.0, dict(
            help="Fraction of each training class to keep (the low-data protocol).",
            above=0.0, upper=1.0)),
        "seed": (0, dict(
            help="Seed of the subset, the validation split, initialisation and shuffling.",
            lower=0, upper=defaults.MAX_SEED)),
        "test_fraction": (0.25, dict(
            help="Share of a data set without a test split held out for testing, with "
            "--split_seed (fixed across seeds and fractions, so every run is scored on the same "
            "images).", above=0.0, below=1.0)),
        "split_seed": (0, dict(
            help="Seed of the held-out test split (keep fixed across runs).",
            lower=0, upper=defaults.MAX_SEED)),
        "val_fraction": (0.2, dict(
            help="Share of the kept training images used for early stopping and model "
            "selection.", above=0.0, below=1.0)),
        "epochs": (30, dict(help="Maximum number of epochs.", lower=1)),
        "patience": (8, dict(
            help="Early-stopping patience in epochs, on validation cross-entropy; the best "
            "epoch's weights are restored.", lower=1)),
        "batch_size": (32, dict(help="Global batch size, split across replicas.", lower=1)),
        "learning_rate": (1e-3, dict(
            help="Initial learning rate (cosine-decayed to zero).", above=0.0)),
        "optimizer": ("adam", dict(
            help="Optimizer: adam or sgd (momentum 0.9).", choices=defaults.OPTIMIZERS)),
        "weight_decay": (0.0, dict(help="Decoupled weight decay of the optimizer.", lower=0.0)),
        "augment": ("flip", dict(help="Training augmentation.", choices=AUGMENTATIONS)),
        "strategy": ("auto", dict(
            help="Distribution strategy (see distribute.get_strategy).", choices=STRATEGY_NAMES)),
        "precision": ("float32", dict(
            help="Compute precision (mixed_float16 on GPUs, mixed_bfloat16 on recent "
            "CPUs/TPUs).", choices=defaults.PRECISIONS)),
        "deterministic": (False, dict(help="Enable TensorFlow op determinism.")),
        "tensorboard": (True, dict(help="Write TensorBoard logs under <output_dir>/logs.")),
        "verbose": (1, dict(
            help="Keras progress output: 0 silent, 1 progress bar, 2 one line per epoch.",
            lower=0, upper=2)),
        "force": (False, dict(
            help="Take over --output_dir although its lock file (run.lock) names another "
            "run, when you know that run is gone: one on another host, whose process cannot "
            "be checked from here, or an unreadable lock file. A run that is still writing, "
            "taken over, mixes its outputs with this run's. A lock of a process running on "
            "this host is never taken over; one whose process is gone is taken over without "
            "--force.")),
    }
    fields = []
    for name, (default, kwargs) in specs.items():
        default = overrides.pop(name, default)
        made = option(default, **kwargs)
        fields.append((name, made.metadata["type"], made))
    if overrides:
        raise ValueError(f"Unknown shared options: {sorted(overrides)}")
    return fields


def _finetune_general():
    """The options of a fine-tuning run that belong to no method."""
    own = {
        "target": option(
            "elpv",
            "Target data: elpv, textures, fashion_mnist, folder:/path (one sub-folder per class, "
            "or train/ and test/ inside), tfds:name, numpy:/path/file.npz.",
        ),
        "method": option(
            "baseline",
            f"Fine-tuning method: one of {', '.join(methods.names())} (each a module of "
            "keras_seltransfer.methods; apps.finetune --help describes them), or auto: score "
            "the --auto_candidates by k-fold cross-validation on the training images, choose "
            "one (--auto_rule) and train it as its own run would.",
        ),
        "per_class": option(
            None, "Keep exactly this many training images per class (overrides --fraction).",
            type=int, lower=1,
        ),
        "dropout": option(0.0, "Dropout before the head.", lower=0.0, below=1.0),
        "batchnorm": option(
            None,
            "BatchNorm during fine-tuning: frozen (pretrained statistics) or train. Unset: the "
            "method's default (frozen, but train for the sjft methods, which normalise each "
            "mixed source/target batch with its own statistics as the authors' code does; "
            "see --joint_bn_stats). Runs from scratch always train it.",
            choices=defaults.BATCHNORM_MODES,
        ),
        "class_weight": option(
            "none", "Loss weighting of classes: none or balanced (inverse class frequency).",
            choices=defaults.CLASS_WEIGHTS,
        ),
        "sampling": option(
            "uniform",
            "How training batches draw images: uniform (each image once per epoch) or "
            "balanced (each class with equal probability, same steps per epoch). Not for the "
            "sjft methods, which draw their own batches.",
            choices=SAMPLINGS,
        ),
        "source": option(
            "fashion_mnist",
            "Source data set spec: the pool of the sjft methods (its training split), the "
            "source of filter_transfer's kl statistic and of --recalibrate_batchnorm=source.",
        ),
        "compose": option(
            None,
            "Model transforms applied, in order, to the model before the method's own "
            f"({', '.join(methods.transform_names())}; comma-separated). E.g. --method=sjft "
            "--compose=adafilter: selective joint fine-tuning of a gated backbone; "
            "--method=filter_transfer --compose=antialias transfers the filters of the "
            "anti-aliased network.",
        ),
        "from_scratch": option(
            False, "Re-initialise the backbone (same architecture): training from scratch."
        ),
        "cut_layer": option(None, "Layer at which to cut a saved or application backbone."),
        "export": option(True, "Write a SavedModel of the fine-tuned classifier."),
        "auto_candidates": option(
            None,
            "The methods --method=auto chooses among, comma-separated, simplest first (a tie "
            "within noise goes to the earlier one); each a method name, optionally with its "
            "own settings after colons, e.g. baseline:batchnorm=train:learning_rate=1e-4. "
            f"Unset: {', '.join(defaults.AUTO_CANDIDATES)} (those that fail to apply to the "
            "backbone or data are reported and left out).",
        ),
        "auto_folds": option(
            5, "Cross-validation folds of --method=auto (stratified, over the training and "
            "validation images).", lower=2, upper=20,
        ),
        "auto_metric": option(
            "balanced_accuracy", "The held-out fold score --method=auto compares.",
            choices=defaults.AUTO_METRICS,
        ),
        "auto_rule": option(
            "one_se",
            "How --method=auto chooses: one_se, the earliest (simplest) candidate whose mean "
            "fold score is within one standard error (of the paired per-fold differences) of "
            "the best; best, the highest mean.",
            choices=defaults.AUTO_RULES,
        ),
        "auto_time_budget": option(
            0.0, "Minutes --method=auto may spend on cross-validation (0: no limit). Folds run "
            "in rounds over every candidate, so a budget that ends early leaves all candidates "
            "scored on the same folds.", lower=0.0,
        ),
    }
    return [(name, made.metadata["type"], made) for name, made in own.items()]


def _method_fields():
    fields, owners = [], {}
    for cls in methods.options_classes():
        for field in dataclasses.fields(cls):
            if field.name in owners:
                raise ValueError(
                    f"Option {field.name!r} is declared by both {owners[field.name].__name__} "
                    f"and {cls.__name__}."
                )
            owners[field.name] = cls
            fields.append((field.name, field.type, dataclasses.field(
                default=field.default, metadata=field.metadata
            )))
    return fields


def _docstring(summary, fields):
    lines = [summary, "", "Attributes:"]
    for name, _, field in fields:
        text = option_info(field)["help"]
        lines.extend(textwrap.wrap(
            f"{name}: {text}", width=76, initial_indent="    ", subsequent_indent="        "
        ))
    return "\n".join(lines)


def _validate_fields(config):
    for field in dataclasses.fields(config):
        if field.name == "fraction" and getattr(config, "per_class", None) is not None:
            continue  # ignored when per_class is set
        if field.name == "channels" and config.channels not in (None, 1, 3):
            raise ValueError(
                f"`channels` must be 1, 3 or None. Received: channels={config.channels!r}"
            )
        check_option(field, getattr(config, field.name))


class _FinetuneConfigBase:
    def __post_init__(self):
        # Checked against the registry now, not when the class was made:
        # a method registered later (without options of its own) runs too.
        if self.method != methods.AUTO:
            methods.get(self.method)
        _validate_fields(self)
        if self.method != methods.AUTO:
            methods.check_compose(self.method, self.compose)
        if self.sampling != "uniform" and self.is_joint:
            raise ValueError(
                f"`sampling` applies to the single-task pipeline; --method={self.method} draws "
                f"its own batches. Received: sampling={self.sampling!r}"
            )
        for cls in methods.options_classes():
            if hasattr(cls, "validate"):
                cls.validate(self)
        if self.output_dir is None:
            amount = f"{self.per_class}pc" if self.per_class is not None else f"{self.fraction:g}"
            self.output_dir = os.path.join(
                "runs", "finetune",
                f"{self.method}-{spec_slug(self.target)}-{amount}-seed{self.seed}",
            )
        if self.method == methods.AUTO:
            # Every candidate's settings (and composition) are checked now,
            # before anything trains. Imported here: the auto mode's module
            # builds on this one.
            from keras_seltransfer.training import auto

            auto.candidate_configs(self)

    @property
    def is_joint(self):
        """Whether the method trains on source images too (the SJFT family)."""
        return self.method != methods.AUTO and methods.get(self.method).joint

    @property
    def batchnorm_mode(self):
        """The BatchNorm mode this run uses (see `batchnorm`)."""
        if self.from_scratch:
            return "train"
        if self.batchnorm is not None:
            return self.batchnorm
        if self.method == methods.AUTO:
            return None  # each candidate's own
        return methods.get(self.method).default_batchnorm


class _PretrainConfigBase:
    def __post_init__(self):
        _validate_fields(self)
        if self.output_dir is None:
            self.output_dir = defaults.DEFAULT_PRETRAIN_DIR


def _make(name, base, fields, summary):
    cls = dataclasses.make_dataclass(
        name, fields, bases=(base,), namespace={"__module__": __name__}
    )
    cls.__doc__ = _docstring(summary, fields)
    return cls


_FINETUNE_SHARED = _shared()
_FINETUNE_FIELDS = (
    _finetune_general()[:2]
    + _FINETUNE_SHARED[:6]
    + _finetune_general()[2:]
    + _FINETUNE_SHARED[6:]
    + _method_fields()
)

FinetuneConfig = _make(
    "FinetuneConfig",
    _FinetuneConfigBase,
    _FINETUNE_FIELDS,
    "Everything that defines a fine-tuning run (saved as `config.json`).\n\n"
    "The options of every run come first, then those of the methods (each says which "
    "methods read it). `output_dir` defaults to "
    "`runs/finetune/<method>-<target>-<fraction>-seed<seed>`.\n\n"
    "Example:\n\n"
    "```python\n"
    "config = FinetuneConfig(target=\"elpv\", method=\"sjft\", fraction=0.15, seed=1)\n"
    "outputs = finetune(config)\n"
    "```",
)

PretrainConfig = _make(
    "PretrainConfig",
    _PretrainConfigBase,
    [("source", str, option("fashion_mnist", "Source data set spec."))]
    + _shared(
        backbone="small_cnn",
        output_dir=defaults.DEFAULT_PRETRAIN_DIR,
        test_fraction=0.2,
        val_fraction=0.05,
        epochs=3,
        patience=3,
        batch_size=64,
        augment="none",
    ),
    "Everything that defines a pretraining run (saved as `config.json`).\n\n"
    "The trained classifier is written to `<output_dir>/model.keras` (cut at its "
    "`\"features\"` layer when used as a backbone); `fraction` trains on part of each source "
    "class (for quick runs).\n\n"
    "Example:\n\n"
    "```python\n"
    "pretrain(PretrainConfig(source=\"fashion_mnist\", backbone=\"small_cnn\", epochs=3))\n"
    "```",
)


__all__ = ["FinetuneConfig", "PretrainConfig"]
