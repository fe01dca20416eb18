"""The whole retrieval step: describe target and source images, search, store.

`build_neighbours` is what `apps.build_index` runs. Every stage writes its
result atomically and is skipped when its result is already on disk, so an
interrupted run (or one shard of many) continues where it stopped and a
finished shard is never recomputed.
"""

import dataclasses
import functools
import json
import os

import numpy as np

from keras_seltransfer import data as data_lib
from keras_seltransfer.models import backbones
from keras_seltransfer.retrieval import descriptors
from keras_seltransfer.retrieval import filter_banks
from keras_seltransfer.retrieval.index import SourceIndex
from keras_seltransfer.retrieval.similarity import merge_topk
from keras_seltransfer.utils.io import atomic_write_bytes

BANKS = ("conv", "gabor")


@dataclasses.dataclass
class IndexConfig:
    """What defines a retrieval run (see `apps.build_index` for each field).

    The target training images are chosen exactly as `apps.finetune` chooses
    them (held-out split with `split_seed`, then the low-data subset of
    `target_fraction` with `seed`), so the neighbour lists line up with the
    images a fine-tuning run trains on.
    """

    source: str = "fashion_mnist"
    target: str = "elpv"
    target_fraction: float = 1.0
    seed: int = 0
    test_fraction: float = 0.25
    split_seed: int = 0
    bank: str = "conv"
    backbone: str = None
    conv_layers: int = 2
    pre_activation: bool = True
    num_bins: int = 32
    k_max: int = 200
    block_size: int = 4096
    image_size: int = 64
    batch_size: int = 128
    max_source: int = None
    num_shards: int = 1
    shard_index: int = 0
    output_dir: str = os.path.join("runs", "index", "default")
    progress: bool = True

    def __post_init__(self):
        if self.bank not in BANKS:
            raise ValueError(f"`bank` must be one of {BANKS}. Received: bank={self.bank!r}")
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
            from keras_seltransfer.training import DEFAULT_BACKBONE

            self.backbone = DEFAULT_BACKBONE


def target_training_images(config):
    """`(target_train_full, kept_indices)`: the images apps.finetune trains on."""
    from keras_seltransfer.training import load_train_test

    train_full, _ = load_train_test(config.target, config.test_fraction, config.split_seed)
    kept = data_lib.low_data_subset(
        train_full.labels, fraction=config.target_fraction, seed=config.seed
    )
    return train_full, kept


def make_bank(config):
    """The filter bank of `config`, and the channel count its input needs."""
    if config.bank == "gabor":
        return filter_banks.GaborBank(), None
    if backbones.is_backbone_path(config.backbone) and not os.path.isfile(config.backbone):
        raise FileNotFoundError(
            f"Backbone file not found: {config.backbone!r}. Run `python -m apps.pretrain` "
            "first, pass --backbone, or use --bank=gabor."
        )
    backbone = backbones.load_backbone(
        config.backbone, (config.image_size, config.image_size, None)
    )
    bank = filter_banks.ConvBank(
        backbone, layers=config.conv_layers, pre_activation=config.pre_activation
    )
    return bank, int(backbone.inputs[0].shape[-1])


def _npz_bytes(**arrays):
    import io

    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def _load_npz(path):
    with np.load(path, allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


def build_neighbours(config, merge_only=False):
    """Runs (or continues) a retrieval run; returns the paths written.

    Args:
        config: an `IndexConfig`.
        merge_only: only merge the per-shard results of a sharded run.

    Returns:
        A dict of output names to paths (and a `missing_shards` entry while
        a sharded run is incomplete).
    """
    out = config.output_dir
    os.makedirs(out, exist_ok=True)
    shard_dirs = [
        os.path.join(out, "index")
        if config.num_shards == 1
        else os.path.join(out, "shards", f"shard-{i}-of-{config.num_shards}")
        for i in range(config.num_shards)
    ]
    outputs = {}
    if not merge_only:
        outputs.update(_describe_and_search(config, shard_dirs[config.shard_index]))
    missing = [d for d in shard_dirs if not os.path.isfile(os.path.join(d, "topk.npz"))]
    if missing:
        if merge_only:
            raise ValueError(
                f"Cannot merge: {len(missing)} of {config.num_shards} shards are not "
                f"finished: {', '.join(missing)}"
            )
        outputs["missing_shards"] = ", ".join(os.path.basename(d) for d in missing)
        return outputs
    parts = [_load_npz(os.path.join(d, "topk.npz")) for d in shard_dirs]
    target = _load_npz(os.path.join(out, "target_descriptors.npz"))
    k = min(config.k_max, sum(p["ids"].shape[1] for p in parts))
    ids, distances = merge_topk([(p["ids"], p["distances"]) for p in parts], k)
    labels = np.concatenate([p["neighbour_labels"] for p in parts], axis=1)
    all_ids = np.concatenate([p["ids"] for p in parts], axis=1)
    neighbour_labels = np.take_along_axis(labels, _positions(all_ids, ids), axis=1)
    path = os.path.join(out, "neighbours.npz")
    atomic_write_bytes(
        path,
        _npz_bytes(
            target_ids=target["ids"],
            target_labels=target["labels"],
            neighbour_ids=ids,
            neighbour_labels=neighbour_labels,
            distances=distances,
            config=np.array(json.dumps(dataclasses.asdict(config))),
        ),
    )
    outputs["neighbours"] = path
    return outputs


def _positions(all_ids, chosen):
    """Column of each chosen id within its row of `all_ids`."""
    positions = np.empty(chosen.shape, dtype=np.int64)
    for row in range(chosen.shape[0]):
        lookup = {int(v): i for i, v in enumerate(all_ids[row])}
        positions[row] = [lookup[int(v)] for v in chosen[row]]
    return positions


def _describe_and_search(config, shard_dir):
    out = config.output_dir
    outputs = {}
    bank, channels = make_bank(config)
    train_full, kept = target_training_images(config)
    target = train_full.subset(kept)

    edges_path = os.path.join(out, "bin_edges.npz")
    bank_config = json.dumps(bank.get_config(), sort_keys=True)
    if os.path.isfile(edges_path):
        stored = _load_npz(edges_path)
        if str(stored["bank_config"]) != bank_config or stored["edges"].shape[1] != config.num_bins + 1:
            raise ValueError(
                f"{edges_path} was fitted for another bank or bin count; use another "
                "--output_dir or delete it."
            )
        edges, weights = stored["edges"], stored["channel_weights"]
    else:
        target_ds = data_lib.make_dataset(
            target, config.image_size, config.batch_size, channels=channels
        )
        edges = descriptors.fit_bin_edges(
            bank, target_ds, num_bins=config.num_bins, progress=config.progress
        )
        weights = descriptors.channel_weights(bank)
        atomic_write_bytes(
            edges_path,
            _npz_bytes(edges=edges, channel_weights=weights, bank_config=np.array(bank_config)),
        )
    outputs["bin_edges"] = edges_path

    target_path = os.path.join(out, "target_descriptors.npz")
    if os.path.isfile(target_path):
        stored = _load_npz(target_path)
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
        target_desc = descriptors.describe(bank, edges, target_ds, progress=config.progress)
        atomic_write_bytes(
            target_path,
            _npz_bytes(descriptors=target_desc, ids=np.asarray(kept, np.int64), labels=target.labels),
        )
    outputs["target_descriptors"] = target_path

    if os.path.isfile(os.path.join(shard_dir, "index.json")):
        index = SourceIndex.load(shard_dir)
    else:
        source = source_training_images(config)
        index = SourceIndex.build(
            functools.partial(descriptors.describe, bank, edges, progress=config.progress),
            source,
            config.image_size,
            batch_size=config.batch_size,
            channels=channels,
            num_shards=config.num_shards,
            shard_index=config.shard_index,
            bin_edges=edges,
            channel_weights=weights,
            bank_config=json.loads(bank_config),
            progress=config.progress,
        )
        index.save(shard_dir)
    outputs["index"] = shard_dir

    topk_path = os.path.join(shard_dir, "topk.npz")
    if not os.path.isfile(topk_path):
        k = min(config.k_max, len(index.ids))
        if k == 0:
            # More shards than source images leaves this shard empty.
            ids = np.zeros((len(target_desc), 0), np.int64)
            distances = np.zeros((len(target_desc), 0), np.float64)
            labels = ids.copy()
        else:
            ids, distances = index.query(
                target_desc, k, edges, block_size=config.block_size, progress=config.progress
            )
            labels = index.neighbour_labels(ids)
        atomic_write_bytes(
            topk_path, _npz_bytes(ids=ids, distances=distances, neighbour_labels=labels)
        )
    return outputs


def source_training_images(config):
    """The source images searched: the source's training split (first
    `max_source` of it when set); index ids are positions in it."""
    from keras_seltransfer.training import load_train_test

    source, _ = load_train_test(config.source, config.test_fraction, config.split_seed)
    if config.max_source is not None and config.max_source < len(source):
        source = source.subset(np.arange(config.max_source))
    return source
