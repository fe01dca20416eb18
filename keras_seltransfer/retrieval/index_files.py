"""The files of a saved `SourceIndex`: one directory, written atomically.

A saved index is a directory holding `arrays.npz` (descriptors, labels, ids,
bin edges and channel weights) and `index.json` (format name and version,
shapes, shard, bank configuration and metadata). `write_index_directory`
publishes both at once; `read_index_directory` reads them back without
trusting them (never unpickling, checking every shape it can).
`SourceIndex.save` and `SourceIndex.load` use these.
"""

import json
import os

import numpy as np

from keras_seltransfer.utils.io import atomic_directory
from keras_seltransfer.utils.io import load_json_object
from keras_seltransfer.utils.io import load_npz

FORMAT_VERSION = 1

FORMAT_NAME = "keras_seltransfer.SourceIndex"
ARRAYS_FILE = "arrays.npz"
CONFIG_FILE = "index.json"
ARRAY_NAMES = ("descriptors", "labels", "ids", "bin_edges", "channel_weights")
CONFIG_KEYS = (
    "format_version",
    "num_sources",
    "num_channels",
    "num_bins",
    "num_shards",
    "shard_index",
    "bank_config",
    "metadata",
)


def write_index_directory(path, arrays, config, overwrite=True):
    """Writes an index's arrays and config to the directory `path`, atomically.

    Both files are written into a temporary sibling directory that replaces
    `path` only once complete, so a crash mid-write leaves the previous index
    (or none) in place, never a mix.

    Args:
        path: the index directory.
        arrays: `{name: array}` for every name of `ARRAY_NAMES`.
        config: a JSON-serialisable dict with the `CONFIG_KEYS` other than
            `format_version`; the format name and version are added here.
        overwrite: when False, an existing `path` raises `FileExistsError`.

    Returns:
        `path`.

    Example:

    >>> write_index_directory("index", index_arrays, index_config)  # doctest: +SKIP
    """
    config = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, **config}
    with atomic_directory(path, overwrite=overwrite) as tmp:
        with open(os.path.join(tmp, ARRAYS_FILE), "wb") as f:
            np.savez(f, **{name: arrays[name] for name in ARRAY_NAMES})
            # Durable before the rename publishes it.
            f.flush()
            os.fsync(f.fileno())
        with open(os.path.join(tmp, CONFIG_FILE), "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
    return path


def read_index_directory(path):
    """Reads the arrays and config of an index directory written by
    `write_index_directory`.

    Checks the format name and version, the config keys, the array names
    and that the descriptors' shape matches the config; the values
    themselves are checked by `SourceIndex`.

    Args:
        path: the index directory.

    Returns:
        `(arrays, config)`: `{name: array}` for `ARRAY_NAMES`, and the
        config dict.

    Raises:
        FileNotFoundError: if `path` or one of its files is missing.
        ValueError: if a file is corrupt, of another format or format
            version, or the arrays disagree with `index.json`.

    Example:

    >>> arrays, config = read_index_directory("index")  # doctest: +SKIP
    """
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(
            f"No source index at {path!r}: expected a directory written by "
            "SourceIndex.save."
        )
    config_path = os.path.join(path, CONFIG_FILE)
    arrays_path = os.path.join(path, ARRAYS_FILE)
    for required in (config_path, arrays_path):
        if not os.path.isfile(required):
            raise FileNotFoundError(
                f"The source index at {path!r} is incomplete: "
                f"{os.path.basename(required)} is missing."
            )
    config = load_json_object(config_path, f"source index file {config_path!r}")
    found_format = config.get("format")
    if found_format != FORMAT_NAME:
        raise ValueError(
            f"Expected {config_path!r} to describe a {FORMAT_NAME}. "
            f"Received: format={found_format!r}"
        )
    if config.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"Expected a source index of format version {FORMAT_VERSION}. "
            f"Received: format_version={config.get('format_version')!r} in {config_path!r}"
        )
    missing = [key for key in CONFIG_KEYS if key not in config]
    if missing:
        raise ValueError(f"The source index file {config_path!r} lacks the keys {missing}.")

    try:
        # Never unpickles, and reads every array in full (checking CRCs).
        data = load_npz(arrays_path, what="source index arrays")
    except ValueError as e:
        raise ValueError(f"The source index at {path!r} is corrupt or unreadable: {e}") from e
    if not set(ARRAY_NAMES) <= set(data):
        raise ValueError(
            f"Expected {arrays_path!r} to hold the arrays {list(ARRAY_NAMES)}. "
            f"Received: {sorted(data)}"
        )
    arrays = {name: data[name] for name in ARRAY_NAMES}
    expected = (config["num_sources"], config["num_channels"], config["num_bins"])
    if arrays["descriptors"].shape != expected:
        raise ValueError(
            f"Inconsistent source index at {path!r}: index.json records "
            f"descriptors of shape {expected}. "
            f"Received: descriptors.shape={arrays['descriptors'].shape}"
        )
    return arrays, config


__all__ = [
    "ARRAYS_FILE",
    "ARRAY_NAMES",
    "CONFIG_FILE",
    "CONFIG_KEYS",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "read_index_directory",
    "write_index_directory",
]
