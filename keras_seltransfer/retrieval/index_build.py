"""Describing one shard of a source image set: the work of `SourceIndex.build`
(in this process) and of `SourceIndex.build_on_service` (on a tf.data service)."""

import collections
import inspect

import numpy as np

from keras_seltransfer.data.image_source import ImageSource
from keras_seltransfer.data.pipeline import make_dataset
from keras_seltransfer.retrieval.data_service import DEFAULT_TIMEOUT
from keras_seltransfer.retrieval.data_service import describe_on_service
from keras_seltransfer.retrieval.data_service import service_address
from keras_seltransfer.utils.divergence import check_histograms
from keras_seltransfer.utils.validation import check_int
from keras_seltransfer.utils.validation import image_size_pair


def describe_shard(
    describe_fn,
    source,
    image_size,
    *,
    batch_size=64,
    channels=None,
    num_shards=1,
    shard_index=0,
    bin_edges=None,
    progress=True,
    metadata=None,
):
    """Describes shard `shard_index` of `source` (examples `i % num_shards`).

    The arguments are those of `SourceIndex.build`, which documents them.

    Returns:
        A dict of `SourceIndex` arguments: `descriptors`, `labels`, `ids`
        (ascending), `bin_edges`, `num_shards`, `shard_index` and `metadata`
        (the source's name and size, the image size and channels, updated
        with `metadata`).

    Raises:
        ValueError: for bad arguments, or if `describe_fn` does not return
            one valid descriptor per image.

    Example:

    >>> arguments = describe_shard(describe_fn, source, 64, bin_edges=edges)  # doctest: +SKIP
    >>> index = SourceIndex(**arguments)  # doctest: +SKIP
    """
    _check_callable(describe_fn, "describe_fn")
    plan = _plan_shard(source, image_size, batch_size, num_shards, shard_index, bin_edges)
    if len(plan.ids):
        dataset = make_dataset(
            plan.shard, plan.image_size, plan.batch_size, channels=channels, cache=False
        )
        descriptors = _call_describe(describe_fn, dataset, progress)
    else:
        # More shards than examples: an empty shard still merges.
        descriptors = np.zeros(plan.expected_shape, np.float32)
    return _shard_arguments(plan, descriptors, "describe_fn(dataset)", source, channels, metadata)


def describe_shard_on_service(
    describe_batch_fn,
    source,
    image_size,
    service,
    *,
    batch_size=64,
    channels=None,
    num_shards=1,
    shard_index=0,
    bin_edges=None,
    timeout=DEFAULT_TIMEOUT,
    progress=True,
    metadata=None,
):
    """`describe_shard` with the images described by tf.data service workers.

    The work of `SourceIndex.build_on_service`, which documents the
    arguments. The shard's descriptors are computed by
    `data_service.describe_on_service` in the batches the local build
    forms, so the result is `describe_shard`'s (bit for bit on CPU workers;
    see `data_service` for other devices).

    Returns:
        The dict of `SourceIndex` arguments `describe_shard` returns.

    Raises:
        ValueError: for bad arguments, or if `describe_batch_fn` does not
            give one valid descriptor per image.
        ConnectionError: if the dispatcher cannot be reached, or batches
            were lost.
        TimeoutError: if the service sends no batch for `timeout` seconds.

    Example:

    >>> arguments = describe_shard_on_service(
    ...     functools.partial(describe_batch, bank, edges), source, 64,
    ...     "grpc://localhost:5050", bin_edges=edges)  # doctest: +SKIP
    >>> index = SourceIndex(**arguments)  # doctest: +SKIP
    """
    _check_callable(describe_batch_fn, "describe_batch_fn")
    address = service_address(service)
    plan = _plan_shard(source, image_size, batch_size, num_shards, shard_index, bin_edges)
    if len(plan.ids):
        descriptors = describe_on_service(
            describe_batch_fn,
            plan.shard,
            plan.image_size,
            address,
            batch_size=plan.batch_size,
            channels=channels,
            descriptor_shape=plan.expected_shape[1:],
            timeout=timeout,
            progress=progress,
        )
    else:
        descriptors = np.zeros(plan.expected_shape, np.float32)
    return _shard_arguments(
        plan, descriptors, "describe_batch_fn(images)", source, channels, metadata
    )


# What `describe_shard` and `describe_shard_on_service` share: the checked
# arguments and the shard's examples.
_ShardPlan = collections.namedtuple(
    "_ShardPlan",
    ["ids", "shard", "edges", "image_size", "batch_size", "num_shards", "shard_index",
     "expected_shape"],
)


def _check_callable(fn, name):
    if not callable(fn):
        raise ValueError(f"Expected `{name}` to be callable. Received: {name}={type(fn).__name__}")


def _plan_shard(source, image_size, batch_size, num_shards, shard_index, bin_edges):
    if not isinstance(source, ImageSource):
        raise ValueError(
            "Expected `source` to be an ImageSource. "
            f"Received: source={type(source).__name__}"
        )
    num_shards = check_int(num_shards, "num_shards", 1)
    shard_index = check_int(
        shard_index, "shard_index", 0, num_shards - 1, f"an int in [0, {num_shards})"
    )
    if bin_edges is None:
        raise ValueError(
            "Expected `bin_edges`, the [channels, bins + 1] edges the "
            "descriptors are computed with. Received: bin_edges=None"
        )
    edges = np.asarray(bin_edges, dtype=np.float64)
    if edges.ndim != 2 or edges.shape[1] < 2:
        raise ValueError(
            "Expected `bin_edges` to have shape [channels, bins + 1]. "
            f"Received: bin_edges.shape={edges.shape}"
        )
    height, width = image_size_pair(image_size)
    batch_size = check_int(batch_size, "batch_size", 1)
    ids = np.arange(shard_index, len(source), num_shards, dtype=np.int64)
    return _ShardPlan(
        ids=ids,
        shard=source.subset(ids),
        edges=edges,
        image_size=(height, width),
        batch_size=batch_size,
        num_shards=num_shards,
        shard_index=shard_index,
        expected_shape=(len(ids), edges.shape[0], edges.shape[1] - 1),
    )


def _shard_arguments(plan, descriptors, call, source, channels, metadata):
    """The `SourceIndex` arguments of a described shard, checked; `call`
    names what computed the descriptors in errors."""
    if not isinstance(descriptors, np.ndarray) or descriptors.shape != plan.expected_shape:
        raise ValueError(
            f"Expected `{call.split('(')[0]}` to return an array of shape "
            f"{plan.expected_shape}: one [channels, bins] descriptor per image "
            "of the shard, with bin_edges' channels and bins. "
            f"Received: shape={getattr(descriptors, 'shape', None)}, "
            f"type={type(descriptors).__name__}"
        )
    check_histograms(descriptors, call)

    recorded = {
        "source_name": source.name,
        "source_size": len(source),
        "image_size": list(plan.image_size),
        "channels": source.channels if channels is None else int(channels),
    }
    if metadata is not None:
        if not isinstance(metadata, dict):
            raise ValueError(
                "Expected `metadata` to be a dict. "
                f"Received: metadata={type(metadata).__name__}"
            )
        recorded.update(metadata)
    return dict(
        descriptors=descriptors,
        labels=plan.shard.labels,
        ids=plan.ids,
        bin_edges=plan.edges,
        num_shards=plan.num_shards,
        shard_index=plan.shard_index,
        metadata=recorded,
    )


def _call_describe(describe_fn, dataset, progress):
    try:
        parameters = inspect.signature(describe_fn).parameters
    except (TypeError, ValueError):
        parameters = {}
    takes_progress = "progress" in parameters or any(
        p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()
    )
    if takes_progress:
        return describe_fn(dataset, progress=progress)
    return describe_fn(dataset)


__all__ = ["describe_shard", "describe_shard_on_service"]
