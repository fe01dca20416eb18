"""Flag definitions and error handling shared by the apps.

Flags are generated from the options of the library's config dataclasses
(`FinetuneConfig`, `PretrainConfig`, whose options the methods declare): the
same name, default, help text, allowed values and bounds, so a flag and the
library can never disagree.
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

from keras_seltransfer.utils.options import option_info  # noqa: E402
from keras_seltransfer.training.defaults import MAX_IMAGE_SIZE  # noqa: E402,F401
from keras_seltransfer.training.defaults import MAX_SEED  # noqa: E402,F401
from keras_seltransfer.utils.io import load_json_object  # noqa: E402


def defaults(config_cls):
    """Default value of every field of a config dataclass."""
    return {f.name: f.default for f in dataclasses.fields(config_cls)}


def define_config_flags(config_cls, skip=(), help_overrides=None, choices=None):
    """Defines one flag per option of `config_cls` (a `FinetuneConfig` or
    `PretrainConfig`), named like the option, with its default, help text,
    allowed values and bounds (see `keras_seltransfer.methods.option`).

    Args:
        config_cls: the config dataclass.
        skip: option names that get no flag.
        help_overrides: `{name: help}` where an app words an option its own way.
        choices: `{name: allowed values}` for options whose allowed values
            are known only when the app starts (the registered methods).
    """
    help_overrides = help_overrides or {}
    choices = choices or {}
    for field in dataclasses.fields(config_cls):
        info = option_info(field)
        name = field.name
        if not info["flag"] or name in skip:
            continue
        kind, default = info["type"], field.default
        text = help_overrides.get(name, info["help"])
        lower = info["lower"] if info["lower"] is not None else info["above"]
        upper = info["upper"] if info["upper"] is not None else info["below"]
        allowed = choices.get(name, info["choices"])
        if allowed is not None:
            flags.DEFINE_enum(
                name,
                None if default is None else str(default),
                [str(choice) for choice in allowed],
                text,
            )
        elif kind is bool:
            flags.DEFINE_boolean(name, default, text)
        elif kind is int:
            flags.DEFINE_integer(name, default, text, lower_bound=lower, upper_bound=upper)
        elif kind is float:
            flags.DEFINE_float(name, default, text, lower_bound=lower, upper_bound=upper)
        else:
            flags.DEFINE_string(name, default, text)


def run_app(main):
    """`absl.app.run(main)`, with every flag of the app listed in `--help`
    (flags defined here are key flags of the program being run, whether it
    is started as `python -m apps.<name>` or as a `kst-<name>` script)."""
    program = sys.argv[0]
    for module in (__name__, main.__module__):
        for flag in flags.FLAGS.get_key_flags_for_module(module):
            flags.FLAGS.register_key_flag_for_module(program, flag)
    app.run(main)


def print_paths(outputs, labels):
    """Prints `label: path` for each `(key, label)` in `labels` that
    `outputs` (a workflow's returned dict) holds, in that order."""
    for key, label in labels:
        if key in outputs:
            print(f"  {label}: {outputs[key]}")


def run_class_names(model_path):
    """Class names from the run's report.json beside a model, or None.

    Raises:
        ValueError: if that report.json exists but is not a readable report
            with a list of class names.
    """
    path = os.path.join(os.path.dirname(os.path.abspath(model_path)), "report.json")
    if not os.path.isfile(path):
        return None
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
    """Builds a config dataclass from the flags that share its field names
    (enum flags of int options converted back to ints)."""
    flag_values = flag_values or flags.FLAGS
    kwargs = {}
    for field in dataclasses.fields(config_cls):
        if field.name in flag_values:
            value = flag_values[field.name].value
            if value is not None and option_info(field)["type"] is int:
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


# Errors the library raises on bad input or an unusable environment (a
# tf.data service that cannot be reached or sends nothing): shown as one clear
# line, without a traceback. Anything else is a bug and keeps its traceback.
USER_ERRORS = (
    ValueError,
    FileNotFoundError,
    FileExistsError,
    NotADirectoryError,
    PermissionError,
    ConnectionError,
    TimeoutError,
)
