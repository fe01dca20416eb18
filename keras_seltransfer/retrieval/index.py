"""A saved, shardable index of source-image descriptors.

Selective joint fine-tuning searches a large source set for the images
nearest to every target image. The source is described once, with the bin
edges fitted on the target, into a `SourceIndex`: descriptors, labels and
the global example ids that map neighbours back to source images. Large
sources are described in shards (example `i` belongs to shard
`i % num_shards`), on several machines or processes if need be; the shard
indexes are saved, then either merged into one index or searched one by
one with the per-shard results combined by `topk.merge_topk`. Both
give exactly the neighbours of an unsharded index. `build_on_service`
describes the images on the workers of a tf.data service instead of in
this process, with the same result.

Reference:
    Ge and Yu, "Borrowing Treasures from the Wealthy: Deep Transfer Learning
    through Selective Joint Fine-Tuning", CVPR 2017.
"""

import json
import os

import numpy as np

from keras_seltransfer.retrieval.data_service import DEFAULT_TIMEOUT
from keras_seltransfer.retrieval.index_build import describe_shard
from keras_seltransfer.retrieval.index_build import describe_shard_on_service
from keras_seltransfer.retrieval.index_files import ARRAY_NAMES
from keras_seltransfer.retrieval.index_files import read_index_directory
from keras_seltransfer.retrieval.index_files import write_index_directory
from keras_seltransfer.retrieval.similarity import DEFAULT_MARGIN
from keras_seltransfer.retrieval.similarity import nearest_sources
from keras_seltransfer.utils.divergence import check_channel_weights
from keras_seltransfer.utils.divergence import check_histograms
from keras_seltransfer.utils.validation import check_int


class SourceIndex:
    """Descriptors of (a shard of) a source image set, ready to be searched.

    Holds, for `S` source images, their descriptors and what is needed to
    use and trust them: the labels and global ids of the images, the bin
    edges and channel weights the descriptors go with, and the filter
    bank's configuration. Arrays are stored as read-only views (copies
    only where a dtype conversion is needed).

    Usually made with `SourceIndex.build` and `SourceIndex.load` rather
    than directly.

    Args:
        descriptors: float array `[S, channels, bins]` of per-channel
            normalised histograms; stored as float32.
        labels: integer array `[S]`, the source labels of the images.
        ids: integer array `[S]` of distinct, non-negative global example
            indices into the source `ImageSource`.
        bin_edges: float array `[channels, bins + 1]`: the edges, fitted on
            the target images, that the descriptors were computed with.
        channel_weights: non-negative weights `[channels]` of the distance;
            None gives `1 / channels` each.
        bank_config: JSON-serialisable dict describing the filter bank.
            Stored as its JSON round trip (tuples become lists).
        num_shards: number of shards the source was split into.
        shard_index: which shard this is, in `[0, num_shards)`.
        metadata: JSON-serialisable dict of anything else worth keeping
            (`build` records the source name and size, image size and
            channels).

    Raises:
        ValueError: for arrays of the wrong rank, dtype or length, repeated
            or negative ids, non-finite bin edges, bad weights or shard
            arguments, or a config that is not JSON-serialisable.

    Example:

    >>> index = SourceIndex(
    ...     descriptors=np.full((3, 2, 4), 0.25),
    ...     labels=[0, 1, 1],
    ...     ids=[0, 1, 2],
    ...     bin_edges=np.tile(np.arange(5.0), (2, 1)),
    ... )
    >>> ids, distances = index.query(np.full((1, 2, 4), 0.25), 2, index.bin_edges)
    >>> ids.tolist()
    [[0, 1]]
    """

    def __init__(
        self,
        descriptors,
        labels,
        ids,
        bin_edges,
        channel_weights=None,
        bank_config=None,
        num_shards=1,
        shard_index=0,
        metadata=None,
    ):
        descriptors = np.asarray(descriptors)
        if descriptors.ndim != 3 or not (
            np.issubdtype(descriptors.dtype, np.floating) or descriptors.size == 0
        ):
            raise ValueError(
                "Expected `descriptors` to be a float array [S, channels, bins]. "
                f"Received: descriptors.shape={descriptors.shape}, "
                f"descriptors.dtype={descriptors.dtype}"
            )
        num, channels, bins = descriptors.shape
        labels = _integer_vector(labels, "labels", num)
        ids = _integer_vector(ids, "ids", num)
        if ids.size and ids.min() < 0:
            raise ValueError(
                "Expected `ids` to be non-negative example indices. "
                f"Received: ids.min()={ids.min()}"
            )
        repeated = _first_repeat(ids)
        if repeated is not None:
            raise ValueError(f"Expected `ids` to be distinct. Received: id {repeated} twice")
        bin_edges = np.asarray(bin_edges, dtype=np.float64)
        if bin_edges.shape != (channels, bins + 1):
            raise ValueError(
                "Expected `bin_edges` to have shape [channels, bins + 1] = "
                f"{(channels, bins + 1)} for descriptors of shape "
                f"{descriptors.shape}. Received: bin_edges.shape={bin_edges.shape}"
            )
        if not np.all(np.isfinite(bin_edges)):
            raise ValueError("Expected `bin_edges` to be finite. Received: non-finite bin_edges")
        num_shards = check_int(num_shards, "num_shards", 1)
        shard_index = check_int(
            shard_index, "shard_index", 0, num_shards - 1, f"an int in [0, {num_shards})"
        )

        self.descriptors = _read_only(descriptors, np.float32)
        self.labels = _read_only(labels, np.int64)
        self.ids = _read_only(ids, np.int64)
        self.bin_edges = _read_only(bin_edges, np.float64)
        self.channel_weights = _read_only(check_channel_weights(channel_weights, channels), np.float64)
        self.bank_config = _json_round_trip(bank_config, "bank_config")
        self.num_shards = num_shards
        self.shard_index = shard_index
        self.metadata = _json_round_trip(metadata, "metadata")

    def __len__(self):
        return self.descriptors.shape[0]

    def __repr__(self):
        return (
            f"SourceIndex(sources={len(self)}, channels={self.num_channels}, "
            f"bins={self.num_bins}, shard={self.shard_index}/{self.num_shards})"
        )

    @property
    def num_channels(self):
        """Filter channels per descriptor."""
        return self.descriptors.shape[1]

    @property
    def num_bins(self):
        """Histogram bins per channel."""
        return self.descriptors.shape[2]

    @classmethod
    def build(
        cls,
        describe_fn,
        source,
        image_size,
        batch_size=64,
        channels=None,
        num_shards=1,
        shard_index=0,
        bin_edges=None,
        channel_weights=None,
        bank_config=None,
        progress=True,
        metadata=None,
    ):
        """Describes one shard of a source image set.

        Example `i` of `source` belongs to shard `i % num_shards`, so shards
        are balanced and every shard samples the whole source. The shard's
        images go through one unshuffled, unaugmented `make_dataset`
        pipeline (not cached: it is read once) into `describe_fn`.

        Args:
            describe_fn: callable `describe_fn(dataset) -> array [N, C, B]`
                taking a `tf.data.Dataset` of `(images, labels)` batches
                (float32 raw pixels) and returning one descriptor per image
                in order, computed with `bin_edges`; for example
                `functools.partial(histograms.describe, bank, bin_edges)`.
                If it takes a `progress` keyword argument (as `describe`
                does), `progress` is passed on.
            source: the source `ImageSource` (all of it: sharding happens
                here).
            image_size: int or `(height, width)` the images are resized to.
            batch_size: images per batch.
            channels: None (the source's), 1 or 3; see `make_dataset`.
            num_shards: number of shards, >= 1.
            shard_index: the shard to describe, in `[0, num_shards)`.
            bin_edges: the `[C, B + 1]` edges `describe_fn` uses (fitted on
                the target images). Required.
            channel_weights: `[C]` distance weights; None gives `1 / C`.
            bank_config: JSON-serialisable dict describing the filter bank.
            progress: show progress (through `describe_fn`).
            metadata: JSON-serialisable dict added to the recorded metadata.

        Returns:
            A `SourceIndex` of the shard, ids ascending.

        Raises:
            ValueError: for bad arguments, or if `describe_fn` does not
                return one valid descriptor per image.
        """
        return cls(
            **describe_shard(
                describe_fn,
                source,
                image_size,
                batch_size=batch_size,
                channels=channels,
                num_shards=num_shards,
                shard_index=shard_index,
                bin_edges=bin_edges,
                progress=progress,
                metadata=metadata,
            ),
            channel_weights=channel_weights,
            bank_config=bank_config,
        )

    @classmethod
    def build_on_service(
        cls,
        describe_batch_fn,
        source,
        image_size,
        service,
        batch_size=64,
        channels=None,
        num_shards=1,
        shard_index=0,
        bin_edges=None,
        channel_weights=None,
        bank_config=None,
        timeout=DEFAULT_TIMEOUT,
        progress=True,
        metadata=None,
    ):
        """`build`, with the images described by the workers of a tf.data service.

        For sources too large to describe in one process: a dispatcher and
        any number of workers (`python -m apps.data_service`, on this
        machine or others) make the shard's batches and their descriptors;
        this process gathers them in id order. The shard, its batches and
        the ops are those of `build`, so the index is `build`'s (and that
        of a merge of `build`'s shards), bit for bit on CPU workers; on
        GPUs a filter response rounded to the other side of a bin edge
        moves a single count. `keras_seltransfer.retrieval.data_service`
        explains how, and why the tf.data service.

        Args:
            describe_batch_fn: a TensorFlow function of one batch of float32
                images `[batch, height, width, channels]` (raw pixels) to
                descriptors `[batch, C, B]` computed with `bin_edges`, for
                example `functools.partial(histograms.describe_batch, bank,
                bin_edges)`. Traced once; the values of the variables it
                reads go with the graph the workers run.
            source: the source `ImageSource` (all of it: sharding happens
                here). File sources must be readable at the same paths on
                every worker.
            image_size: int or `(height, width)` the images are resized to.
            service: the dispatcher's address, `"grpc://host:port"`.
            batch_size: images per batch (one batch is a worker's unit of work).
            channels: None (the source's), 1 or 3; see `make_dataset`.
            num_shards: number of shards, >= 1.
            shard_index: the shard to describe, in `[0, num_shards)`.
            bin_edges: the `[C, B + 1]` edges `describe_batch_fn` uses.
                Required.
            channel_weights: `[C]` distance weights; None gives `1 / C`.
            bank_config: JSON-serialisable dict describing the filter bank.
            timeout: seconds to wait for the dispatcher and then for each
                next batch before giving up.
            progress: show a progress bar over the batches.
            metadata: JSON-serialisable dict added to the recorded metadata.

        Returns:
            A `SourceIndex` of the shard, ids ascending.

        Raises:
            ValueError: for bad arguments (an address that is not
                `host:port` among them), or if `describe_batch_fn` does not
                give one valid descriptor per image or holds state.
            ConnectionError: if nothing accepts connections at `service`, or
                a worker lost batches during the job.
            TimeoutError: if no batch arrives for `timeout` seconds (no
                workers, or workers that cannot read the images).

        Example:

        ```python
        # python -m apps.data_service --role=dispatcher --port=5050, and workers:
        # python -m apps.data_service --role=worker --dispatcher_address=localhost:5050
        index = SourceIndex.build_on_service(
            functools.partial(histograms.describe_batch, bank, edges),
            source, 64, "grpc://localhost:5050", bin_edges=edges,
        )
        ```
        """
        return cls(
            **describe_shard_on_service(
                describe_batch_fn,
                source,
                image_size,
                service,
                batch_size=batch_size,
                channels=channels,
                num_shards=num_shards,
                shard_index=shard_index,
                bin_edges=bin_edges,
                timeout=timeout,
                progress=progress,
                metadata=metadata,
            ),
            channel_weights=channel_weights,
            bank_config=bank_config,
        )

    def save(self, path, overwrite=True):
        """Writes the index to the directory `path`, atomically.

        The directory holds `arrays.npz` (the arrays) and `index.json`
        (format version, shapes, shard, bank config and metadata). Both are
        written into a temporary sibling directory that replaces `path` only
        once complete, so a crash mid-write leaves the previous index (or
        none) in place, never a mix.

        Args:
            path: the index directory.
            overwrite: when False, an existing `path` raises
                `FileExistsError`.

        Returns:
            `path`.
        """
        config = {
            "num_sources": len(self),
            "num_channels": self.num_channels,
            "num_bins": self.num_bins,
            "num_shards": self.num_shards,
            "shard_index": self.shard_index,
            "bank_config": self.bank_config,
            "metadata": self.metadata,
        }
        arrays = {name: getattr(self, name) for name in ARRAY_NAMES}
        write_index_directory(path, arrays, config, overwrite=overwrite)
        return path

    @classmethod
    def load(cls, path):
        """Reads an index written by `save`.

        Args:
            path: the index directory.

        Returns:
            The `SourceIndex`.

        Raises:
            FileNotFoundError: if `path` or one of its files is missing.
            ValueError: if a file is corrupt, of another format version,
                the arrays' shapes disagree with each other or with
                `index.json`, or the descriptors are not valid histograms.
        """
        arrays, config = read_index_directory(path)
        try:
            # A tampered index (NaN, negative or unnormalised histograms)
            # would give meaningless distances without any error.
            check_histograms(arrays["descriptors"], "descriptors")
            return cls(
                num_shards=config["num_shards"],
                shard_index=config["shard_index"],
                bank_config=config["bank_config"],
                metadata=config["metadata"],
                **arrays,
            )
        except ValueError as e:
            raise ValueError(f"Inconsistent source index at {os.fspath(path)!r}: {e}") from e

    @classmethod
    def merge(cls, indexes):
        """Combines the shard indexes of one source into one index.

        Args:
            indexes: the `SourceIndex` of every shard (shard indices 0 to
                `num_shards - 1`, each once, in any order), all built with
                the same bin edges, channel weights and bank config.

        Returns:
            A `SourceIndex` with `num_shards=1`, ordered by id: equal to the
            index built without sharding. Its metadata is shard 0's.

        Raises:
            ValueError: for an empty list, anything but `SourceIndex`es,
                shards built with other bin edges, weights, bank config or
                shard count, a missing or repeated shard, or an id in two
                shards.
        """
        indexes = list(indexes)
        if not indexes or not all(isinstance(i, SourceIndex) for i in indexes):
            raise ValueError(
                "Expected `indexes` to be a non-empty list of SourceIndex. "
                f"Received: indexes={[type(i).__name__ for i in indexes]}"
            )
        first = indexes[0]
        for position, index in enumerate(indexes[1:], start=1):
            for name, same in (
                ("bin_edges", _same_array(index.bin_edges, first.bin_edges)),
                ("channel_weights", _same_array(index.channel_weights, first.channel_weights)),
                ("bank_config", index.bank_config == first.bank_config),
                ("num_shards", index.num_shards == first.num_shards),
            ):
                if not same:
                    raise ValueError(
                        f"Expected every shard to share the {name} of indexes[0]: "
                        "descriptors built differently are not comparable. "
                        f"Received: indexes[{position}] with another {name}"
                    )
        shard_indices = sorted(index.shard_index for index in indexes)
        repeated = _first_repeat(np.array(shard_indices))
        if repeated is not None:
            raise ValueError(
                f"Expected every shard once. Received: shard_index={repeated} twice"
            )
        missing = sorted(set(range(first.num_shards)) - set(shard_indices))
        if missing:
            raise ValueError(
                f"Expected all {first.num_shards} shards. Received: indexes "
                f"without shard_index {missing}"
            )
        ids = np.concatenate([index.ids for index in indexes])
        repeated = _first_repeat(ids)
        if repeated is not None:
            raise ValueError(
                f"Expected disjoint shards. Received: id {repeated} in two shards"
            )
        order = np.argsort(ids, kind="stable")
        shard0 = next(index for index in indexes if index.shard_index == 0)
        return cls(
            descriptors=np.concatenate([index.descriptors for index in indexes])[order],
            labels=np.concatenate([index.labels for index in indexes])[order],
            ids=ids[order],
            bin_edges=first.bin_edges,
            channel_weights=first.channel_weights,
            bank_config=first.bank_config,
            num_shards=1,
            shard_index=0,
            metadata=shard0.metadata,
        )

    def query(
        self,
        target_descriptors,
        k_max,
        target_bin_edges,
        block_size=4096,
        progress=False,
        dtype=None,
        mode="auto",
        margin=DEFAULT_MARGIN,
    ):
        """The `k_max` indexed source images nearest to every target.

        Uses `similarity.nearest_sources` with the index's channel weights;
        its search modes, exactness and tie rule apply (ties go to the lower
        position in the index, which is the lower id in a built or merged
        index). `mode="auto"` decides by the size of this index: search the
        shards of one source with the mode resolved for the whole source
        (as `apps.build_index` does) so that every shard uses the same one.

        Args:
            target_descriptors: `[T, channels, bins]` target descriptors.
            k_max: neighbours per target, in `[1, len(self)]`.
            target_bin_edges: the edges the target descriptors were computed
                with; they must equal the index's exactly, since histograms
                over other bins are not comparable.
            block_size: source rows per search block.
            progress: show a progress bar over the blocks.
            dtype: precision of the search GEMM; None: float64 in the exact
                mode, float32 in the fast mode (see `nearest_sources`).
            mode: `"exact"`, `"fast"` or `"auto"` (see `nearest_sources`).
            margin: survivors beyond `k_max` re-scored in the fast mode.

        Returns:
            `(ids, distances)`: int64 global source ids `[T, k_max]` and
            float64 distances `[T, k_max]`, nearest first.

        Raises:
            ValueError: if `target_bin_edges` differ from the index's,
                `k_max` is out of range, `mode` is unknown, `margin` is
                negative, or as `nearest_sources`.
        """
        edges = np.asarray(target_bin_edges, dtype=np.float64)
        if not _same_array(edges, self.bin_edges):
            detail = (
                f"max |difference|={np.max(np.abs(edges - self.bin_edges)):.3g}"
                if edges.shape == self.bin_edges.shape
                else f"shape {edges.shape} instead of {self.bin_edges.shape}"
            )
            raise ValueError(
                "Expected `target_bin_edges` to equal the bin edges the index "
                "was built with: descriptors over other bins are not "
                f"comparable. Received: target_bin_edges with {detail}"
            )
        k_max = check_int(
            k_max, "k_max", 1, len(self), f"an int in [1, {len(self)}] (the indexed sources)"
        )
        rows, distances = nearest_sources(
            target_descriptors,
            self.descriptors,
            k_max,
            channel_weights=self.channel_weights,
            block_size=block_size,
            dtype=dtype,
            progress=progress,
            mode=mode,
            margin=margin,
        )
        return self.ids[rows], distances

    def neighbour_labels(self, ids):
        """Source labels of global ids (e.g. those `query` returns).

        Args:
            ids: integer array of any shape, holding ids of this index.

        Returns:
            int64 array of the same shape.

        Raises:
            ValueError: for an id not in this index.
        """
        ids = np.asarray(ids)
        if ids.size and not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(
                f"Expected `ids` to be integers. Received: ids.dtype={ids.dtype}"
            )
        order = np.argsort(self.ids)
        sorted_ids = self.ids[order]
        positions = np.searchsorted(sorted_ids, ids)
        inside = positions < len(self)
        found = np.zeros(ids.shape, bool)
        found[inside] = sorted_ids[positions[inside]] == ids[inside]
        if not np.all(found):
            raise ValueError(
                "Expected every id to be in this index. "
                f"Received: ids containing {ids[~found].flat[0]}"
            )
        return self.labels[order[positions]]


def _integer_vector(value, name, length):
    array = np.asarray(value)
    if array.ndim != 1 or (array.size and not np.issubdtype(array.dtype, np.integer)):
        raise ValueError(
            f"Expected `{name}` to be a 1-D integer array. "
            f"Received: {name}.shape={array.shape}, {name}.dtype={array.dtype}"
        )
    if array.shape[0] != length:
        raise ValueError(
            f"Expected `{name}` to have one entry per descriptor ({length}). "
            f"Received: len({name})={array.shape[0]}"
        )
    return array


def _first_repeat(values):
    ordered = np.sort(values)
    repeats = ordered[1:][ordered[1:] == ordered[:-1]]
    return int(repeats[0]) if repeats.size else None


def _same_array(a, b):
    return a.shape == b.shape and np.array_equal(a, b)


def _read_only(array, dtype):
    # A view when no conversion is needed, as `ImageSource` does: a loaded
    # multi-gigabyte index is not copied twice, and the record cannot be
    # changed through its fields.
    view = np.asarray(array, dtype=dtype).view()
    view.flags.writeable = False
    return view


def _json_round_trip(value, name):
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ValueError(
            f"Expected `{name}` to be a dict. Received: {name}={type(value).__name__}"
        )
    try:
        # Strict JSON (no NaN), so that what is saved loads anywhere and an
        # index in memory equals the same index loaded.
        return json.loads(json.dumps(value, allow_nan=False))
    except (TypeError, ValueError) as e:
        raise ValueError(
            f"Expected `{name}` to be JSON-serialisable. Received: {name}={value!r} ({e})"
        ) from e
