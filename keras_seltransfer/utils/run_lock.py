"""Run ownership: one live run per output directory, through a lock file.

Two processes writing one run directory destroy each other's work: each
training run prunes the checkpoint files it does not know, so one of two
runs started with the same `--output_dir` dies on a weights file the other
deleted. A run therefore takes its directory before it writes anything, by
creating `<directory>/run.lock`, a JSON record naming the owner:

```json
{"host": "gpu-3", "pid": 4242, "started": "2025-05-01T09:30:00+02:00",
 "process_start": 1234567, "boot_id": "...", "command": "...", "token": "..."}
```

and removes it when it ends, normally or on an error or KeyboardInterrupt
(`RunLock` is a context manager that removes the file on leaving its
block, whatever ends it; `atexit` would only run when the interpreter
exits, not when a library call fails in a longer program). A process that
is killed (SIGKILL, an out-of-memory kill, or SIGTERM, which Python does not
turn into an exception) removes nothing; its lock file is then found stale
(below) and taken over by the next run.

How the lock is taken, and why this way. Two mechanisms are combined:

- The record is created with `atomic_create_text`: written to a temporary
  file and hard-linked to `run.lock`. `link` fails when the name exists,
  also on NFS, so of two processes starting at the same moment exactly one
  creates the file, and the record is complete the moment it is visible
  (`O_CREAT | O_EXCL` alone would publish an empty file first, and older
  NFS clients do not honour it).
- The owner then holds `fcntl.flock` on the file for as long as it runs.
  The kernel releases a flock when its process dies, however it dies
  (SIGKILL, an out-of-memory kill, a crash), so on one host a lock file
  whose flock is free belongs to a dead run, with no guessing; the recorded
  pid is checked as well (`os.kill(pid, 0)`, and the start time of the
  process in `/proc/<pid>/stat` against pid reuse, and the boot id against
  a reboot), which also covers file systems where flock does nothing.
  The descriptor is not inherited by programs the run starts (`exec`);
  a child forked without `exec` shares it, and the lock then lasts while
  either runs.
  Replacing a dead owner's record needs its flock, held while the new
  record is renamed over the old one (`atomic_write_text`), so two runs
  taking over one stale lock cannot both win.

flock alone would need the record written in place (a reader could see it
half-written) and cannot tell "stale" from "another host whose locks this
host does not see"; O_EXCL alone must guess staleness from the pid, and its
takeover of a stale file races. Together, the creation is exclusive
everywhere and the staleness is the kernel's answer where there is one.

Hosts are told apart by their host name (`socket.gethostname()`), so
machines sharing a file system need distinct names. What cannot be decided
is refused: a record from another host (its process cannot be checked from
here, and NFS mounted with `nolock` or `local_lock=flock` shares no locks
between hosts) or a file that is not a readable record. `force=True`
(`--force`) takes such a directory over; a lock whose process is running on
this host is never taken over.

NFS: link is atomic on NFS; flock is forwarded to the server by Linux
clients (as a POSIX lock over the whole file) unless the mount says
otherwise. A host that crashed while holding a lock on NFSv3 may keep it
until that host reboots, and on NFSv4 until its lease expires; meanwhile
other hosts are refused, and `--force` is the way out once the owner is
known to be gone.
"""

import datetime
import errno
import json
import os
import shlex
import socket
import sys
import threading
import time
import uuid
import warnings

from keras_seltransfer.utils.io import atomic_create_text
from keras_seltransfer.utils.io import atomic_write_text

try:
    import fcntl
except ImportError:  # Windows: no flock; the record and the pid decide.
    fcntl = None

# The name of the lock file in a run directory.
LOCK_FILE = "run.lock"

# Seconds between two looks at a lock while waiting for it.
_POLL_SECONDS = 0.5
# A lock that is being taken over is in flux for a moment: looks again
# this often before answering from what it saw.
_SETTLE_TRIES = 10
_SETTLE_SECONDS = 0.05

# Locks this process holds, by the lock file's real path: a run nested in
# another of the same directory (the final training run of --method=auto)
# holds it once more instead of waiting for itself. Process-wide by nature,
# as the locks themselves are.
_HELD = {}
_HELD_GUARD = threading.Lock()


class RunLockedError(FileExistsError):
    """A run directory is owned by another run (or its owner cannot be checked).

    The message names the owner (host, pid, start time, command), the lock
    file, and what to do. The apps report it as one line
    (`finetune: error: ...`, exit status 2).

    Example:

    ```python
    try:
        with RunLock("runs/a"):
            ...
    except RunLockedError as error:
        print(error)  # The run directory 'runs/a' is in use by another run ...
    ```
    """


def _boot_id():
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
            return f.read().strip() or None
    except OSError:
        return None


def _proc_stat(pid):
    """`(state, start time in clock ticks since boot)` of a process, or None."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may hold anything.
    fields = data[data.rindex(b")") + 2:].split()
    try:
        return fields[0].decode("ascii", "replace"), int(fields[19])
    except (IndexError, ValueError):
        return None


def _own_record():
    stat = _proc_stat(os.getpid())
    command = " ".join(shlex.quote(arg) for arg in sys.argv)
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "process_start": None if stat is None else stat[1],
        "boot_id": _boot_id(),
        "command": command[:300],
        "token": uuid.uuid4().hex,
    }


def _parse_record(data):
    """The record in `data` (bytes) and None, or None and what is wrong."""
    if not data.strip():
        return None, "it is empty"
    try:
        record = json.loads(data.decode("utf-8"))
    except ValueError as e:
        return None, f"it is not JSON: {e}"
    if not isinstance(record, dict):
        return None, f"it holds a JSON {type(record).__name__}, not an object"
    pid = record.get("pid")
    if not isinstance(record.get("host"), str) or not isinstance(pid, int) or isinstance(pid, bool):
        return None, "it names no host and pid"
    return record, None


def read_lock(path):
    """The owner record in a lock file, or None when there is none.

    Args:
        path: the lock file (`<run directory>/run.lock`).

    Returns:
        The record as a dict (`host`, `pid`, `started`, `command`, ...), or
        None when the file does not exist.

    Raises:
        ValueError: if the file is not a lock record (naming the file).

    Example:

    ```python
    owner = read_lock("runs/a/run.lock")
    if owner is not None:
        print(f"runs/a is held by pid {owner['pid']} on {owner['host']}")
    ```
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return None
    record, problem = _parse_record(data)
    if record is None:
        raise ValueError(f"The lock file {os.fspath(path)!r} is not a lock record: {problem}.")
    return record


def _describe(record):
    text = f"host {record['host']}, pid {record['pid']}, started {record.get('started', '?')}"
    if record.get("command"):
        text += f", command: {record['command']}"
    return text


def _process_gone(record):
    """Why the process of a record from this host is gone, or None if it runs."""
    pid = record["pid"]
    if pid <= 0:
        return f"its pid {pid} names no process"
    boot, now = record.get("boot_id"), _boot_id()
    if boot and now and boot != now:
        return "the host has restarted since"
    if os.name == "nt":
        return None  # os.kill(pid, 0) would interrupt the process there
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return "its process no longer exists"
    except PermissionError:
        pass  # it exists, run by another user
    stat = _proc_stat(pid)
    if stat is not None:
        state, start = stat
        if state == "Z":
            return "its process has exited"
        if record.get("process_start") is not None and start != record["process_start"]:
            return "its pid now belongs to another process"
    return None


def _try_flock(fd):
    """True: flock taken; False: another holds it; None: not supported here."""
    if fcntl is None:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    except OSError as e:
        if e.errno in (errno.EAGAIN, errno.EACCES):
            return False
        # ENOLCK, EOPNOTSUPP, EBADF (NFS, a read-only descriptor), EINVAL.
        return None


def _flock_wait(fd):
    if fcntl is None:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
    except OSError as e:
        if e.errno in (errno.EAGAIN, errno.EACCES, errno.EINTR):
            raise
        # Not supported here: the record alone says who owns the directory.


def _same_file(fd, path):
    try:
        named = os.stat(path)
    except FileNotFoundError:
        return False
    opened = os.fstat(fd)
    return (opened.st_dev, opened.st_ino) == (named.st_dev, named.st_ino)


def _read_fd(fd):
    os.lseek(fd, 0, os.SEEK_SET)
    chunks = []
    while True:
        chunk = os.read(fd, 65536)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def _open_existing(path):
    try:
        return os.open(path, os.O_RDWR)
    except PermissionError:
        # Another user's lock file: a read-only descriptor still takes a
        # local flock (not an NFS one: then the record alone decides).
        return os.open(path, os.O_RDONLY)


class _Refusal:
    """Why the lock was not taken, and whether waiting may help."""

    def __init__(self, message, waitable=True, settling=False):
        self.message = message
        self.waitable = waitable
        self.settling = settling


class RunLock:
    """Owns a run directory for as long as a run writes it.

    Taking the lock creates `<directory>/<name>` holding this process's
    host, pid, start time and command; releasing it removes the file. A
    second run of the same directory is refused with a `RunLockedError`
    naming the owner and the lock file, unless the owner is gone: a lock
    whose process no longer runs on this host (checked through the lock
    file's flock and the recorded pid and process start time) is taken
    over with a warning naming the dead owner. A lock from another host,
    whose process cannot be checked from here, or an unreadable lock file,
    is refused unless `force=True`; a lock of a process running on this
    host is refused even then. The module docstring explains the protocol
    (hard-linked creation, flock held for the run's lifetime) and its NFS
    caveats.

    Within one process the lock is re-entrant on one thread: a run nested
    in another of the same directory (the final run of `--method=auto`)
    holds it again instead of waiting for itself; another thread is
    refused. Directories the lock creates are removed on release when they
    are still empty, so a run refused on bad input leaves nothing behind.

    Under a multi-worker strategy only the chief takes the lock of the run
    directory (see `keras_seltransfer.training.loop.run_directory_lock`).

    Args:
        directory: the run directory (created if missing).
        name: the lock file's name in it (build_index shards have their own).
        force: take over a lock whose owner cannot be checked (another host,
            an unreadable file). Use it only when you know that run is gone:
            a run that is still writing, taken over, mixes its outputs with
            this run's.
        timeout: seconds to wait for a live owner to finish before
            refusing; 0 refuses at once, None waits as long as it takes.
        on_wait: called once with the refusal message when waiting begins
            (to tell the user why nothing happens), or None.
        what: how messages name what is locked; default
            `"the run directory '<directory>'"`.

    Attributes:
        path: the lock file.
        record: this run's record once the lock is held.
        replaced: the record of the owner this lock took over (stale, or
            with `force`), or None.

    Raises:
        ValueError: for an empty `directory`, a `name` with a path
            separator, or a negative `timeout`.

    Example:

    ```python
    with RunLock("runs/a") as lock:  # RunLockedError if another run has it
        train_and_write_outputs("runs/a")
    # runs/a/run.lock is gone again, also after an error
    ```
    """

    def __init__(
        self, directory, *, name=LOCK_FILE, force=False, timeout=0.0, on_wait=None, what=None
    ):
        if not directory:
            raise ValueError(f"`directory` must be a path. Received: directory={directory!r}")
        if not name or os.sep in name or (os.altsep and os.altsep in name) or name in (".", ".."):
            raise ValueError(f"`name` must be a file name. Received: name={name!r}")
        if timeout is not None and not timeout >= 0:
            raise ValueError(f"`timeout` must be None or >= 0. Received: timeout={timeout!r}")
        self.directory = os.fspath(directory)
        self.path = os.path.join(self.directory, name)
        self.force = bool(force)
        self.timeout = timeout
        self.on_wait = on_wait
        self.what = what or f"the run directory {self.directory!r}"
        self.record = None
        self.replaced = None
        self._key = None

    @property
    def held(self):
        """Whether this object holds the lock now."""
        return self._key is not None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc_info):
        self.release()

    def acquire(self):
        """Takes the lock (see the class docstring); returns `self`.

        Raises:
            RunLockedError: if another run owns the directory.
        """
        if self._key is not None:
            raise RuntimeError(f"This RunLock already holds {self.path!r}.")
        created = _make_directories(self.directory)
        key = os.path.realpath(self.path)
        with _HELD_GUARD:
            entry = _HELD.get(key)
            if entry is not None:
                if entry["thread"] != threading.get_ident():
                    raise RunLockedError(
                        f"{_capitalised(self.what)} is in use by another thread of this "
                        f"process (pid {os.getpid()}); one directory takes one run at a time."
                    )
                entry["depth"] += 1
                self._key, self.record = key, entry["record"]
                return self
        try:
            fd = self._take()
        except BaseException:
            _remove_directories(created)
            raise
        with _HELD_GUARD:
            _HELD[key] = {
                "thread": threading.get_ident(), "depth": 1, "record": self.record,
                "fd": fd, "path": self.path, "created": created,
            }
        self._key = key
        return self

    def release(self):
        """Gives the directory up: removes the lock file (unless another run
        took it over meanwhile) and the empty directories `acquire` made.
        Does nothing when the lock is not held."""
        if self._key is None:
            return
        with _HELD_GUARD:
            entry = _HELD[self._key]
            entry["depth"] -= 1
            if entry["depth"] > 0:
                self._key = None
                return
            del _HELD[self._key]
        self._key = None
        try:
            try:
                current = read_lock(entry["path"])
            except (ValueError, OSError):
                current = {}  # unreadable: another's, or garbage; not ours to remove
            if current and current.get("token") == entry["record"]["token"]:
                # Removed before the flock is let go, so a run waiting for
                # the flock finds the name free, not a stale file.
                os.remove(entry["path"])
            else:
                warnings.warn(
                    f"The lock file {entry['path']!r} no longer names this run "
                    f"({_now_holds(current)}): "
                    "another run took the directory over while this one held it.",
                    stacklevel=2,
                )
        finally:
            os.close(entry["fd"])
            _remove_directories(entry["created"])

    def _take(self):
        """Creates or takes over the lock file; returns the held descriptor."""
        record = _own_record()
        text = json.dumps(record, indent=1) + "\n"
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        settling, waiting = 0, False
        while True:
            try:
                atomic_create_text(self.path, text)
            except FileExistsError:
                outcome = self._take_over(text)
            else:
                outcome = True
            if outcome is True:
                fd = self._hold(record)
                if fd is not None:
                    self.record = record
                    return fd
                continue
            if outcome is None:
                continue  # the file changed under us: look again
            if outcome.settling and settling < _SETTLE_TRIES:
                settling += 1
                time.sleep(_SETTLE_SECONDS)
                continue
            if not outcome.waitable or (deadline is not None and time.monotonic() >= deadline):
                raise RunLockedError(outcome.message)
            if not waiting and self.on_wait is not None:
                self.on_wait(outcome.message)
            waiting, settling = True, 0
            time.sleep(_POLL_SECONDS)

    def _take_over(self, text):
        """Looks at the existing lock file and replaces it when its owner is
        gone (or with `force`). Returns True when replaced, None to look
        again, or a `_Refusal`."""
        try:
            fd = _open_existing(self.path)
        except FileNotFoundError:
            return None  # released meanwhile
        try:
            flock = _try_flock(fd)
            if flock is True and not _same_file(fd, self.path):
                return None  # replaced or removed meanwhile
            owner, problem = _parse_record(_read_fd(fd))
            here = socket.gethostname()
            where = _capitalised(self.what)
            if owner is None:
                if flock is False:
                    return _Refusal(
                        f"{where} is locked by a process that holds {self.path!r}, which is "
                        f"not a lock record ({problem}). Wait for it, or use another "
                        "--output_dir.", settling=True,
                    )
                if not self.force:
                    return _Refusal(
                        f"{where} has a lock file {self.path!r} that is not a lock record "
                        f"({problem}): a run that is starting, or a file written by something "
                        "else. If no run uses the directory, delete the file or pass --force "
                        "(force=True).", settling=True,
                    )
                reason = f"--force, the lock file was unreadable ({problem})"
            elif owner["host"] == here:
                gone = _process_gone(owner)
                if gone is None:
                    return _Refusal(
                        f"{where} is in use by another run ({_describe(owner)}); its lock file "
                        f"is {self.path!r}. Wait for that run to finish, stop it, or pass "
                        "another --output_dir. --force does not take over a lock whose "
                        "process is still running."
                    )
                if flock is False and not self.force:
                    # The pid is gone but the flock is held: a run taking
                    # over right now, or a child that inherited the lock.
                    return _Refusal(
                        f"{where} is locked by a process that holds {self.path!r}, although "
                        f"its recorded owner is gone ({_describe(owner)}: {gone}). Wait for "
                        "that process, or pass --force (force=True) if nothing writes the "
                        "directory.", settling=True,
                    )
                reason = gone
            elif not self.force:
                holds = " and holds its lock" if flock is False else ""
                return _Refusal(
                    f"{where} is locked by a run on another host ({_describe(owner)}){holds}; "
                    f"its lock file is {self.path!r}. Whether that run is still going cannot "
                    f"be checked from {here}. Wait for it to finish, or pass another "
                    "--output_dir; if you know that run is gone (its host crashed or was "
                    "shut down), pass --force (force=True) to take the directory over. "
                    "Taking over a run that is still writing mixes the outputs of two runs."
                )
            else:
                reason = f"--force, its host {owner['host']} cannot be checked from {here}"
            atomic_write_text(self.path, text)
            self.replaced = owner or {}
            owner_text = _describe(owner) if owner else "an unreadable lock file"
            warnings.warn(
                f"Took over {self.what} from {owner_text} "
                f"({reason}); its outputs and checkpoint stay and are reused or replaced "
                "as by any rerun.",
                stacklevel=4,
            )
            return True
        finally:
            # Closing lets the old inode's flock go only after the new
            # record is in place: two runs taking over one stale lock
            # cannot both win.
            os.close(fd)

    def _hold(self, record):
        """Opens and flocks the lock file just written; the descriptor, or
        None when the file no longer holds `record` (taken over meanwhile)."""
        try:
            fd = os.open(self.path, os.O_RDWR)
        except FileNotFoundError:
            return None
        try:
            # Others only look at the file under its flock, briefly.
            _flock_wait(fd)
            owner, _ = _parse_record(_read_fd(fd))
            if _same_file(fd, self.path) and owner is not None and (
                owner.get("token") == record["token"]
            ):
                return fd
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)
        return None


def _now_holds(record):
    if record is None:
        return "it was removed"
    if not record:
        return "it is unreadable now"
    return f"it now names {_describe(record)}"


def _capitalised(text):
    return text[:1].upper() + text[1:]


def _make_directories(directory):
    """Makes `directory` and its missing parents; returns those it made,
    deepest first."""
    missing = []
    path = os.path.abspath(directory)
    while not os.path.isdir(path):
        missing.append(path)
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    os.makedirs(directory, exist_ok=True)
    return missing


def _remove_directories(created):
    for path in created:
        try:
            os.rmdir(path)
        except OSError:
            return  # not empty: something else lives there now


__all__ = ["LOCK_FILE", "RunLock", "RunLockedError", "read_lock"]
