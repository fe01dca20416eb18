"""Atomic writes: readers see the old output or the new one, never half of one."""

import contextlib
import os
import shutil
import tempfile


def atomic_write_bytes(path, data):
    """Writes `data` to `path` through a temporary file and an atomic rename.

    Args:
        path: destination file. Its parent directory is created if missing.
        data: the bytes to write.
    """
    path = os.fspath(path)
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
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def atomic_write_text(path, text, encoding="utf-8"):
    """Writes `text` to `path` atomically (see `atomic_write_bytes`)."""
    atomic_write_bytes(path, text.encode(encoding))


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
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise
