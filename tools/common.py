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
