"""The settings record of a retrieval run (`config.json`), and its check.

`build_neighbours` keeps the settings that decide what a run computes
(`RUN_FIELDS`) in the run directory, so that a later command with other data
or settings is refused instead of reusing results that do not describe its
data.
"""

import hashlib
import json
import os
import re

from keras_seltransfer.models.backbones import is_backbone_path
from keras_seltransfer.models.named_backbones import HUB_PREFIX
from keras_seltransfer.models.named_backbones import is_hub_spec
from keras_seltransfer.models.named_backbones import normalise_name
from keras_seltransfer.utils.io import atomic_write_text
from keras_seltransfer.utils.io import load_json_object


# The `IndexConfig` fields that decide what a run computes: a command that
# continues a run must agree on all of them. The rest (batch and block
# sizes, progress, the shard a process works on) change how, not what.
RUN_FIELDS = (
    "source",
    "target",
    "target_fraction",
    "seed",
    "test_fraction",
    "split_seed",
    "bank",
    "backbone",
    "backbone_weights",
    "conv_layers",
    "pre_activation",
    "num_bins",
    "k_max",
    "image_size",
    "max_source",
    "channels",
    "search_mode",
)

# Fields added to `RUN_FIELDS` after records were first kept, with the value
# an older record (which lacks them) stands for.
# Runs from before the search mode was recorded searched exactly; a run
# records the mode "auto" resolved to (see `workflow.resolve_run_search_mode`).
_ADDED_FIELDS = {"backbone_weights": None, "search_mode": "exact"}

# The file of the run directory that holds the record.
RUN_FILE = "config.json"


def _run_settings(config):
    # The JSON round trip makes tuples lists and keeps what compares equal
    # after a save and a load.
    return json.loads(json.dumps({name: getattr(config, name) for name in RUN_FIELDS}))


def recorded_settings(out):
    """The settings recorded in the run directory `out`, or None if none are.

    Args:
        out: a run directory (`IndexConfig.output_dir`).

    Returns:
        A dict from each of `RUN_FIELDS` to its recorded value (tuples as
        lists), or None when `out` holds no `RUN_FILE`.

    Raises:
        ValueError: if the record is unreadable or lacks a `RUN_FIELDS` entry.

    Example:

    >>> import tempfile
    >>> recorded_settings(tempfile.mkdtemp()) is None
    True
    """
    path = os.path.join(out, RUN_FILE)
    if not os.path.isfile(path):
        return None
    remedy = "; restore it, or delete the run directory to rebuild"
    recorded = {**_ADDED_FIELDS, **load_json_object(path, f"retrieval run file {path!r}", remedy)}
    if not set(RUN_FIELDS) <= set(recorded):
        raise ValueError(
            f"The retrieval run file {path!r} does not record the settings {list(RUN_FIELDS)}; "
            "restore it, or delete the run directory to rebuild."
        )
    return {name: recorded[name] for name in RUN_FIELDS}


def write_run_settings(config):
    """Records `config`'s `RUN_FIELDS` in its run directory, atomically.

    Args:
        config: an `IndexConfig`; the record goes to
            `<config.output_dir>/config.json`, which must be a directory.

    Example:

    >>> import tempfile
    >>> from keras_seltransfer.retrieval import IndexConfig
    >>> config = IndexConfig(bank="gabor", output_dir=tempfile.mkdtemp())
    >>> write_run_settings(config)
    >>> recorded_settings(config.output_dir)["bank"]
    'gabor'
    """
    atomic_write_text(
        os.path.join(config.output_dir, RUN_FILE),
        json.dumps(_run_settings(config), indent=2, sort_keys=True) + "\n",
    )


def check_run_settings(config):
    """Refuses to continue a run made with other settings (ValueError).

    A new run directory gets its record at once, and so does a directory
    whose earlier command failed before computing anything.

    Args:
        config: the `IndexConfig` of this command.

    Returns:
        True when the record must wait until this command succeeds: a
        directory from before records were kept, whose stages are then
        checked one by one; False otherwise.

    Raises:
        ValueError: if the directory holds results of a run with other
            `RUN_FIELDS` settings (the differences are named), or an
            unreadable record.

    Example:

    >>> import dataclasses, tempfile
    >>> from keras_seltransfer.retrieval import IndexConfig
    >>> config = IndexConfig(bank="gabor", output_dir=tempfile.mkdtemp())
    >>> check_run_settings(config)  # new directory: recorded now
    False
    >>> open(os.path.join(config.output_dir, "bin_edges.npz"), "wb").close()
    >>> check_run_settings(dataclasses.replace(config, num_bins=16))
    Traceback (most recent call last):
    ...
    ValueError: ... made with other settings: num_bins=32 (this command: 16)...
    """
    out = config.output_dir
    settings = _run_settings(config)
    recorded = recorded_settings(out)
    started = any(
        os.path.exists(os.path.join(out, name))
        for name in ("bin_edges.npz", "target_descriptors.npz", "index", "shards")
    )
    if recorded is None:
        if started:
            return True
        write_run_settings(config)
        return False
    differences = [
        f"{name}={recorded[name]!r} (this command: {settings[name]!r})"
        for name in RUN_FIELDS
        if recorded[name] != settings[name]
    ]
    if differences and not started:
        # An earlier command failed before computing anything (bad input,
        # say): nothing depends on its settings.
        write_run_settings(config)
    elif differences:
        raise ValueError(
            f"{out} holds a retrieval run made with other settings: {'; '.join(differences)}. "
            "Its bin edges, descriptors and shards do not describe this command's data; "
            "use another --output_dir, or delete that one to rebuild it."
        )
    return False


def conv_bank_key(backbone, weights=None, image_size=None):
    """A short, path-safe name of the network a conv bank taps.

    A conv bank's responses depend on the backbone, its weights and the
    image size, so an index cache keyed by this name is never reused for
    another network: `<name>-<8 hex digits>`, the name readable (a
    `keras.applications` or built-in name normalised, or a `.keras` file's
    stem, a KerasHub preset's last component) and the digits a SHA-256 of
    the backbone spec (a file as its normalised path), the weights (`None`,
    `"imagenet"`, `"preset"` or a file path) and the image size.

    Args:
        backbone: a backbone spec, as `models.load_backbone` takes.
        weights: the weights of a named backbone.
        image_size: the square input size.

    Returns:
        The key, a string of letters, digits, `_` and `-`.

    Example:

    >>> a = conv_bank_key("MobileNetV2", "imagenet", 224)
    >>> a.startswith("mobilenetv2-"), a == conv_bank_key("mobilenet_v2", "imagenet", 224)
    (True, True)
    >>> a == conv_bank_key("MobileNetV2", None, 224)
    False
    """
    spec = os.fspath(backbone)
    if is_backbone_path(spec):
        spec = os.path.normpath(spec)
        readable = os.path.splitext(os.path.basename(spec))[0]
    elif is_hub_spec(spec):
        readable = os.path.basename(os.path.normpath(spec[len(HUB_PREFIX):]))
    else:
        spec = normalise_name(spec)
        readable = spec
    if weights not in (None, "imagenet", "preset"):
        weights = os.path.normpath(os.fspath(weights))
    digest = hashlib.sha256(
        json.dumps([spec, weights, image_size]).encode("utf-8")
    ).hexdigest()[:8]
    readable = re.sub(r"[^A-Za-z0-9_-]", "_", readable)[:40] or "backbone"
    return f"{readable}-{digest}"


__all__ = [
    "RUN_FIELDS",
    "RUN_FILE",
    "check_run_settings",
    "conv_bank_key",
    "recorded_settings",
    "write_run_settings",
]
