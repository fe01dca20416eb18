"""A process that takes a `RunLock`, for the tests of `keras_seltransfer.utils.run_lock`.

Usage:

    python tests/run_lock_holder.py DIRECTORY [--name=N] [--force]
        [--at=UNIX_TIME] [--hold=SECONDS]

Takes the lock of DIRECTORY (at UNIX_TIME when given, so several of these
processes race for it at the same moment) and prints one line: `held
<record as JSON>` or `refused <message>`. Holding, it waits for a line on
stdin (or HOLD seconds) before releasing; it exits 0 when it held the lock,
3 when refused.

Only `keras_seltransfer.utils` is imported, not the package's `__init__`
(which imports TensorFlow, seconds per process): the lock module depends on
the standard library and `keras_seltransfer.utils.io` alone, and this runs
exactly that code.
"""

import argparse
import json
import os
import sys
import time
import types


def _import_run_lock():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    package = types.ModuleType("keras_seltransfer")
    package.__path__ = [os.path.join(root, "keras_seltransfer")]
    sys.modules["keras_seltransfer"] = package
    from keras_seltransfer.utils import run_lock

    return run_lock


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("directory")
    parser.add_argument("--name", default=None)
    parser.add_argument("--force", action="store_true")
    parser.add_argument("--at", type=float, default=None)
    parser.add_argument("--hold", type=float, default=None)
    args = parser.parse_args()
    run_lock = _import_run_lock()
    kwargs = {"force": args.force}
    if args.name:
        kwargs["name"] = args.name
    lock = run_lock.RunLock(args.directory, **kwargs)
    if args.at is not None:
        time.sleep(max(0.0, args.at - time.time()))
    try:
        lock.acquire()
    except run_lock.RunLockedError as error:
        print(f"refused {error}", flush=True)
        return 3
    try:
        print(f"held {json.dumps(lock.record)}", flush=True)
        if args.hold is not None:
            time.sleep(args.hold)
        else:
            sys.stdin.readline()
    finally:
        lock.release()
    return 0


if __name__ == "__main__":
    sys.exit(main())
