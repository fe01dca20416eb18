"""Describing one shard of a source image set: the work of `SourceIndex.build`."""

import inspect

import numpy as np

from keras_seltransfer.data.image_source import ImageSource
from keras_seltransfer.data.pipeline import make_dataset
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
    if not callable(describe_fn):
        raise ValueError(
            "Expected `describe_fn` to be callable. "
            f"Received: describe_fn={type(describe_fn).__name__}"
        )
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
    shard = source.subset(ids)
    expected_shape = (len(ids), edges.shape[0], edges.shape[1] - 1)
    if len(ids):
        dataset = make_dataset(
            shard, (height, width), batch_size, channels=channels, cache=False
        )
        descriptors = _call_describe(describe_fn, dataset, progress)
    else:
        # More shards than examples: an empty shard still merges.
        descriptors = np.zeros(expected_shape, np.float32)
    if not isinstance(descriptors, np.ndarray) or descriptors.shape != expected_shape:
        raise ValueError(
            "Expected `describe_fn` to return an array of shape "
            f"{expected_shape}: one [channels, bins] descriptor per image "
            "of the shard, with bin_edges' channels and bins. "
            f"Received: shape={getattr(descriptors, 'shape', None)}, "
            f"type={type(descriptors).__name__}"
        )
    check_histograms(descriptors, "describe_fn(dataset)")

    recorded = {
        "source_name": source.name,
        "source_size": len(source),
        "image_size": [height, width],
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
        labels=shard.labels,
        ids=ids,
        bin_edges=edges,
        num_shards=num_shards,
        shard_index=shard_index,
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


__all__ = ["describe_shard"]
