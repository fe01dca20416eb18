"""Runs many command lines of the apps in one process, as `absl.app.run` would.

Starting an app costs seconds (the TensorFlow import); the hostile-input
tests run dozens of command lines, so this driver imports each app once and
runs its `main` for every command line in turn, resetting the flags in
between. Each command line goes through the same steps as `app.run`: flag
parsing with absl's usage message on a flag error (`parse_flags_with_usage`),
`main(argv)`, absl's short usage on `app.UsageError`, and the exit status of
`sys.exit`. An exception escaping `main` is recorded as Python would report
it: a traceback on stderr and exit status 1.

Usage:

    python -m tests.apps.app_driver CASES.json RESULTS.json

CASES.json is a list of `{"id", "app", "argv", "timeout", "watch"}` (`app` a
module such as `"apps.finetune"`, `argv` the arguments after the program
name, `timeout` in seconds, `watch` paths whose contents are digested before
and after the case). RESULTS.json receives, per case, `id`, `rc`, `stdout`,
`stderr` (captured at the file-descriptor level, so TensorFlow's C++ logging
is included), `timed_out`, `seconds`, and `watch_before` / `watch_after`
(path to digest, None for a missing path).
"""

import contextlib
import hashlib
import importlib
import json
import os
import signal
import sys
import tempfile
import time
import traceback

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

from absl import app  # noqa: E402
from absl import flags  # noqa: E402

FLAGS = flags.FLAGS


def digest(path):
    """sha256 of a file, or of every file under a directory (names included)."""
    if not os.path.exists(path):
        return None
    if os.path.isfile(path):
        with open(path, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()
    total = hashlib.sha256()
    for root, dirs, files in os.walk(path):
        dirs.sort()
        for name in sorted(files):
            full = os.path.join(root, name)
            total.update(os.path.relpath(full, path).encode() + b"\0")
            with open(full, "rb") as f:
                total.update(f.read())
    return total.hexdigest()


class CaseTimeout(Exception):
    """Raised in the main thread when a case runs past its timeout."""


def _on_alarm(signum, frame):
    raise CaseTimeout()


@contextlib.contextmanager
def _captured_fds():
    """Redirects file descriptors 1 and 2 into temporary files."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    files = tempfile.TemporaryFile(), tempfile.TemporaryFile()
    os.dup2(files[0].fileno(), 1)
    os.dup2(files[1].fileno(), 2)
    captured = {}
    try:
        yield captured
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved:
            os.close(fd)
        for key, f in zip(("stdout", "stderr"), files):
            f.seek(0)
            captured[key] = f.read().decode("utf-8", errors="replace")
            f.close()


def _run_one(module, argv, timeout):
    """Runs one command line of `module`; returns `(rc, timed_out, extra_stderr)`."""
    FLAGS.unparse_flags()
    program = module.__name__
    extra = ""
    rc, timed_out = 0, False
    signal.signal(signal.SIGALRM, _on_alarm)
    signal.alarm(max(1, int(timeout)))
    try:
        remaining = app.parse_flags_with_usage([program, *argv])
        try:
            result = module.main(remaining)
            rc = 0 if result is None else result
        except app.UsageError as error:
            app.usage(shorthelp=True, detailed_error=error, exitcode=error.exitcode)
    except SystemExit as exit_:
        code = exit_.code
        rc = 0 if code is None else code if isinstance(code, int) else 1
    except CaseTimeout:
        rc, timed_out = None, True
    except BaseException:  # noqa: BLE001  (what Python would print and exit 1 for)
        rc, extra = 1, traceback.format_exc()
    finally:
        signal.alarm(0)
    return rc, timed_out, extra


def _load_app(name, loaded):
    """Imports app `name`, first removing the flags of the previously loaded app."""
    if loaded.get("name") == name:
        return loaded["module"]
    for flag_name in list(FLAGS):
        if flag_name not in loaded["base_flags"]:
            delattr(FLAGS, flag_name)
    # The launcher (apps.<name>) and the app it runs (keras_seltransfer.apps.<name>,
    # which defines the flags) are both imported afresh.
    sys.modules.pop(name, None)
    sys.modules.pop(f"keras_seltransfer.{name}", None)
    module = importlib.import_module(name)
    loaded.update(name=name, module=module)
    # absl's short usage prints the main module's docstring.
    sys.modules["__main__"].__doc__ = module.__doc__
    return module


def main(cases_path, results_path):
    with open(cases_path) as f:
        cases = json.load(f)
    app.define_help_flags()
    loaded = {"name": None, "base_flags": set(FLAGS)}
    results = []
    for case in cases:
        module = _load_app(case["app"], loaded)
        watch = case.get("watch", [])
        before = {path: digest(path) for path in watch}
        start = time.time()
        with _captured_fds() as captured:
            rc, timed_out, extra = _run_one(module, case["argv"], case.get("timeout", 60))
        keras = sys.modules.get("keras")
        if keras is not None:
            # Names and graphs of one case must not leak into the next; the
            # garbage collection that `free_memory` adds would cost most of
            # a second per case.
            keras.backend.clear_session(free_memory=False)
        results.append(
            {
                "id": case["id"],
                "rc": rc,
                "timed_out": timed_out,
                "stdout": captured["stdout"],
                "stderr": captured["stderr"] + extra,
                "seconds": round(time.time() - start, 2),
                "watch_before": before,
                "watch_after": {path: digest(path) for path in watch},
            }
        )
        with open(results_path, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main(*sys.argv[1:3])
