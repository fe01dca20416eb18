"""Flag definitions and error handling shared by the apps.

Flags carry the names of the fields of the library's config dataclasses
(`FinetuneConfig`, `PretrainConfig`) and take their defaults from them, so a
flag and the library can never disagree on a default.
"""

import dataclasses
import logging
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from absl import logging as absl_logging  # noqa: E402

STRATEGY_NAMES = ("auto", "default", "one_device", "mirrored", "multi_worker")

# Largest --image_size: a 4096x4096 RGB float32 image is already 200 MB, and
# a mistyped size (100000) would otherwise fail deep inside TensorFlow with
# an out-of-memory error after the data has been loaded.
MAX_IMAGE_SIZE = 4096

# NumPy and TensorFlow seeds are unsigned 32-bit integers.
MAX_SEED = 2**32 - 1


def defaults(config_cls):
    """Default value of every field of a config dataclass."""
    return {f.name: f.default for f in dataclasses.fields(config_cls)}


def define_training_flags(config_cls):
    """Defines the flags every training app shares, defaults from `config_cls`."""
    d = defaults(config_cls)
    flags.DEFINE_string(
        "backbone",
        d["backbone"],
        "Backbone: a .keras file (e.g. from apps.pretrain), a built-in name "
        "(small_cnn) or a keras.applications name (ResNet50, MobileNetV2, ...).",
    )
    flags.DEFINE_string(
        "backbone_weights",
        d["backbone_weights"],
        "Weights for a named backbone: 'imagenet' (needs internet on first use) "
        "or a weights file. Unset: random initialisation.",
    )
    flags.DEFINE_string(
        "output_dir", d["output_dir"], "Run directory for the model, report, logs and checkpoints."
    )
    flags.DEFINE_integer(
        "image_size", d["image_size"], "Square input size in pixels.",
        lower_bound=8, upper_bound=MAX_IMAGE_SIZE,
    )
    flags.DEFINE_enum(
        "channels",
        None,
        ["1", "3"],
        "Input channels. Unset: the backbone's (saved models, applications) or the data's.",
    )
    flags.DEFINE_integer(
        "seed", d["seed"], "Seed for subsets, splits, initialisation and shuffling.",
        lower_bound=0, upper_bound=MAX_SEED,
    )
    flags.DEFINE_float(
        "test_fraction",
        d["test_fraction"],
        "Share held out for testing when the data set has no test split.",
        lower_bound=0.0,
        upper_bound=1.0,
    )
    flags.DEFINE_integer(
        "split_seed", d["split_seed"], "Seed of the held-out test split (keep fixed across runs).",
        lower_bound=0, upper_bound=MAX_SEED,
    )
    flags.DEFINE_float(
        "val_fraction",
        d["val_fraction"],
        "Share of the training images used for early stopping.",
        lower_bound=0.0,
        upper_bound=1.0,
    )
    flags.DEFINE_integer("epochs", d["epochs"], "Maximum number of epochs.", lower_bound=1)
    flags.DEFINE_integer(
        "patience", d["patience"], "Early-stopping patience (epochs, on validation cross-entropy).", lower_bound=1
    )
    flags.DEFINE_integer(
        "batch_size", d["batch_size"], "Global batch size, split across replicas.", lower_bound=1
    )
    flags.DEFINE_float(
        "learning_rate", d["learning_rate"], "Initial learning rate (cosine decay).", lower_bound=0.0
    )
    flags.DEFINE_enum("optimizer", d["optimizer"], ["adam", "sgd"], "Optimizer (sgd: momentum 0.9).")
    flags.DEFINE_float(
        "weight_decay", d["weight_decay"], "Decoupled weight decay of the optimizer.", lower_bound=0.0
    )
    flags.DEFINE_enum(
        "augment", d["augment"], ["none", "flip", "flip_ud"], "Training augmentation."
    )
    flags.DEFINE_enum("strategy", d["strategy"], list(STRATEGY_NAMES), "Distribution strategy.")
    flags.DEFINE_enum(
        "precision",
        d["precision"],
        ["float32", "mixed_float16", "mixed_bfloat16"],
        "Compute precision (mixed_float16 on GPUs, mixed_bfloat16 on recent CPUs/TPUs).",
    )
    flags.DEFINE_boolean("deterministic", d["deterministic"], "Enable TensorFlow op determinism.")
    flags.DEFINE_boolean("tensorboard", d["tensorboard"], "Write TensorBoard logs under <output_dir>/logs.")
    flags.DEFINE_integer(
        "verbose", d["verbose"], "Keras progress output: 0 silent, 1 progress bar, 2 one line per epoch.",
        lower_bound=0, upper_bound=2,
    )


def run_class_names(model_path):
    """Class names from the run's report.json beside a model, or None.

    Raises:
        ValueError: if that report.json exists but is not a readable report
            with a list of class names.
    """
    path = os.path.join(os.path.dirname(os.path.abspath(model_path)), "report.json")
    if not os.path.isfile(path):
        return None
    from keras_seltransfer.utils.io import load_json_object

    report = load_json_object(path, f"run report {path!r} beside --model")
    names = report.get("class_names")
    if names is not None and (
        not isinstance(names, list) or not all(isinstance(n, str) and n for n in names)
    ):
        raise ValueError(
            f"Expected 'class_names' in the run report {path!r} beside --model to be a "
            f"list of non-empty strings. Received: class_names={names!r}"
        )
    return names


def config_from_flags(config_cls, flag_values=None):
    """Builds a config dataclass from the flags that share its field names."""
    flag_values = flag_values or flags.FLAGS
    kwargs = {}
    for field in dataclasses.fields(config_cls):
        if field.name in flag_values:
            value = flag_values[field.name].value
            if field.name == "channels" and value is not None:
                value = int(value)
            kwargs[field.name] = value
    return config_cls(**kwargs)


def reject_extra_args(argv):
    """Rejects positional arguments and quiets TensorFlow's INFO logging.

    Every app's `main` calls this first. TensorFlow logs SavedModel export
    details at INFO through absl and Python logging; the apps print their own
    summary, so only warnings and errors are kept unless `--verbosity` asks
    for more.
    """
    logging.getLogger("tensorflow").setLevel(logging.WARNING)
    if not flags.FLAGS["verbosity"].present:
        absl_logging.set_verbosity(absl_logging.WARNING)
    if len(argv) > 1:
        raise app.UsageError(
            f"Unexpected positional arguments: {' '.join(argv[1:])}. "
            "All options are flags; see --help."
        )


def fail(program, error):
    """Prints a one-line error for the user and exits with status 2.

    Messages from Keras and TensorFlow may span lines; they are joined so
    the error stays one line that scripts can grep.
    """
    message = " ".join(str(error).split())
    print(f"{program}: error: {message}", file=sys.stderr)
    sys.exit(2)


# Errors the library raises on bad input: shown as one clear line, without a
# traceback. Anything else is a bug and keeps its traceback.
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, PermissionError)
