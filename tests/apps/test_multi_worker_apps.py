"""The apps under `--strategy=multi_worker`, run as a cluster manager runs them.

Every test starts two worker processes of an app (`python -m apps.<name>`)
on 127.0.0.1, each with its `TF_CONFIG`, and compares what they do with one
process of the same app.

Where the workers are given separate output directories they stand for
machines with their own disks: what each worker wrote is then known. The
preemption tests give both the same directory, as on a shared file system,
and restart both with the same command.

A two-worker run is not the single-process run: each worker reads its own
shard of the training images, so the global batches (and the trajectory)
differ, and its results must agree within the tolerance of
tests/test_distributed_methods.py. A resumed multi-worker run is not
bit-identical to an uninterrupted one either (unlike a single-process run,
see tests/apps/test_apps.py): under a distribution strategy Keras opens the
training dataset once to read a batch's shapes before it opens it again to
train, and the pipeline's shuffle stage reshuffles on every pass it starts,
so the order depends on how far that first iterator read ahead (further
after a resume, whose stream starts by skipping the steps already taken).
"""

import json
import os
import re
import shutil
import signal
import sys
import time

import keras
import numpy as np
import pytest

from tests import helpers
from tests.test_distributed_methods import METHODS
from tests.test_distributed_methods import MULTI_WORKER_TOLERANCE

pytestmark = pytest.mark.slow

_TIMEOUT_S = 240
# How long the surviving worker may take to notice its peer is gone (the
# coordination service's heartbeat timeout is what it waits for).
_SURVIVOR_TIMEOUT_S = 90


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("multi_worker_apps")
    keras.utils.set_random_seed(0)  # module fixtures run before the per-test seeding
    return {
        "target": "numpy:" + helpers.write_npz(root / "target.npz", num_per_class=40),
        "large_target": "numpy:" + helpers.write_npz(root / "large.npz", num_per_class=80),
        "source": "numpy:"
        + helpers.write_npz(root / "source.npz", num_per_class=20, num_classes=3, seed=4),
        "eval": "numpy:"
        + helpers.write_npz(root / "eval.npz", num_per_class=15, num_classes=3, seed=5),
        "backbone": helpers.saved_backbone(root / "backbone.keras"),
        "index_dir": str(root / "index"),
    }


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    """A 3-class classifier of the `eval` images' kind, trained enough to
    tell them apart, so that comparing evaluations means something."""
    keras.utils.set_random_seed(0)
    return helpers.saved_backbone(
        tmp_path_factory.mktemp("classifier") / "classifier.keras", pretrain_epochs=20
    )


def _flags(fields):
    """Command-line flags of config fields (`--name=value`, `--[no]name`)."""
    return [
        (f"--{name}" if value else f"--no{name}") if isinstance(value, bool) else f"--{name}={value}"
        for name, value in fields.items()
    ]


def _finetune_args(data, method, **fields):
    """`apps.finetune` flags of the small run of `method`, without the
    output directory and strategy. `val_fraction=0.15` leaves 9 validation
    images, fewer than a batch and odd: their batch splits 5 + 4 over the
    workers, which failed before the strategies took Keras' build batch."""
    fields = {
        **helpers.SMALL_RUN,
        "target": data["target"],
        "backbone": data["backbone"],
        "method": method,
        "verbose": 2,  # every worker prints its epochs, to compare
        "augment": "none",
        "batchnorm": "frozen",
        "val_fraction": 0.15,
        **METHODS[method],
        **fields,
    }
    if method == "sjft":
        fields.update(source=data["source"], index_dir=data["index_dir"])
    return [sys.executable, "-m", "apps.finetune", *_flags(fields)]


def _run(argv, timeout=_TIMEOUT_S):
    import subprocess

    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=helpers.REPO_ROOT)
    return subprocess.run(
        argv, cwd=helpers.REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )


def _log(log_dir, name):
    return (log_dir / f"{name}.log").read_text(errors="replace")


def _run_two_workers(argvs, log_dir, name="worker", ports=None):
    """Runs one app command line per worker; returns their logs."""
    processes = helpers.start_workers(argvs, log_dir, ports or helpers.free_ports(2), name=name)
    codes = helpers.wait_workers(processes, _TIMEOUT_S)
    logs = [_log(log_dir, f"{name}{index}") for index in range(2)]
    for index, code in enumerate(codes):
        assert code == 0, f"worker {index} exited with {code}:\n{logs[index][-4000:]}"
    return logs


def _files(directory):
    """Paths of the files under `directory`, relative to it."""
    return {
        os.path.relpath(os.path.join(root, name), directory)
        for root, _, names in os.walk(directory)
        for name in names
    }


def _epoch_logs(log):
    """The metrics Keras printed at the end of each epoch (no timings)."""
    return [
        dict(re.findall(r"(\w+): ([-+0-9.e]+)", line))
        for line in log.splitlines()
        if re.match(r"\d+/\d+ - ", line)
    ]


def _result_line(log, app="finetune"):
    pattern = r".* on numpy:.*: test accuracy .*" if app == "finetune" else r"accuracy .* images"
    lines = [line for line in log.splitlines() if re.fullmatch(pattern, line)]
    assert len(lines) == 1, log[-3000:]
    return lines[0]


def _best_loss(report):
    history = report["history"]
    key = "val_target_crossentropy" if "val_target_crossentropy" in history else "val_crossentropy"
    return min(history[key])


@pytest.mark.parametrize(
    "method, compose",
    [("baseline", None), ("sjft", None), ("filter_transfer", None), ("baseline", "antialias")],
    ids=["baseline", "sjft", "filter_transfer", "baseline-compose-antialias"],
)
def test_finetune_on_two_workers(data, method, compose, tmp_path):
    args = _finetune_args(data, method, **({"compose": compose} if compose else {}))
    # First, alone: it also builds the sjft index the workers then read.
    single = _run([*args, f"--output_dir={tmp_path / 'single'}", "--strategy=default"])
    assert single.returncode == 0, single.stderr[-4000:]
    outputs = [tmp_path / f"worker{index}" for index in range(2)]
    logs = _run_two_workers(
        [[*args, f"--output_dir={out}", "--strategy=multi_worker"] for out in outputs], tmp_path
    )

    # Only the chief wrote the run's outputs; the other worker only its scratch.
    expected = {"config.json", "model.keras", "report.json", "report.md", "saved_model/saved_model.pb"}
    if method == "sjft":
        expected.add("multitask.keras")
    assert expected <= _files(outputs[0])
    assert not any(path.startswith(".worker_scratch") for path in _files(outputs[0]))
    assert (outputs[1] / ".worker_scratch").is_dir()
    assert all(path.startswith(".worker_scratch/") for path in _files(outputs[1])), _files(outputs[1])
    assert "model: " in logs[0] and "model: " not in logs[1]

    # Both workers trained the same model: the same all-reduced metrics every
    # epoch, and the same test result (each evaluates the whole test split).
    epochs = _epoch_logs(logs[0])
    assert len(epochs) == helpers.SMALL_RUN["epochs"], logs[0][-3000:]
    assert _epoch_logs(logs[1]) == epochs
    assert _result_line(logs[1]) == _result_line(logs[0])

    chief = json.loads((outputs[0] / "report.json").read_text())
    alone = json.loads((tmp_path / "single" / "report.json").read_text())
    assert "2 replicas over 2 workers" in chief["strategy"]
    assert chief["train_examples"] == alone["train_examples"] and chief["val_examples"] == 9
    chief_loss, single_loss = _best_loss(chief), _best_loss(alone)
    print(f"{method} {compose}: two workers {chief_loss:.4f}, one process {single_loss:.4f}")
    assert single_loss < 0.6, single_loss  # it learned (chance is ln 2 = 0.69)
    np.testing.assert_allclose(chief_loss, single_loss, **MULTI_WORKER_TOLERANCE)


def test_evaluate_on_two_workers(data, classifier, tmp_path):
    # 12 test images in batches of 5: every batch splits unevenly over the
    # two workers (3 + 2, 3 + 2, 1 + 1).
    args = [
        sys.executable, "-m", "apps.evaluate", f"--model={classifier}",
        f"--data={data['eval']}", "--batch_size=5",
    ]
    single = _run([*args, f"--output_dir={tmp_path / 'single'}", "--strategy=default"])
    assert single.returncode == 0, single.stderr[-4000:]
    outputs = [tmp_path / f"worker{index}" for index in range(2)]
    logs = _run_two_workers(
        [[*args, f"--output_dir={out}", "--strategy=multi_worker"] for out in outputs], tmp_path
    )
    assert _files(outputs[0]) == {"evaluation.json", "evaluation.md"}
    assert not outputs[1].exists()
    assert "written by the chief worker" in logs[1]
    assert _result_line(logs[1], "evaluate") == _result_line(logs[0], "evaluate")
    assert _result_line(logs[0], "evaluate") == _result_line(single.stdout, "evaluate")

    chief = json.loads((outputs[0] / "evaluation.json").read_text())
    alone = json.loads((tmp_path / "single" / "evaluation.json").read_text())
    assert chief["num_examples"] == 12
    assert "2 replicas over 2 workers" in chief["strategy"]
    for key in ("num_examples", "accuracy", "balanced_accuracy", "per_class_accuracy",
                "confusion_matrix", "support", "class_names"):
        assert chief[key] == alone[key], key
    assert chief["accuracy"] > 0.5  # chance is 1/3


def _preemptible_args(data, run_dir):
    """A two-worker run long enough to be killed in the middle of an epoch
    (15 steps an epoch), the same command on both workers."""
    return _finetune_args(
        data, "baseline", target=data["large_target"], batch_size=8, epochs=6, patience=6,
        val_fraction=0.2, export=False,
    ) + [f"--output_dir={run_dir}", "--strategy=multi_worker"]


def _epoch(path):
    try:
        return json.loads(path.read_text())["epoch"]
    except (OSError, ValueError):  # not there yet, or being replaced
        return 0


def _start_and_kill(argv, run_dir, log_dir, ports, victim=1):
    """Starts both workers, SIGKILLs worker `victim` in the middle of the
    second epoch (after both saved the first epoch's checkpoint), then waits
    for the other as a cluster manager would, killing it if it hangs.

    Returns:
        `(the other worker's exit code, or None when it had to be killed;
        seconds it took to exit after the victim died)`.
    """
    processes = helpers.start_workers([argv, argv], log_dir, ports)
    chief_state = run_dir / "backup" / "state.json"
    worker_state = run_dir / ".worker_scratch" / "backup" / "state.json"
    try:
        deadline = time.monotonic() + _TIMEOUT_S
        while time.monotonic() < deadline and all(p.poll() is None for p in processes):
            if (
                _epoch(chief_state) >= 1
                and _epoch(worker_state) >= 1
                and "Epoch 2/" in _log(log_dir, "worker1")
            ):
                break
            time.sleep(0.05)
        assert all(p.poll() is None for p in processes), _log(log_dir, "worker0")[-3000:]
        time.sleep(0.3)  # into the epoch's steps
        processes[victim].send_signal(signal.SIGKILL)
        killed = time.monotonic()
        processes[victim].wait()
        try:
            code = processes[1 - victim].wait(timeout=_SURVIVOR_TIMEOUT_S)
        except Exception:  # noqa: BLE001 (subprocess.TimeoutExpired: it hangs)
            code = None
        return code, round(time.monotonic() - killed, 1)
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()


@pytest.mark.parametrize("victim", [1, 0], ids=["kill_worker", "kill_chief"])
def test_preempted_finetune_resumes_on_two_workers(data, victim, tmp_path):
    """SIGKILL one worker mid-epoch, let (or make) the other stop, restart
    both with the same command: the run resumes from its last checkpoint
    and ends where an uninterrupted two-worker run ends, within the
    tolerance the shuffle caveat of the module docstring calls for."""
    run_dir = tmp_path / "run"
    argv = _preemptible_args(data, run_dir)
    ports = helpers.free_ports(2)
    code, seconds = _start_and_kill(argv, run_dir, tmp_path, ports, victim)
    survivor = _log(tmp_path, f"worker{1 - victim}")
    # Observed: the survivor fails (its collectives are aborted: the peer's
    # heartbeats stop, or the chief's connection is reset) instead of
    # waiting in them; had it hung, it was killed above, as a cluster
    # manager must.
    print(f"worker {1 - victim} after worker {victim}'s SIGKILL: exit code {code} after {seconds} s")
    assert code != 0, survivor[-3000:]
    if code is not None:
        assert re.search(r"(Unavailable|DeadlineExceeded)Error", survivor), survivor[-3000:]
    assert not (run_dir / "report.json").exists()
    chief_epoch = _epoch(run_dir / "backup" / "state.json")
    print(f"checkpoint left after epoch {chief_epoch}")
    assert chief_epoch >= 1
    assert _epoch(run_dir / ".worker_scratch" / "backup" / "state.json") == chief_epoch

    # The cluster manager restarts both workers, same command, same cluster.
    logs = _run_two_workers([argv, argv], tmp_path, name="restarted", ports=ports)
    for log in logs:
        assert f"Resuming from the checkpoint after epoch {chief_epoch}." in log, log[-3000:]
        epochs = [line for line in log.splitlines() if line.startswith("Epoch ")]
        assert epochs[0] == f"Epoch {chief_epoch + 1}/6", epochs
    assert _epoch_logs(logs[1]) == _epoch_logs(logs[0])
    resumed = json.loads((run_dir / "report.json").read_text())
    assert resumed["resumed_from_epoch"] == chief_epoch
    assert not (run_dir / "backup").exists()

    reference_dir = tmp_path / "reference"
    _run_two_workers([_preemptible_args(data, reference_dir)] * 2, tmp_path, name="reference")
    reference = json.loads((reference_dir / "report.json").read_text())
    assert reference["epochs_run"] == resumed["epochs_run"] == 6
    print(f"best val_crossentropy resumed {_best_loss(resumed):.4f}, uninterrupted "
          f"{_best_loss(reference):.4f}")
    np.testing.assert_allclose(
        _best_loss(resumed), _best_loss(reference), **MULTI_WORKER_TOLERANCE
    )
    np.testing.assert_allclose(
        resumed["history"]["val_crossentropy"],
        reference["history"]["val_crossentropy"][chief_epoch:],
        **MULTI_WORKER_TOLERANCE,
    )


def test_workers_resuming_from_different_epochs_refuse_to_train(data, tmp_path):
    """A worker restarted without its checkpoint (another machine, a lost
    disk) would train from scratch beside a chief that resumes: both refuse
    with one line naming the remedy, and the remedy resumes the run."""
    run_dir = tmp_path / "run"
    argv = _preemptible_args(data, run_dir)
    code, _ = _start_and_kill(argv, run_dir, tmp_path, helpers.free_ports(2))
    assert code != 0
    chief_epoch = _epoch(run_dir / "backup" / "state.json")
    scratch = run_dir / ".worker_scratch" / "backup"
    shutil.move(scratch, tmp_path / "lost")

    processes = helpers.start_workers([argv, argv], tmp_path, helpers.free_ports(2), name="lagging")
    codes = helpers.wait_workers(processes, _TIMEOUT_S, grace=60)
    for index in range(2):
        log = _log(tmp_path, f"lagging{index}")
        assert codes[index] == 2, log[-3000:]
        assert (
            f"finetune: error: The workers' checkpoints are of different epochs: "
            f"[{chief_epoch}, 0]" in log
        ), log[-3000:]
        assert "Traceback" not in log and "Epoch " not in log
    assert _epoch(run_dir / "backup" / "state.json") == chief_epoch  # untouched

    # The remedy the message names: the chief's checkpoint for the others.
    shutil.copytree(run_dir / "backup", scratch)
    logs = _run_two_workers([argv, argv], tmp_path, name="remedied")
    for log in logs:
        assert f"Resuming from the checkpoint after epoch {chief_epoch}." in log, log[-3000:]
    assert json.loads((run_dir / "report.json").read_text())["resumed_from_epoch"] == chief_epoch
