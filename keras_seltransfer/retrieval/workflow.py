"""The whole retrieval step: describe target and source images, search, store.

`build_neighbours` is what `apps.build_index` runs. Every stage writes its
result atomically and is skipped when its result is already on disk, so an
interrupted run (or one shard of many) continues where it stopped and a
finished shard is never recomputed. A shard counts as finished only once its
top-k file, written last and atomically, exists: a process killed while
writing leaves at most temporary files (names starting with a dot) that are
never read, and the shard is computed again. The settings of a run are kept
in `config.json`, so a later command with other data or settings is refused
instead of reusing results that do not describe its data.
"""

import dataclasses
import functools
import json
import os

import numpy as np

from keras_seltransfer import data as data_lib
from keras_seltransfer.data.protocol import load_train_test
from keras_seltransfer.models import backbones
from keras_seltransfer.models.backbones import DEFAULT_BACKBONE
from keras_seltransfer.retrieval.conv_bank import ConvBank
from keras_seltransfer.retrieval.data_service import DEFAULT_TIMEOUT
from keras_seltransfer.retrieval.data_service import service_address
from keras_seltransfer.retrieval.filter_banks import BANKS
from keras_seltransfer.retrieval.gabor_bank import GaborBank
from keras_seltransfer.retrieval.index import SourceIndex
from keras_seltransfer.retrieval.run_record import check_run_settings
from keras_seltransfer.retrieval.run_record import recorded_settings
from keras_seltransfer.retrieval.run_record import write_run_settings
from keras_seltransfer.retrieval.similarity import AUTO_FAST_MIN_SOURCES
from keras_seltransfer.retrieval.similarity import resolve_search_mode
from keras_seltransfer.retrieval.similarity import SEARCH_MODES
from keras_seltransfer.retrieval.topk import merge_topk
from keras_seltransfer.utils import histograms
from keras_seltransfer.utils.io import atomic_write_bytes
from keras_seltransfer.utils.io import load_npz
from keras_seltransfer.utils.io import npz_bytes
from keras_seltransfer.utils.options import option
from keras_seltransfer.utils.run_lock import RunLock
from keras_seltransfer.utils.validation import check_choice


@dataclasses.dataclass
class IndexConfig:
    """What defines a retrieval run (its fields are `apps.build_index`'s flags).

    The target training images are chosen exactly as `apps.finetune` chooses
    them (held-out split with `split_seed`, then the low-data subset of
    `target_fraction` with `seed`), so the neighbour lists line up with the
    images a fine-tuning run trains on. `channels` (None, 1 or 3) converts
    the images of image folders that mix grayscale, RGB and RGBA, and is the
    input channel count of a built-in conv-bank backbone (`small_cnn`); None
    takes the conv bank's backbone's channel count, or each data set's own.

    `data_service` describes the source images on the workers of a
    tf.data service (`SourceIndex.build_on_service`) instead of in this
    process; like the batch size it changes how, not what, so it is not
    part of a run's recorded settings, and shards described either way
    merge.

    Raises:
        ValueError: for a `channels`, `bank`, `search_mode`, `shard_index`
            or `target_fraction` out of range, a `k_max` below 1, or a
            `data_service` that is not a `host:port` address.

    Example:

    >>> IndexConfig(bank="gabor", k_max=50).backbone is None
    True
    >>> IndexConfig().backbone == DEFAULT_BACKBONE  # a conv bank needs one
    True
    """

    source: str = option(
        "fashion_mnist", "Source data set spec (its training split is searched)."
    )
    target: str = option("elpv", "Target data set spec (its training split is described).")
    target_fraction: float = option(
        1.0, "Fraction of each target training class, as in apps.finetune.",
        above=0.0, upper=1.0,
    )
    seed: int = option(
        0, "Seed of the target low-data subset (as in apps.finetune).", lower=0, upper=2**32 - 1
    )
    test_fraction: float = option(
        0.25, "Held-out share of a target without a test split (as in apps.finetune).",
        above=0.0, below=1.0,
    )
    split_seed: int = option(
        0, "Seed of the target's held-out split (as in apps.finetune).", lower=0, upper=2**32 - 1
    )
    bank: str = option("conv", "Filter bank.", choices=BANKS)
    backbone: str = option(
        None,
        "Backbone of the conv bank: a .keras file, a built-in or a keras.applications name "
        "(default: the pretrain app's output).",
    )
    backbone_weights: str = option(
        None,
        "Conv bank: weights of a named backbone, 'imagenet' or a weights file. Unset: random "
        "initialisation.",
    )
    conv_layers: int = option(2, "Conv bank: number of first conv layers.", lower=1)
    pre_activation: bool = option(
        True, "Conv bank: tap responses before the activation (the authors' choice)."
    )
    num_bins: int = option(32, "Histogram bins per channel.", lower=1, upper=1000)
    k_max: int = option(200, "Neighbours kept per target image.", lower=1)
    block_size: int = option(4096, "Source rows per search block.", lower=1)
    search_mode: str = option(
        "auto",
        "How the source is searched: exact (every neighbour exactly the float64 double loop's), "
        "fast (float32 GEMM, the k_max + margin nearest re-scored exactly: the cost is the "
        "GEMMs, a rare neighbour may be missed), or auto (fast from "
        f"{AUTO_FAST_MIN_SOURCES:,} source images, exact below). A run records the mode "
        "auto resolved to, so results of another mode are never reused.",
        choices=SEARCH_MODES,
    )
    image_size: int = option(64, "Images are resized to this size.", lower=8, upper=4096)
    batch_size: int = option(128, "Batch size for describing images.", lower=1)
    max_source: int = option(
        None, "Use only the first N source images (quick runs).", type=int, lower=1
    )
    num_shards: int = option(1, "Split the source into this many shards.", lower=1)
    shard_index: int = option(0, "Which shard this process describes.", lower=0)
    data_service: str = option(
        None,
        "Describe the source images on a tf.data service: its dispatcher's address, "
        "grpc://host:port (start the dispatcher and its workers with python -m "
        "apps.data_service). The descriptors are those of a build in this process (bit "
        "for bit on CPU workers); the bin edges, the target and the search stay here. "
        "Unset: describe here.",
    )
    data_service_timeout: float = option(
        DEFAULT_TIMEOUT,
        "Seconds to wait for the --data_service dispatcher to answer, and then for each "
        "next batch, before giving up (a service without workers waits forever).",
        above=0.0,
    )
    output_dir: str = option(os.path.join("runs", "index", "default"), "Output directory.")
    progress: bool = option(True, "Show progress bars.")
    channels: int = option(
        None,
        "Convert the images of image folders to this many channels (for folders mixing "
        "grayscale, RGB and RGBA). Unset: the conv bank's backbone's, or the data's.",
        type=int, choices=(1, 3),
    )
    force: bool = option(
        False,
        "Take over --output_dir (or this shard) although its lock file names another "
        "command, when you know that command is gone: one on another host, whose process "
        "cannot be checked from here, or an unreadable lock file. A command that is still "
        "writing, taken over, mixes its results with this one's. A lock of a process running "
        "on this host is never taken over; one whose process is gone is taken over without "
        "--force.",
    )

    def __post_init__(self):
        if self.channels is not None and (
            isinstance(self.channels, bool) or self.channels not in (1, 3)
        ):
            raise ValueError(
                f"`channels` must be None, 1 or 3. Received: channels={self.channels!r}"
            )
        check_choice(self.bank, "bank", BANKS)
        check_choice(self.search_mode, "search_mode", SEARCH_MODES)
        if self.data_service is not None:
            self.data_service = service_address(self.data_service)
        if not self.data_service_timeout > 0:
            raise ValueError(
                "`data_service_timeout` must be > 0. "
                f"Received: data_service_timeout={self.data_service_timeout}"
            )
        if not 0 <= self.shard_index < self.num_shards:
            raise ValueError(
                f"`shard_index` must be in [0, num_shards={self.num_shards}). "
                f"Received: shard_index={self.shard_index}"
            )
        if not 0.0 < self.target_fraction <= 1.0:
            raise ValueError(
                f"`target_fraction` must be in (0, 1]. Received: target_fraction={self.target_fraction}"
            )
        if self.k_max < 1:
            raise ValueError(f"`k_max` must be >= 1. Received: k_max={self.k_max}")
        if self.bank == "conv" and self.backbone is None:
            self.backbone = DEFAULT_BACKBONE


def target_training_images(config, channels=None):
    """`(target_train_full, kept_indices)`: the images apps.finetune trains on.

    `channels` overrides `config.channels` for loading image folders.
    """
    train_full, _ = load_train_test(
        config.target,
        config.test_fraction,
        config.split_seed,
        channels=config.channels if channels is None else channels,
    )
    kept = data_lib.low_data_subset(
        train_full.labels, fraction=config.target_fraction, seed=config.seed
    )
    return train_full, kept


def make_bank(config):
    """The filter bank of `config`, and the channel count its input needs."""
    if config.bank == "gabor":
        return GaborBank(), None
    if backbones.is_backbone_path(config.backbone) and not os.path.isfile(config.backbone):
        raise FileNotFoundError(
            f"Backbone file not found: {config.backbone!r}. Run `python -m apps.pretrain` "
            "first, pass --backbone, or use --bank=gabor."
        )
    # A saved or application backbone has its own channel count; a
    # built-in one takes `channels`.
    channels = config.channels if backbones.is_builtin_backbone(config.backbone) else None
    backbone = backbones.load_backbone(
        config.backbone, (config.image_size, config.image_size, channels),
        weights=config.backbone_weights,
    )
    bank = ConvBank(
        backbone, layers=config.conv_layers, pre_activation=config.pre_activation
    )
    return bank, int(backbone.inputs[0].shape[-1])


def index_lock(config, merge_only=False, wait=False):
    """The lock a command of a retrieval run holds while it writes (a `RunLock`).

    An unsharded run and a merge own the whole run directory
    (`<output_dir>/run.lock`); a shard of a sharded run owns only its
    shard (`<output_dir>/shard-<i>-of-<n>.lock`), so the shards of one run
    can be built at the same time, by processes on one host or on several
    sharing `output_dir`, while two commands building the same shard get
    one result and one clear error. (The files every shard writes besides
    its own, the bin edges, target descriptors, settings record and the
    final merge, are the same whoever writes them, and each is published
    atomically.) With `config.force` a lock whose owner cannot be checked is
    taken over.

    Args:
        config: an `IndexConfig`.
        merge_only: the command only merges finished shards.
        wait: wait for a live owner to finish instead of refusing (how an
            sjft run building a shared index waits for another building it).

    Returns:
        A `RunLock` (not yet taken).

    Example:

    >>> index_lock(IndexConfig(num_shards=4, shard_index=2, output_dir="runs/index/x")).path
    'runs/index/x/shard-2-of-4.lock'
    """
    kwargs = dict(
        force=config.force,
        timeout=None if wait else 0.0,
        on_wait=_announce_wait if wait and config.progress else None,
    )
    if merge_only or config.num_shards == 1:
        return RunLock(config.output_dir, what=f"the retrieval run {config.output_dir!r}", **kwargs)
    shard = f"shard-{config.shard_index}-of-{config.num_shards}"
    return RunLock(
        config.output_dir,
        name=f"{shard}.lock",
        what=(
            f"shard {config.shard_index} of {config.num_shards} of the retrieval run "
            f"{config.output_dir!r}"
        ),
        **kwargs,
    )


def _announce_wait(message):
    print(f"Waiting: {message}", flush=True)


def build_neighbours(config, merge_only=False, wait=False):
    """Runs (or continues) a retrieval run; returns the paths written.

    The first command of a run records its settings (`RUN_FIELDS`) in
    `<output_dir>/config.json`; a later command with other settings is
    refused. A merge takes the data sets and settings from that record, so
    it needs only `output_dir` and `num_shards`. The command holds the lock
    of `index_lock` from before its first write to its end.

    Args:
        config: an `IndexConfig`.
        merge_only: only merge the per-shard results of a sharded run.
        wait: when another live command holds the lock, wait for it to
            finish (and then reuse what it computed) instead of refusing.

    Returns:
        A dict of output names to paths, a `reused` entry naming the stages
        found finished on disk (not recomputed), and a `missing_shards`
        entry while a sharded run is incomplete.

    Raises:
        ValueError: for settings that disagree with the run's record, a
            merge with unfinished shards, or a corrupt file in the run
            (named in the message).
        RunLockedError: if another command holds the run (or this shard).

    Example:

    >>> import tempfile
    >>> root = tempfile.mkdtemp()
    >>> rng = np.random.default_rng(0)
    >>> for name, n in (("source", 40), ("target", 16)):
    ...     images = rng.integers(0, 256, (n, 16, 16), np.uint8)
    ...     np.savez(os.path.join(root, name), images=images, labels=np.arange(n) % 2)
    >>> config = IndexConfig(
    ...     source="numpy:" + os.path.join(root, "source.npz"),
    ...     target="numpy:" + os.path.join(root, "target.npz"),
    ...     bank="gabor", image_size=16, num_bins=8, k_max=5,
    ...     output_dir=os.path.join(root, "run"), progress=False)
    >>> outputs = build_neighbours(config)
    >>> target_ids, neighbour_ids, _ = read_neighbours(outputs["neighbours"])
    >>> neighbour_ids.shape  # 12 training targets (4 held out), 5 neighbours
    (12, 5)
    >>> build_neighbours(config)["reused"]  # a second call recomputes nothing
    'bin_edges, target_descriptors, index, topk'
    """
    with index_lock(config, merge_only, wait):
        return _build_neighbours(config, merge_only)


def _build_neighbours(config, merge_only):
    out = config.output_dir
    os.makedirs(out, exist_ok=True)
    shard_dirs = [
        os.path.join(out, "index")
        if config.num_shards == 1
        else os.path.join(out, "shards", f"shard-{i}-of-{config.num_shards}")
        for i in range(config.num_shards)
    ]
    outputs = {}
    if merge_only:
        recorded = recorded_settings(out)
        if recorded is not None:
            # The record, not the merge command's defaults, says what the
            # shards hold (and what neighbours.npz will record).
            config = dataclasses.replace(config, **recorded)
    else:
        config = resolve_run_search_mode(config)
        record_later = check_run_settings(config)
        outputs.update(_describe_and_search(config, shard_dirs[config.shard_index]))
        if record_later:
            write_run_settings(config)
    missing = [d for d in shard_dirs if not os.path.isfile(os.path.join(d, "topk.npz"))]
    if missing:
        if merge_only:
            raise ValueError(
                f"Cannot merge: {len(missing)} of {config.num_shards} shards are not "
                f"finished: {', '.join(missing)}"
            )
        outputs["missing_shards"] = ", ".join(os.path.basename(d) for d in missing)
        return outputs
    parts = [_load_topk(d, target_rows=None) for d in shard_dirs]
    target = load_npz(
        os.path.join(out, "target_descriptors.npz"),
        required=("ids", "labels"),
        what="target descriptor file",
    )
    rows = {p["ids"].shape[0] for p in parts} | {len(target["ids"])}
    if len(rows) > 1:
        raise ValueError(
            f"The shards of {out} list neighbours for different numbers of target "
            f"images ({sorted(rows)}): they were not built for the same target set. "
            "Delete the run directory to rebuild."
        )
    k = min(config.k_max, sum(p["ids"].shape[1] for p in parts))
    ids, distances = merge_topk([(p["ids"], p["distances"]) for p in parts], k)
    labels = np.concatenate([p["neighbour_labels"] for p in parts], axis=1)
    all_ids = np.concatenate([p["ids"] for p in parts], axis=1)
    neighbour_labels = np.take_along_axis(labels, _positions(all_ids, ids), axis=1)
    path = os.path.join(out, "neighbours.npz")
    atomic_write_bytes(
        path,
        npz_bytes(
            dict(
                target_ids=target["ids"],
                target_labels=target["labels"],
                neighbour_ids=ids,
                neighbour_labels=neighbour_labels,
                distances=distances,
                config=np.array(json.dumps(dataclasses.asdict(config))),
                # Shards written before their size was kept leave it out.
                **(
                    {"num_sources": np.array(sum(int(p["num_sources"]) for p in parts))}
                    if all("num_sources" in p for p in parts)
                    else {}
                ),
            )
        ),
    )
    outputs["neighbours"] = path
    return outputs


def resolve_run_search_mode(config):
    """`config` with `search_mode` resolved to `"exact"` or `"fast"`.

    `"auto"` is resolved against the whole source searched (all shards
    together, `max_source` applied), so every shard of a run searches in
    the same mode and the run records the mode its results come from.

    Example:

    >>> resolve_run_search_mode(IndexConfig(search_mode="fast")).search_mode
    'fast'
    """
    if config.search_mode != "auto":
        return config
    num_sources = len(source_training_images(config))
    return dataclasses.replace(
        config, search_mode=resolve_search_mode(config.search_mode, num_sources)
    )


def _positions(all_ids, chosen):
    """Column of each chosen id within its row of `all_ids`."""
    positions = np.empty(chosen.shape, dtype=np.int64)
    for row in range(chosen.shape[0]):
        lookup = {int(v): i for i, v in enumerate(all_ids[row])}
        positions[row] = [lookup[int(v)] for v in chosen[row]]
    return positions


def _load_topk(shard_dir, target_rows):
    """A shard's top-k part, checked for shape (and row count when given)."""
    path = os.path.join(shard_dir, "topk.npz")
    part = load_npz(
        path, required=("ids", "distances", "neighbour_labels"), what="shard top-k file"
    )
    shapes = {part[name].shape for name in ("ids", "distances", "neighbour_labels")}
    if (
        len(shapes) != 1
        or part["ids"].ndim != 2
        or not np.issubdtype(part["ids"].dtype, np.integer)
        or (target_rows is not None and part["ids"].shape[0] != target_rows)
    ):
        raise ValueError(
            f"The shard top-k file {path!r} is inconsistent: expected integer ids, "
            "distances and neighbour labels of one shape [targets, k]. Received: shapes "
            f"{sorted(shapes)}, ids.dtype={part['ids'].dtype}. Delete {shard_dir} to "
            "rebuild the shard."
        )
    return part


def _describe_and_search(config, shard_dir):
    out = config.output_dir
    outputs, reused = {}, []
    bank, bank_channels = make_bank(config)
    # The conv bank's backbone decides the channel count; images of any
    # other count are converted to it.
    channels = bank_channels if bank_channels is not None else config.channels
    train_full, kept = target_training_images(config, channels=channels)
    target = train_full.subset(kept)

    edges_path = os.path.join(out, "bin_edges.npz")
    bank_config = json.dumps(bank.get_config(), sort_keys=True)
    if os.path.isfile(edges_path):
        stored = load_npz(
            edges_path, required=("edges", "channel_weights", "bank_config"), what="bin edge file"
        )
        reused.append("bin_edges")
        if (
            str(stored["bank_config"]) != bank_config
            or stored["edges"].ndim != 2
            or stored["edges"].shape[1] != config.num_bins + 1
        ):
            raise ValueError(
                f"{edges_path} was fitted for another bank or bin count; use another "
                "--output_dir or delete it."
            )
        edges, weights = stored["edges"], stored["channel_weights"]
    else:
        target_ds = data_lib.make_dataset(
            target, config.image_size, config.batch_size, channels=channels
        )
        edges = histograms.fit_bin_edges(
            bank, target_ds, num_bins=config.num_bins, progress=config.progress
        )
        weights = histograms.channel_weights(bank)
        atomic_write_bytes(
            edges_path,
            npz_bytes(dict(edges=edges, channel_weights=weights, bank_config=np.array(bank_config))),
        )
    outputs["bin_edges"] = edges_path

    target_path = os.path.join(out, "target_descriptors.npz")
    if os.path.isfile(target_path):
        stored = load_npz(target_path, what="target descriptor file")
        reused.append("target_descriptors")
        if "descriptors" not in stored or not np.array_equal(stored.get("ids"), kept):
            raise ValueError(
                f"{target_path} holds descriptors of other target images than this "
                "run's (target, fraction, seed); use another --output_dir or delete it."
            )
        target_desc = stored["descriptors"]
    else:
        target_ds = data_lib.make_dataset(
            target, config.image_size, config.batch_size, channels=channels
        )
        target_desc = histograms.describe(bank, edges, target_ds, progress=config.progress)
        atomic_write_bytes(
            target_path,
            npz_bytes(
                dict(descriptors=target_desc, ids=np.asarray(kept, np.int64), labels=target.labels)
            ),
        )
    outputs["target_descriptors"] = target_path

    # `SourceIndex.save` publishes the directory whole, so its index.json
    # means a complete index; a directory without one (copied by hand, or
    # written by something else) is not trusted and is written again.
    if os.path.isfile(os.path.join(shard_dir, "index.json")):
        try:
            index = SourceIndex.load(shard_dir)
        except ValueError as e:
            raise ValueError(f"{e} Delete {shard_dir} to rebuild the shard.") from e
        reused.append("index")
    else:
        source = source_training_images(config, channels=channels)
        common = dict(
            batch_size=config.batch_size,
            channels=channels,
            num_shards=config.num_shards,
            shard_index=config.shard_index,
            bin_edges=edges,
            channel_weights=weights,
            bank_config=json.loads(bank_config),
            progress=config.progress,
        )
        if config.data_service is None:
            index = SourceIndex.build(
                functools.partial(histograms.describe, bank, edges, progress=config.progress),
                source,
                config.image_size,
                **common,
            )
        else:
            index = SourceIndex.build_on_service(
                functools.partial(histograms.describe_batch, bank, edges),
                source,
                config.image_size,
                config.data_service,
                timeout=config.data_service_timeout,
                **common,
            )
        index.save(shard_dir)
    outputs["index"] = shard_dir

    topk_path = os.path.join(shard_dir, "topk.npz")
    if os.path.isfile(topk_path):
        _load_topk(shard_dir, len(target_desc))
        reused.append("topk")
    else:
        k = min(config.k_max, len(index.ids))
        if k == 0:
            # More shards than source images leaves this shard empty.
            ids = np.zeros((len(target_desc), 0), np.int64)
            distances = np.zeros((len(target_desc), 0), np.float64)
            labels = ids.copy()
        else:
            ids, distances = index.query(
                target_desc, k, edges, block_size=config.block_size, progress=config.progress,
                mode=config.search_mode,
            )
            labels = index.neighbour_labels(ids)
        atomic_write_bytes(
            topk_path,
            npz_bytes(
                dict(
                    ids=ids,
                    distances=distances,
                    neighbour_labels=labels,
                    num_sources=np.array(len(index.ids), np.int64),
                )
            ),
        )
    if reused:
        outputs["reused"] = ", ".join(reused)
    return outputs


def source_training_images(config, channels=None):
    """The source images searched: the source's training split (first
    `max_source` of it when set); index ids are positions in it.

    `channels` overrides `config.channels` for loading image folders.
    """
    source, _ = load_train_test(
        config.source,
        config.test_fraction,
        config.split_seed,
        channels=config.channels if channels is None else channels,
    )
    if config.max_source is not None and config.max_source < len(source):
        source = source.subset(np.arange(config.max_source))
    return source


def read_neighbours(path):
    """Reads and checks a `neighbours.npz` written by `build_neighbours`.

    Args:
        path: the `neighbours.npz` file.

    Returns:
        `(target_ids, neighbour_ids, index_config)`: int64 positions `[T]`
        of the described images in the target's training split, int64
        source positions `[T, k]` nearest first, and the `IndexConfig` the
        file was built with.

    Raises:
        FileNotFoundError: if `path` does not exist.
        ValueError: if the file is not such an index (corrupt, arrays of
            the wrong shape or type, repeated target ids, an unreadable
            config), with the file named.
    """
    arrays = load_npz(
        path, required=("target_ids", "neighbour_ids", "config"), what="neighbour index"
    )
    target_ids, neighbour_ids = arrays["target_ids"], arrays["neighbour_ids"]
    problem = None
    if target_ids.ndim != 1 or not np.issubdtype(target_ids.dtype, np.integer):
        problem = f"target_ids must be a 1-D integer array, not {target_ids.dtype} {target_ids.shape}"
    elif neighbour_ids.ndim != 2 or not np.issubdtype(neighbour_ids.dtype, np.integer):
        problem = (
            f"neighbour_ids must be a 2-D integer array, not {neighbour_ids.dtype} "
            f"{neighbour_ids.shape}"
        )
    elif neighbour_ids.shape[0] != target_ids.shape[0]:
        problem = (
            f"neighbour_ids has {neighbour_ids.shape[0]} rows for {target_ids.shape[0]} target ids"
        )
    elif len(np.unique(target_ids)) != len(target_ids):
        problem = "target_ids repeats an image"
    if problem is None:
        try:
            stored = json.loads(str(arrays["config"]))
            if not isinstance(stored, dict):
                raise ValueError(f"a JSON {type(stored).__name__}, not an object")
            # Files written before the search mode was recorded come from
            # the exact search.
            stored = {"search_mode": "exact", **stored}
            index_config = IndexConfig(
                **{k: v for k, v in stored.items() if k in IndexConfig.__dataclass_fields__}
            )
        except (TypeError, ValueError) as e:
            problem = f"its config is unreadable ({e})"
    if problem is not None:
        raise ValueError(
            f"{path} is not a neighbour index written by apps.build_index: {problem}. "
            "Rebuild it with apps.build_index."
        )
    return target_ids.astype(np.int64), neighbour_ids.astype(np.int64), index_config
