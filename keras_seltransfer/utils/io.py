"""Atomic writes, and reading back what they wrote without trusting it.

Writers publish a file or directory only once it is complete, so readers see
the old output or the new one, never half of one. `load_npz` reads NumPy
archives from anywhere (a run directory, a download) without running code
and `load_json_object` JSON records, both with errors that name the file.
"""

import contextlib
import errno
import functools
import io
import json
import os
import shutil
import tempfile
import zipfile

import numpy as np


@functools.cache
def _umask():
    # Reading the umask means setting it; done once, as the process starts
    # writing, rather than on every write.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def default_permissions(path):
    """Gives `path` the mode a plain `open` or `mkdir` would have given it.

    `tempfile` creates files 0600 and directories 0700; an atomically
    published output should be as readable as one written directly
    (0644 and 0755 under the usual umask of 022).

    Example:

    ```python
    fd, tmp = tempfile.mkstemp()  # created 0600
    os.close(fd)
    default_permissions(tmp)  # now 0644 under a umask of 022
    ```
    """
    base = 0o777 if os.path.isdir(path) else 0o666
    os.chmod(path, base & ~_umask())


def npz_bytes(arrays):
    """The bytes of an uncompressed NumPy `.npz` archive of `arrays`.

    Pass them to `atomic_write_bytes` to publish the archive in one step.

    Args:
        arrays: a dict `{name: array}`.

    Returns:
        The archive as `bytes`.

    Example:

    >>> data = npz_bytes({"x": np.arange(3)})
    >>> np.load(io.BytesIO(data))["x"].tolist()
    [0, 1, 2]
    """
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def atomic_write_bytes(path, data):
    """Writes `data` to `path` through a temporary file and an atomic rename.

    Args:
        path: destination file. Its parent directory is created if missing.
        data: the bytes to write.

    Example:

    ```python
    atomic_write_bytes("runs/a/weights.bin", np.zeros(4, "float32").tobytes())
    ```
    """
    path = os.fspath(path)
    tmp = _temporary_copy(path, data)
    try:
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def _temporary_copy(path, data):
    """A new hidden file beside `path` holding `data`, synced to disk, with
    the default permissions: its name is returned (the caller publishes or
    removes it)."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(
        prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=directory
    )
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        default_permissions(tmp)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise
    return tmp


def atomic_write_text(path, text, encoding="utf-8"):
    """Writes `text` to `path` atomically (see `atomic_write_bytes`).

    Example:

    ```python
    atomic_write_text("runs/a/report.json", json.dumps({"accuracy": 0.9}))
    ```
    """
    atomic_write_bytes(path, text.encode(encoding))


def atomic_create_bytes(path, data):
    """Publishes `data` at `path` in one step, only if `path` does not exist.

    Like `atomic_write_bytes`, the bytes go to a temporary file beside
    `path` first; it is then hard-linked to `path` instead of renamed over
    it. `link` fails when the name exists and is atomic also on NFS, so of
    processes racing to create `path` exactly one succeeds, and no reader
    ever sees the file partly written (this is the way `open(2)` recommends
    for lock files on NFS, including its check of the link count for a
    reply lost on the way). On a file system without hard links it falls
    back to `O_CREAT | O_EXCL`, still exclusive but written in place.

    Args:
        path: destination file. Its parent directory is created if missing.
        data: the bytes to write.

    Raises:
        FileExistsError: if `path` exists (nothing is written).

    Example:

    ```python
    atomic_create_bytes("runs/a/owner.txt", b"me")  # creates the file
    atomic_create_bytes("runs/a/owner.txt", b"you")  # FileExistsError; still "me"
    ```
    """
    path = os.fspath(path)
    tmp = _temporary_copy(path, data)
    try:
        try:
            os.link(tmp, path)
        except OSError as error:
            if os.stat(tmp).st_nlink == 2:
                return  # linked; only the reply was lost (NFS)
            if error.errno == errno.EEXIST:
                raise FileExistsError(f"{path!r} exists.") from None
            if error.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP):
                raise
            _create_in_place(path, data)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)


def _create_in_place(path, data):
    # No hard links here (FAT, some FUSE and SMB mounts): exclusive, but a
    # reader may see the file before its bytes.
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except FileExistsError:
        raise FileExistsError(f"{path!r} exists.") from None
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def atomic_create_text(path, text, encoding="utf-8"):
    """Creates `path` holding `text`, atomically and only if it does not
    exist (see `atomic_create_bytes`).

    Raises:
        FileExistsError: if `path` exists.

    Example:

    ```python
    atomic_create_text("runs/a/run.lock", json.dumps({"pid": os.getpid()}))
    ```
    """
    atomic_create_bytes(path, text.encode(encoding))


@contextlib.contextmanager
def atomic_directory(path, overwrite=True):
    """Yields a temporary directory that replaces `path` only on success.

    Everything is written into a sibling temporary directory; when the
    `with` block exits normally the old `path` (if any) is moved aside, the
    new directory is renamed into place and the old one is deleted. If the
    block raises, the temporary directory is removed and `path` is left as it
    was.

    Args:
        path: the final directory.
        overwrite: when False, an existing `path` raises `FileExistsError`
            before anything is written.

    Yields:
        The temporary directory path to write into.

    Example:

    ```python
    with atomic_directory("runs/a/export") as tmp:
        atomic_write_text(os.path.join(tmp, "class_names.json"), "[]")
    # "runs/a/export" now holds class_names.json; had the block raised, it
    # would still hold what it held before.
    ```
    """
    path = os.path.abspath(os.fspath(path))
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(
            f"Refusing to overwrite existing output directory: {path}"
        )
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix="." + os.path.basename(path) + ".", dir=parent)
    try:
        yield tmp
        default_permissions(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if os.path.exists(path):
        old = tempfile.mkdtemp(
            prefix="." + os.path.basename(path) + ".old.", dir=parent
        )
        os.rmdir(old)
        os.replace(path, old)
    os.replace(tmp, path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def save_model_atomic(model, path):
    """Saves a Keras model to a `.keras` file atomically.

    Keras writes the archive to a temporary file beside `path` (which must
    end in `.keras`), then it is renamed over `path`.

    Example:

    ```python
    save_model_atomic(model, "runs/a/model.keras")
    ```
    """
    path = os.fspath(path)
    if not path.endswith(".keras"):
        raise ValueError(f"Model files must end in '.keras'. Received: path={path!r}")
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(
        prefix="." + os.path.basename(path) + ".", suffix=".keras", dir=directory
    )
    os.close(fd)
    try:
        model.save(tmp, overwrite=True)
        default_permissions(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def load_json_object(path, what, remedy=""):
    """Reads a JSON file that must hold an object (a dict).

    Args:
        path: the file.
        what: how errors name it, e.g. `f"checkpoint state file {path!r}"`
            (the path included, so the phrase can go on, as in "run report
            '...' beside --model").
        remedy: appended to every error, e.g. "; delete it to start afresh".

    Returns:
        The parsed dict.

    Raises:
        ValueError: if the file is not UTF-8 JSON, or holds something other
            than an object.

    Example:

    ```python
    state = load_json_object(
        "runs/a/state.json",
        "checkpoint state file 'runs/a/state.json'",
        remedy="; delete it to start afresh",
    )
    ```
    """
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except ValueError as e:  # json.JSONDecodeError and UnicodeDecodeError
        raise ValueError(f"The {what} is not valid JSON ({e}){remedy}.") from e
    if not isinstance(value, dict):
        raise ValueError(
            f"Expected the {what} to be a JSON object. "
            f"Received: a JSON {type(value).__name__}{remedy}."
        )
    return value


# What `np.load` raises for a file that is not a readable archive: zip
# damage, a truncated member, bytes that look like a pickle, a short file.
_UNREADABLE_NPZ = (OSError, ValueError, EOFError, zipfile.BadZipFile, zipfile.LargeZipFile)


def load_npz(path, required=(), what="NumPy archive"):
    """Reads every array of an `.npz` archive, refusing anything but arrays.

    Pickled objects are never loaded (`allow_pickle=False`), so an archive
    from an untrusted source cannot run code. Every array is read in full,
    which checks the zip CRCs: a truncated or tampered archive raises here,
    not later. Errors name the file and what was wrong with it.

    Args:
        path: the `.npz` file.
        required: names of arrays the archive must hold.
        what: how the file is called in errors (e.g. `"neighbour index"`).

    Returns:
        A dict of array name to NumPy array.

    Raises:
        FileNotFoundError: if `path` is not a file.
        ValueError: if the file is not a readable `.npz` archive (empty,
            truncated, corrupt, a single `.npy` array, pickled objects) or
            lacks a required array.

    Example:

    >>> arrays = load_npz("run/neighbours.npz", required=("neighbour_ids",))  # doctest: +SKIP
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} {path!r} not found (expected an .npz file).")
    try:
        data = np.load(path, allow_pickle=False)
    except _UNREADABLE_NPZ as error:
        raise ValueError(
            f"{what} {path!r} is not a readable .npz archive ({_npz_reason(path, error)})."
        ) from error
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise ValueError(
            f"Expected {what} {path!r} to be an .npz archive of named arrays. "
            f"Received: a single {type(data).__name__} (an .npy file)"
        )
    with data:
        try:
            arrays = {name: data[name] for name in data.files}
        except _UNREADABLE_NPZ as error:
            raise ValueError(
                f"{what} {path!r} is corrupt ({_npz_reason(path, error)})."
            ) from error
    missing = [name for name in required if name not in arrays]
    if missing:
        raise ValueError(
            f"Expected {what} {path!r} to hold the arrays {list(required)}; it "
            f"holds {sorted(arrays)}. Missing: {missing}"
        )
    return arrays


def _npz_reason(path, error):
    if os.path.getsize(path) == 0:
        return "the file is empty"
    message = str(error)
    # NumPy's advice for pickled data is to load it unsafely; an archive of
    # unknown origin must not be, so the reason is stated without it.
    if "pickle" in message.lower() or "allow_pickle" in message:
        return "it holds pickled Python objects, which are never loaded"
    return f"{type(error).__name__}: {message}"


__all__ = [
    "atomic_create_bytes",
    "atomic_create_text",
    "atomic_directory",
    "atomic_write_bytes",
    "atomic_write_text",
    "default_permissions",
    "load_json_object",
    "load_npz",
    "save_model_atomic",
]
