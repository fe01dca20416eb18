"""Start-up and error reporting shared by the scripts in tools/.

Every tool is run as `python tools/<name>.py` from the repository root, so
Python puts tools/ (not the root) first on `sys.path`. A tool imports, after
the standard library and before absl or anything that loads TensorFlow,

    import common  # tools/common.py: environment, repository root on sys.path

which quietens TensorFlow's C++ logging and makes `keras_seltransfer` and
`tools.*` importable from this checkout. TensorFlow reads its environment
when it is first imported, which is why this happens when the module is
imported rather than in a function; the variable is only defaulted, so a
value set by the caller wins. Tools whose figures must repeat exactly call
`repeatable_cpu_arithmetic()` next, before anything imports TensorFlow.

To load a tool as a module (a test calling one of its functions), put
tools/ first on `sys.path` as `python tools/<name>.py` does, then import it.
"""

import contextlib
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

# The repository root: the checkout whose package the tools import.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def repeatable_cpu_arithmetic():
    """Turns off oneDNN's reordered floating-point arithmetic on CPUs.

    With it on, TensorFlow may sum in a different order from run to run, so
    the same run gives slightly different figures; with it off, CPU results
    repeat exactly (as in the tests). Only defaults `TF_ENABLE_ONEDNN_OPTS`.

    Raises:
        RuntimeError: when TensorFlow is already imported (the setting
            would be silently ignored).

    Example:

    >>> import common
    >>> common.repeatable_cpu_arithmetic()
    """
    if "tensorflow" in sys.modules and "TF_ENABLE_ONEDNN_OPTS" not in os.environ:
        raise RuntimeError(
            "repeatable_cpu_arithmetic() must be called before TensorFlow is imported."
        )
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")


def tool_name():
    """The running tool's name: its script's file name without `.py`.

    Returns:
        A string such as `"reproduce"` (`"python"` in an interactive session).
    """
    script = sys.argv[0] if sys.argv and sys.argv[0] else "python"
    return os.path.splitext(os.path.basename(script))[0]


def fail(message):
    """Reports an error the user can fix and exits with status 2.

    Prints `<tool>: error: <message>` on stderr, without a traceback.

    Args:
        message: what went wrong and how to fix it.

    Raises:
        SystemExit: always, with code 2.

    Example:

    >>> fail("runs/pretrain/model.keras does not exist: run apps.pretrain first.")
    """
    print(f"{tool_name()}: error: {message}", file=sys.stderr)
    sys.exit(2)


@contextlib.contextmanager
def errors_reported(*kinds):
    """Turns the given exception types raised inside the block into `fail`.

    Args:
        *kinds: exception classes whose message is meant for the user
            (default: `ValueError`, which the library raises for bad
            arguments and for inconsistent caches).

    Raises:
        SystemExit: with code 2, when one of `kinds` is raised in the block.

    Example:

    >>> with errors_reported(ValueError):
    ...     collect(settings)
    """
    try:
        yield
    except kinds or (ValueError,) as e:
        fail(str(e))


def reject_arguments(argv):
    """Raises absl's usage error when a tool gets positional arguments.

    Args:
        argv: the `argv` that `absl.app.run` passes to `main`.

    Raises:
        absl.app.UsageError: when `argv` holds more than the program name.

    Example:

    >>> def main(argv):
    ...     reject_arguments(argv)
    """
    from absl import app

    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")


# Benchmarks (tools/bench_*.py) share the helpers below: the device line
# they print first, the --precision and --output flags, and the JSON they
# write, which tools/bench_all.py summarises.


def describe_device():
    """One line naming the device TensorFlow computes on and its version.

    Lists the physical GPUs (their names from the driver) when TensorFlow
    sees any, else the CPU with its core count. Listing physical devices
    does not start TensorFlow's runtime, so a tool may still configure
    devices afterwards.

    Returns:
        A string such as `"device: CPU (2 cores), TensorFlow 2.21.0"` or
        `"device: 1 GPU (NVIDIA H100 80GB HBM3), TensorFlow 2.21.0"`.

    Example:

    >>> print(describe_device())
    device: CPU (2 cores), TensorFlow 2.21.0
    """
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        details = tf.config.experimental.get_device_details
        names = ", ".join(details(g).get("device_name", g.name) for g in gpus)
        what = f"{len(gpus)} GPU{'s' if len(gpus) > 1 else ''} ({names})"
    else:
        what = f"CPU ({os.cpu_count()} cores)"
    return f"device: {what}, TensorFlow {tf.__version__}"


def define_benchmark_flags():
    """Defines the `--precision` and `--output` flags every benchmark takes.

    Call it once, next to the tool's own `flags.DEFINE_*` lines.
    """
    from absl import flags

    flags.DEFINE_string(
        "precision",
        "float32",
        "Keras dtype policy the benchmarked models are built and timed in: float32, or a "
        "mixed policy of keras_seltransfer.training.defaults.PRECISIONS (mixed_float16 on "
        "GPUs, mixed_bfloat16 on recent CPUs and TPUs).",
    )
    flags.DEFINE_string(
        "output", None, "Write the figures as JSON to this file (atomically), for bench_all."
    )


def check_precision(name):
    """Returns a `--precision` value after checking it names a dtype policy.

    Raises:
        SystemExit: with code 2 (`fail`) for a name that is not one of
            `keras_seltransfer.training.defaults.PRECISIONS`.
    """
    from keras_seltransfer.training.defaults import PRECISIONS

    if name not in PRECISIONS:
        fail(f"--precision must be one of {PRECISIONS}. Received: {name!r}")
    return name


def precision_scope(name):
    """Checks a `--precision` value and returns its dtype policy scope.

    Args:
        name: the `--precision` flag's value.

    Returns:
        `keras_seltransfer.training.loop.dtype_policy(name)`: a context
        manager setting the global Keras dtype policy for its block.

    Raises:
        SystemExit: with code 2 (`fail`) for an unknown name
            (`check_precision`).

    Example:

    >>> with precision_scope(FLAGS.precision):
    ...     model = build()
    """
    from keras_seltransfer.training.loop import dtype_policy

    return dtype_policy(check_precision(name))


def load_backbone(spec, input_shape, precision):
    """`keras_seltransfer.models.load_backbone` in the given precision.

    A backbone built from a name takes the global dtype policy (call this
    inside `precision_scope`); a saved `.keras` file keeps the policy it
    was saved with, so it is cast, as `apps.finetune` casts it.
    """
    from keras_seltransfer import models
    from keras_seltransfer.models.backbones import with_dtype_policy

    backbone = models.load_backbone(spec, input_shape)
    if precision != "float32" and models.is_backbone_path(spec):
        backbone = with_dtype_policy(backbone, precision)
    return backbone


def application_backbone(spec):
    """The `keras.applications` constructor name `spec` names, in any spelling.

    For benchmarks that build the raw application (no pooling or
    preprocessing added), where a built-in or saved backbone does not apply.

    Raises:
        SystemExit: with code 2 (`fail`) when `spec` names no application.

    Example:

    >>> application_backbone("mobilenet_v2")
    'MobileNetV2'
    """
    from keras_seltransfer.models.named_backbones import application_name

    name = application_name(spec)
    if name is None:
        fail(
            "--backbone must name a keras.applications constructor (e.g. DenseNet121, "
            f"MobileNetV2). Received: {spec!r}"
        )
    return name


def goal(measure, value, at_most=None, at_least=None):
    """One headline figure of a benchmark, with its goal if it has one.

    Args:
        measure: what the figure is, in words.
        value: the figure (a float; None when it was not measured).
        at_most: the goal is `value <= at_most`.
        at_least: the goal is `value >= at_least`.

    Returns:
        A dict for the `"headline"` list of `benchmark_results`.

    Example:

    >>> goal("train step time adafilter / plain", 1.55, at_most=2.2)["goal"]
    {'at_most': 2.2}
    """
    bound = {k: v for k, v in (("at_most", at_most), ("at_least", at_least)) if v is not None}
    return {"measure": measure, "value": value, "goal": bound or None}


def benchmark_results(backbone, image_size, precision, device):
    """The fields every benchmark's JSON starts with.

    `argv` (the tool's arguments without `--output`) lets `bench_all`
    reuse a result only when it was measured with the same settings.

    Returns:
        A dict: `benchmark`, `argv`, `device` (the `describe_device` line),
        `precision`, `backbone`, `image_size`, `cpus`, and an empty
        `headline` list for the `goal`s.
    """
    return {
        "benchmark": tool_name(),
        "argv": _without_output(sys.argv[1:]),
        "device": device,
        "precision": precision,
        "backbone": backbone,
        "image_size": image_size,
        "cpus": os.cpu_count(),
        "headline": [],
    }


def _without_output(argv):
    kept, skip = [], False
    for arg in argv:
        if not skip and arg.split("=")[0] != "--output":
            kept.append(arg)
        skip = arg == "--output"  # `--output PATH`: PATH is the next argument
    return kept


def write_results(path, results):
    """Writes a benchmark's results as indented JSON, atomically, and says so."""
    import json

    from keras_seltransfer.utils.io import atomic_write_text

    atomic_write_text(path, json.dumps(results, indent=2, sort_keys=True) + "\n")
    print(f"wrote {path}")
