"""Run ownership: `RunLock`, and the apps refusing a second run of one directory.

The lock is tested with real processes (`tests/run_lock_holder.py`, which
starts in a fraction of a second) holding, racing for and dying with the
lock; the apps with real `python -m apps.<name>` processes.
"""

import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
import warnings

import numpy as np
import pytest

from keras_seltransfer import training
from keras_seltransfer.retrieval import workflow
from keras_seltransfer.training import loop
from keras_seltransfer.utils import run_lock
from keras_seltransfer.utils.run_lock import RunLock
from keras_seltransfer.utils.run_lock import RunLockedError
from tests import helpers

ROOT = helpers.REPO_ROOT
HOLDER = os.path.join(ROOT, "tests", "run_lock_holder.py")
HOST = socket.gethostname()


class Holder:
    """A `run_lock_holder.py` process holding the lock of `directory`."""

    def __init__(self, directory, *args):
        self.process = subprocess.Popen(
            [sys.executable, HOLDER, str(directory), *args],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        self.line = self.process.stdout.readline()
        assert self.line.startswith("held "), self.line + self.process.stderr.read()
        self.record = json.loads(self.line[len("held "):])

    @property
    def pid(self):
        return self.process.pid

    def finish(self):
        """Lets the holder release the lock and exit normally."""
        self.process.communicate("\n", timeout=30)
        return self.process.returncode

    def kill(self):
        self.process.kill()
        self.process.communicate(timeout=30)


def _dead_pid():
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def _write_record(directory, **record):
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, run_lock.LOCK_FILE)
    with open(path, "w") as f:
        json.dump({"host": HOST, "pid": 1, "started": "2024-01-01T00:00:00+00:00", **record}, f)
    return path


# The lock in one process ----------------------------------------------------


def test_lock_file_names_the_owner_and_goes_on_normal_exit(tmp_path):
    directory = tmp_path / "run"
    with RunLock(directory) as lock:
        assert lock.path == os.path.join(str(directory), "run.lock")
        owner = run_lock.read_lock(lock.path)
        assert owner == lock.record
        assert (owner["host"], owner["pid"]) == (HOST, os.getpid())
        assert owner["started"] and owner["command"] and owner["process_start"] is not None
    assert not os.path.exists(lock.path)
    # The directory the lock made goes too while empty (a refused run leaves
    # nothing), and stays once the run wrote into it.
    assert not directory.exists()
    with RunLock(directory):
        (directory / "model.keras").write_bytes(b"x")
    assert sorted(os.listdir(directory)) == ["model.keras"]


@pytest.mark.parametrize("raised", [ValueError("bad input"), KeyboardInterrupt()])
def test_lock_is_released_on_error_and_keyboard_interrupt(tmp_path, raised):
    directory = tmp_path / "run"
    directory.mkdir()
    with pytest.raises(type(raised)):
        with RunLock(directory) as lock:
            assert os.path.exists(lock.path)
            raise raised
    assert os.listdir(directory) == []
    with RunLock(directory):  # free again
        pass


def test_nested_lock_in_one_thread_is_reentrant_another_thread_is_refused(tmp_path):
    with RunLock(tmp_path) as outer:
        with RunLock(tmp_path) as inner:
            assert inner.record["token"] == outer.record["token"]
        assert os.path.exists(outer.path)  # the outer run still owns it
        errors = []

        def other_thread():
            try:
                RunLock(tmp_path).acquire()
            except RunLockedError as e:
                errors.append(str(e))

        thread = threading.Thread(target=other_thread)
        thread.start()
        thread.join()
        assert len(errors) == 1 and "another thread of this process" in errors[0]
    assert not os.path.exists(outer.path)


def test_lock_arguments_are_checked():
    with pytest.raises(ValueError, match=r"`directory` must be a path\. Received: directory=''"):
        RunLock("")
    with pytest.raises(ValueError, match=r"`name` must be a file name\. Received: name='a/b'"):
        RunLock("x", name="a/b")
    with pytest.raises(ValueError, match=r"`timeout` must be None or >= 0\. Received: timeout=-1"):
        RunLock("x", timeout=-1)


def test_atomic_create_text_creates_once(tmp_path):
    from keras_seltransfer.utils.io import atomic_create_text

    path = tmp_path / "a" / "owner.txt"
    atomic_create_text(path, "first")
    with pytest.raises(FileExistsError, match="exists"):
        atomic_create_text(path, "second")
    assert path.read_text() == "first"
    assert os.listdir(tmp_path / "a") == ["owner.txt"]  # no temporary file left


# Owners in other processes and on other hosts -------------------------------


def test_live_owner_is_refused_and_named_even_with_force(tmp_path):
    holder = Holder(tmp_path / "run")
    try:
        for force in (False, True):
            with pytest.raises(RunLockedError) as info:
                RunLock(tmp_path / "run", force=force).acquire()
            message = str(info.value)
            assert f"is in use by another run (host {HOST}, pid {holder.pid}, started " in message
            assert holder.record["started"] in message
            assert f"its lock file is '{tmp_path / 'run' / 'run.lock'}'" in message
            assert "Wait for that run to finish, stop it, or pass another --output_dir" in message
        assert run_lock.read_lock(tmp_path / "run" / "run.lock") == holder.record
    finally:
        assert holder.finish() == 0
    assert not (tmp_path / "run" / "run.lock").exists()


def test_lock_of_a_killed_process_is_taken_over_with_a_warning(tmp_path):
    holder = Holder(tmp_path / "run")
    holder.kill()  # SIGKILL: no finally ran, the lock file stays
    assert (tmp_path / "run" / "run.lock").exists()
    with pytest.warns(UserWarning, match=rf"Took over the run directory .* from host {HOST}, "
                      rf"pid {holder.pid}, .*\(its process no longer exists\)"):
        with RunLock(tmp_path / "run") as lock:
            assert lock.replaced == holder.record
            assert run_lock.read_lock(lock.path)["pid"] == os.getpid()
    assert not (tmp_path / "run" / "run.lock").exists()


def test_stale_lock_of_a_dead_pid_or_a_reused_pid_is_taken_over(tmp_path):
    dead = _write_record(tmp_path / "dead", pid=_dead_pid())
    with pytest.warns(UserWarning, match=r"\(its process no longer exists\)"):
        RunLock(tmp_path / "dead").acquire().release()
    assert not os.path.exists(dead)
    # A live pid whose process started at another time: the pid was reused.
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        _write_record(tmp_path / "reused", pid=sleeper.pid, process_start=1)
        with pytest.warns(UserWarning, match=r"\(its pid now belongs to another process\)"):
            RunLock(tmp_path / "reused").acquire().release()
        # The same pid with its real start time is a live owner.
        start = run_lock._proc_stat(sleeper.pid)[1]
        _write_record(tmp_path / "alive", pid=sleeper.pid, process_start=start)
        with pytest.raises(RunLockedError, match=rf"in use by another run \(host {HOST}, "
                           rf"pid {sleeper.pid},"):
            RunLock(tmp_path / "alive").acquire()
    finally:
        sleeper.kill()
        sleeper.wait()


def test_lock_from_another_host_is_refused_unless_forced(tmp_path):
    path = _write_record(tmp_path, host="elsewhere.example", pid=4242)
    with pytest.raises(RunLockedError) as info:
        RunLock(tmp_path).acquire()
    message = str(info.value)
    assert "is locked by a run on another host (host elsewhere.example, pid 4242" in message
    assert f"cannot be checked from {HOST}" in message
    assert "pass --force (force=True) to take the directory over" in message
    assert run_lock.read_lock(path)["host"] == "elsewhere.example"  # untouched
    with pytest.warns(UserWarning, match=r"--force, its host elsewhere\.example cannot be checked"):
        with RunLock(tmp_path, force=True) as lock:
            assert lock.replaced["pid"] == 4242
            assert run_lock.read_lock(path)["host"] == HOST
    assert not os.path.exists(path)


def test_unreadable_lock_file_is_refused_unless_forced(tmp_path):
    path = tmp_path / "run.lock"
    path.write_text("not json")
    with pytest.raises(RunLockedError, match=r"has a lock file .* that is not a lock record "
                       r"\(it is not JSON: .*\): a run that is starting, or a file written by "
                       r"something else\. If no run uses the directory, delete the file"):
        RunLock(tmp_path).acquire()
    with pytest.raises(ValueError, match=r"is not a lock record: it is not JSON"):
        run_lock.read_lock(path)
    with pytest.warns(UserWarning, match=r"from an unreadable lock file"):
        RunLock(tmp_path, force=True).acquire().release()
    assert not path.exists()


def test_waiting_for_a_live_owner(tmp_path):
    holder = Holder(tmp_path, "--hold=1.0")
    messages = []
    start = time.monotonic()
    with pytest.raises(RunLockedError):
        RunLock(tmp_path, timeout=0.2).acquire()
    assert time.monotonic() - start < 0.9
    with RunLock(tmp_path, timeout=30, on_wait=messages.append) as lock:
        assert lock.replaced is None  # released by its owner, not taken over
    assert holder.process.wait(timeout=30) == 0
    assert len(messages) == 1 and f"pid {holder.pid}" in messages[0]


def test_two_processes_racing_for_one_lock_one_wins(tmp_path):
    """Processes that try at the same moment: exactly one holds the lock and
    every other is refused naming it, for a free lock and for a stale one
    (whose takeover must not let two runs in)."""
    for round_, stale in enumerate((False, True)):
        directory = tmp_path / f"round{round_}"
        if stale:
            _write_record(directory, pid=_dead_pid())
        at = time.time() + 0.5
        racers = [
            subprocess.Popen(
                [sys.executable, HOLDER, str(directory), f"--at={at}", "--hold=0.8"],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            )
            for _ in range(4)
        ]
        outputs = [racer.communicate(timeout=60) for racer in racers]
        lines = [out.splitlines()[0] if out else err for out, err in outputs]
        winners = [racer for racer, line in zip(racers, lines) if line.startswith("held ")]
        assert len(winners) == 1, lines
        for racer, line in zip(racers, lines):
            if racer is not winners[0]:
                assert racer.returncode == 3, line
                assert f"pid {winners[0].pid}," in line, line
        assert not (directory / "run.lock").exists()


def test_only_the_chief_takes_the_run_directory_lock(tmp_path, monkeypatch):
    config = helpers.small_run_config(output_dir=str(tmp_path / "run"))
    cluster = {"worker": ["127.0.0.1:1", "127.0.0.1:2"]}
    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": cluster, "task": {"type": "worker", "index": 1}}))
    holder = Holder(tmp_path / "run")
    try:
        # A worker writes only its scratch directory: it does not contend.
        with loop.run_directory_lock(config):
            assert run_lock.read_lock(tmp_path / "run" / "run.lock")["pid"] == holder.pid
        monkeypatch.setenv(
            "TF_CONFIG", json.dumps({"cluster": cluster, "task": {"type": "worker", "index": 0}})
        )
        with pytest.raises(RunLockedError, match=f"pid {holder.pid},"):
            with loop.run_directory_lock(config):
                pass
    finally:
        holder.finish()


def test_auto_run_held_by_another_is_refused_before_any_fold(tmp_path):
    holder = Holder(tmp_path / "run")
    try:
        config = helpers.small_run_config(
            method="auto", auto_candidates="linear_probe,baseline", target="numpy:/nowhere.npz",
            output_dir=str(tmp_path / "run"),
        )
        with pytest.raises(RunLockedError, match=rf"in use by another run \(host .*, pid {holder.pid},"):
            training.finetune(config)
        assert os.listdir(tmp_path / "run") == ["run.lock"]  # no fold started
    finally:
        holder.finish()


# The apps ---------------------------------------------------------------------

# Imports the app (seconds of TensorFlow start-up), says so, waits for a line
# on stdin, then runs it as `python -m apps.<name>` would, with the arguments.
_LAUNCH = (
    "import sys, runpy\n"
    "name = sys.argv[1]\n"
    "app = __import__(name, fromlist=['run'])\n"
    "print('ready', flush=True)\n"
    "sys.stdin.readline()\n"
    "sys.argv = [app.__file__] + sys.argv[2:]\n"
    "app.run()\n"
)


def _launch(app, *args, log):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=ROOT)
    process = subprocess.Popen(
        [sys.executable, "-c", _LAUNCH, app, *args],
        cwd=ROOT, env=env, stdin=subprocess.PIPE, stdout=open(log, "w"),
        stderr=subprocess.STDOUT, text=True,
    )
    return process


def _wait_for(predicate, what, timeout=120):
    deadline = time.time() + timeout
    while not predicate():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _go(process):
    process.stdin.write("\n")
    process.stdin.flush()


def test_second_finetune_on_a_running_directory_gets_one_clear_error(tmp_path):
    """Two `apps.finetune` on one --output_dir: the second, started while the
    first trains (after its first checkpoint), exits 2 with one line naming
    the owner; the first finishes with every output, and no checkpoint of
    it was touched."""
    target = helpers.write_npz(tmp_path / "target.npz", num_per_class=30, seed=1)
    backbone = helpers.saved_backbone(tmp_path / "backbone.keras", pretrain_epochs=0)
    run_dir = tmp_path / "run"
    args = [
        f"--target=numpy:{target}", f"--backbone={backbone}", f"--output_dir={run_dir}",
        "--image_size=16", "--batch_size=8", "--epochs=4", "--patience=4", "--verbose=2",
        "--noexport",
    ]
    first = _launch("apps.finetune", *args, "--notensorboard", log=tmp_path / "first.log")
    second = _launch("apps.finetune", *args, log=tmp_path / "second.log")
    try:
        for process, log in ((first, "first.log"), (second, "second.log")):
            _wait_for(lambda: "ready" in (tmp_path / log).read_text(), f"{log} ready")
        _go(first)
        # The first run is training: its checkpoint of epoch 1 is committed.
        _wait_for(lambda: (run_dir / "backup" / "state.json").exists(), "the first checkpoint")
        _go(second)
        assert second.wait(timeout=60) == 2
        assert first.poll() is None, "the first run ended before the second was refused"
        assert first.wait(timeout=300) == 0, (tmp_path / "first.log").read_text()[-3000:]
    finally:
        for process in (first, second):
            if process.poll() is None:
                process.kill()
    out = (tmp_path / "second.log").read_text()
    assert "Traceback" not in out
    errors = [line for line in out.splitlines() if line.startswith("finetune: error: ")]
    assert len(errors) == 1, out
    assert re.search(
        rf"is in use by another run \(host {re.escape(HOST)}, pid {first.pid}, started [^,]+, "
        rf"command: .*finetune.*\); its lock file is '{re.escape(str(run_dir / 'run.lock'))}'\. "
        r"Wait for that run to finish, stop it, or pass another --output_dir",
        errors[0],
    ), errors[0]
    log = (tmp_path / "first.log").read_text()
    assert "Epoch 4/4" in log and "test accuracy" in log
    assert sorted(os.listdir(run_dir)) == ["config.json", "model.keras", "report.json", "report.md"]
    report = json.loads((run_dir / "report.json").read_text())
    assert report["epochs_run"] == 4 and report["resumed_from_epoch"] == 0
    # The refused command wrote nothing: its settings (with TensorBoard) are not the record.
    assert json.loads((run_dir / "config.json").read_text())["tensorboard"] is False


def _index_config(tmp_path, **fields):
    return workflow.IndexConfig(
        source=f"numpy:{tmp_path / 'source.npz'}", target=f"numpy:{tmp_path / 'target.npz'}",
        bank="gabor", image_size=16, num_bins=8, k_max=5, progress=False,
        output_dir=str(tmp_path / "index"), **fields,
    )


def _index_data(tmp_path):
    helpers.write_npz(tmp_path / "source.npz", num_per_class=10, num_classes=3, seed=4)
    helpers.write_npz(tmp_path / "target.npz", num_per_class=12, seed=1)


def test_a_shard_in_use_is_refused_another_shard_runs(tmp_path):
    _index_data(tmp_path)
    shard0 = _index_config(tmp_path, num_shards=2, shard_index=0)
    shard1 = _index_config(tmp_path, num_shards=2, shard_index=1)
    lock = workflow.index_lock(shard0)
    assert lock.path == str(tmp_path / "index" / "shard-0-of-2.lock")
    holder = Holder(lock.directory, f"--name={os.path.basename(lock.path)}")
    try:
        outputs = workflow.build_neighbours(shard1)
        assert outputs["missing_shards"] == "shard-0-of-2"
        with pytest.raises(RunLockedError, match=rf"Shard 0 of 2 of the retrieval run '.*index' "
                           rf"is in use by another run \(host .*, pid {holder.pid},"):
            workflow.build_neighbours(shard0)
        # A merge owns the whole run: not a shard's lock.
        with pytest.raises(ValueError, match=r"Cannot merge: 1 of 2 shards are not finished"):
            workflow.build_neighbours(shard0, merge_only=True)
    finally:
        holder.finish()
    outputs = workflow.build_neighbours(shard0)
    assert "neighbours" in outputs
    assert not [name for name in os.listdir(tmp_path / "index") if name.endswith(".lock")]


def test_an_unsharded_index_in_use_is_refused(tmp_path):
    _index_data(tmp_path)
    config = _index_config(tmp_path)
    holder = Holder(tmp_path / "index")
    try:
        with pytest.raises(RunLockedError, match=rf"The retrieval run '.*index' is in use by "
                           rf"another run \(host .*, pid {holder.pid},"):
            workflow.build_neighbours(config)
        assert os.listdir(tmp_path / "index") == ["run.lock"]  # nothing written
    finally:
        holder.finish()


def test_sjft_run_waits_for_another_building_its_shared_index(tmp_path, capsys):
    from keras_seltransfer.methods import sjft

    _index_data(tmp_path)
    config = training.FinetuneConfig(
        method="sjft", target=f"numpy:{tmp_path / 'target.npz'}",
        source=f"numpy:{tmp_path / 'source.npz'}", index_dir=str(tmp_path / "index"),
        index_bank="gabor", k0=2, k_max=5, image_size=16, verbose=1,
    )
    _, _, train_ids, _ = training.finetune_split(config)
    holder = Holder(tmp_path / "index", "--hold=1.0")  # "another run building it"
    start = time.monotonic()
    neighbour_ids, built = sjft.load_neighbours(config, train_ids)
    assert time.monotonic() - start >= 0.5
    assert holder.process.wait(timeout=30) == 0
    assert neighbour_ids.shape == (len(train_ids), 5) and built.bank == "gabor"
    out = capsys.readouterr().out
    assert f"Waiting: The retrieval run '{tmp_path / 'index'}' is in use by another run" in out
    assert f"pid {holder.pid}," in out


@pytest.mark.slow
def test_build_index_shards_in_parallel_and_one_shard_twice(tmp_path):
    """Real `apps.build_index` processes: shards 0 and 1 of one index at the
    same time both finish; shard 0 started twice at once gives one result
    and one clear error."""
    _index_data(tmp_path)
    common = [
        f"--source=numpy:{tmp_path / 'source.npz'}", f"--target=numpy:{tmp_path / 'target.npz'}",
        "--bank=gabor", "--image_size=16", "--num_bins=8", "--k_max=5", "--noprogress",
        f"--output_dir={tmp_path / 'index'}", "--num_shards=2",
    ]
    processes = [
        _launch("apps.build_index", *common, f"--shard_index={shard}", log=tmp_path / f"{i}.log")
        for i, shard in enumerate((0, 1, 0))
    ]
    try:
        for i in range(3):
            _wait_for(lambda: "ready" in (tmp_path / f"{i}.log").read_text(), f"{i}.log ready")
        for process in processes:
            _go(process)
        codes = [process.wait(timeout=300) for process in processes]
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
    logs = [(tmp_path / f"{i}.log").read_text() for i in range(3)]
    assert codes[1] == 0, logs[1]
    assert sorted((codes[0], codes[2])) == [0, 2], logs
    loser = logs[0] if codes[0] == 2 else logs[2]
    errors = [line for line in loser.splitlines() if line.startswith("build_index: error: ")]
    assert len(errors) == 1 and "Traceback" not in loser, loser
    assert re.search(r"Shard 0 of 2 of the retrieval run '.*index' is in use by another run", errors[0])
    workflow.build_neighbours(_index_config(tmp_path, num_shards=2), merge_only=True)
    target_ids, neighbour_ids, _ = workflow.read_neighbours(tmp_path / "index" / "neighbours.npz")
    assert neighbour_ids.shape == (len(target_ids), 5)
    assert np.all(neighbour_ids >= 0)

