"""ImageSource: a labelled image collection, in memory or as files on disk.

Every loader of the data package (`data.readers`, `data.builtin`,
`data.sources.load_dataset`) returns an `ImageSource`, a small immutable
record of labels, class names and either the decoded images (in memory) or
the image file paths (on disk, decoded later by the tf.data pipeline in
`data.pipeline`).
"""

import dataclasses

import numpy as np

def _read_only(array):
    # A view, so the caller's array is not copied and stays writable for
    # them, while the frozen record cannot be changed through its fields.
    view = array.view()
    view.flags.writeable = False
    return view


@dataclasses.dataclass(frozen=True, eq=False)
class ImageSource:
    """A labelled image collection, either decoded in memory or on disk.

    Exactly one of `images` and `paths` is set. In-memory sources hold every
    image at one size; on-disk sources hold file paths that the input
    pipeline (`make_dataset`) reads, decodes, converts to `channels` and
    resizes. Arrays are stored as read-only views (not copies): the record
    is immutable through its fields, and `subset` makes new records.

    Args:
        labels: integer array of shape `[N]`, values in `[0, num_classes)`.
        class_names: sequence of distinct, non-empty class names; its length
            is the number of classes.
        channels: channel count of the images the pipeline produces by
            default: 1 (grayscale), 3 (RGB) or 4 (RGBA).
        images: uint8 array of shape `[N, H, W, channels]`, or None for an
            on-disk source.
        paths: array of `N` file paths (str), or None for an in-memory
            source.
        metadata: dict mapping column names to arrays of shape `[N]` with
            extra per-example information (for example ELPV's defect
            probability). Defaults to no columns.
        name: a short name for logs and reports.
        skipped: paths of files that were skipped as corrupt while scanning.

    Raises:
        ValueError: if the fields are inconsistent (see the messages).

    Example:

    >>> source = ImageSource(
    ...     labels=np.array([0, 1]),
    ...     class_names=("cat", "dog"),
    ...     channels=1,
    ...     images=np.zeros((2, 8, 8, 1), np.uint8),
    ... )
    >>> len(source), source.num_classes, source.in_memory
    (2, 2, True)
    """

    labels: np.ndarray
    class_names: tuple
    channels: int
    images: np.ndarray = None
    paths: np.ndarray = None
    metadata: dict = dataclasses.field(default_factory=dict)
    name: str = "images"
    skipped: tuple = ()

    def __post_init__(self):
        # Frozen dataclass: normalised values are set through object.__setattr__.
        set_field = lambda key, value: object.__setattr__(self, key, value)  # noqa: E731

        labels = np.asarray(self.labels)
        if labels.ndim != 1:
            raise ValueError(
                "Expected `labels` to be a 1-D array. "
                f"Received: labels.shape={labels.shape}"
            )
        if labels.size and not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(
                "Expected `labels` to have an integer dtype. "
                f"Received: labels.dtype={labels.dtype}"
            )
        labels = labels.astype(np.int64, copy=False)

        if isinstance(self.class_names, str):
            raise ValueError(
                "Expected `class_names` to be a sequence of names, not a single "
                f"string. Received: class_names={self.class_names!r}"
            )
        class_names = tuple(self.class_names)
        if not class_names:
            raise ValueError(
                "Expected `class_names` to name at least one class. "
                f"Received: class_names={class_names}"
            )
        if not all(isinstance(n, str) and n for n in class_names):
            raise ValueError(
                "Expected every entry of `class_names` to be a non-empty str. "
                f"Received: class_names={class_names}"
            )
        if len(set(class_names)) != len(class_names):
            raise ValueError(
                "Expected `class_names` to be distinct. "
                f"Received: class_names={class_names}"
            )
        check_label_range(labels, len(class_names))

        if isinstance(self.channels, bool) or self.channels not in (1, 3, 4):
            raise ValueError(
                "Expected `channels` to be 1, 3 or 4. "
                f"Received: channels={self.channels!r}"
            )

        if (self.images is None) == (self.paths is None):
            raise ValueError(
                "Expected exactly one of `images` and `paths` to be set. "
                f"Received: images is None={self.images is None}, "
                f"paths is None={self.paths is None}"
            )
        num = len(labels)
        images, paths = None, None
        if self.images is not None:
            images = np.asarray(self.images)
            if images.dtype != np.uint8 or images.ndim != 4:
                raise ValueError(
                    "Expected `images` to be a uint8 array of shape "
                    "[N, H, W, channels]. "
                    f"Received: images.dtype={images.dtype}, "
                    f"images.shape={images.shape}"
                )
            if images.shape[0] != num:
                raise ValueError(
                    "Expected `images` and `labels` to have the same length. "
                    f"Received: len(images)={images.shape[0]}, len(labels)={num}"
                )
            if images.shape[-1] != self.channels:
                raise ValueError(
                    "Expected the last axis of `images` to equal `channels`. "
                    f"Received: images.shape={images.shape}, "
                    f"channels={self.channels}"
                )
            images = _read_only(images)
        else:
            paths = np.asarray(self.paths)
            if paths.dtype.kind == "O" and all(isinstance(p, str) for p in paths.flat):
                paths = paths.astype(str)
            if paths.ndim != 1 or (paths.size and paths.dtype.kind != "U"):
                raise ValueError(
                    "Expected `paths` to be a 1-D array of str. "
                    f"Received: paths.shape={paths.shape}, paths.dtype={paths.dtype}"
                )
            paths = paths.astype(str, copy=False)
            if len(paths) != num:
                raise ValueError(
                    "Expected `paths` and `labels` to have the same length. "
                    f"Received: len(paths)={len(paths)}, len(labels)={num}"
                )
            paths = _read_only(paths)

        if not isinstance(self.metadata, dict):
            raise ValueError(
                "Expected `metadata` to be a dict of per-example arrays. "
                f"Received: metadata={type(self.metadata).__name__}"
            )
        metadata = {}
        for key, column in self.metadata.items():
            column = np.asarray(column)
            if not isinstance(key, str) or column.ndim != 1 or len(column) != num:
                raise ValueError(
                    "Expected every `metadata` entry to map a str key to an "
                    f"array of shape [{num}] (one value per example). "
                    f"Received: metadata[{key!r}].shape={column.shape}"
                )
            metadata[key] = _read_only(column)

        skipped = tuple(self.skipped)
        if not all(isinstance(p, str) for p in skipped):
            raise ValueError(
                "Expected `skipped` to be a sequence of str paths. "
                f"Received: skipped={self.skipped!r}"
            )
        if not isinstance(self.name, str):
            raise ValueError(f"Expected `name` to be a str. Received: name={self.name!r}")

        set_field("labels", _read_only(labels))
        set_field("class_names", class_names)
        set_field("channels", int(self.channels))
        set_field("images", images)
        set_field("paths", paths)
        set_field("metadata", metadata)
        set_field("skipped", skipped)

    def __len__(self):
        return len(self.labels)

    def __repr__(self):
        kind = "in memory" if self.in_memory else "on disk"
        return (
            f"ImageSource(name={self.name!r}, examples={len(self)}, "
            f"classes={self.num_classes}, channels={self.channels}, {kind})"
        )

    @property
    def num_classes(self):
        """The number of classes, `len(class_names)`."""
        return len(self.class_names)

    @property
    def in_memory(self):
        """True when the images are decoded in memory, False for file paths."""
        return self.images is not None

    def subset(self, indices):
        """Returns a new source with the examples at `indices`, in that order.

        Args:
            indices: 1-D array of integer indices in `[0, len(self))`.
                Repeats are allowed; negative indices are not.

        Returns:
            An `ImageSource` with the same class names, channels, name and
            `skipped` record, and labels, images or paths, and metadata
            indexed by `indices`.

        Raises:
            ValueError: if `indices` is not a 1-D integer array or an index
                is out of range.
        """
        indices = np.asarray(indices)
        if indices.size == 0:
            indices = indices.astype(np.int64)
        if indices.ndim != 1 or not np.issubdtype(indices.dtype, np.integer):
            raise ValueError(
                "Expected `indices` to be a 1-D array of integers. "
                f"Received: indices.shape={indices.shape}, indices.dtype={indices.dtype}"
            )
        bad = np.flatnonzero((indices < 0) | (indices >= len(self)))
        if bad.size:
            raise ValueError(
                f"Expected every index in `indices` to be in [0, {len(self)}). "
                f"Received: indices[{bad[0]}]={indices[bad[0]]}"
            )
        return dataclasses.replace(
            self,
            labels=self.labels[indices],
            images=None if self.images is None else self.images[indices],
            paths=None if self.paths is None else self.paths[indices],
            metadata={key: column[indices] for key, column in self.metadata.items()},
        )

    def class_counts(self):
        """Returns the number of examples of each class, shape `[num_classes]`."""
        return np.bincount(self.labels, minlength=self.num_classes).astype(np.int64)


def check_label_range(labels, num_classes):
    """Raises ValueError unless every label is in `[0, num_classes)`.

    Args:
        labels: NumPy int array of labels.
        num_classes: the number of classes.

    Raises:
        ValueError: naming the first label out of range.

    Example:

    >>> check_label_range(np.array([0, 2, 1]), 3)
    """
    bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
    if bad.size:
        raise ValueError(
            f"Expected every label to be in [0, {num_classes}) for "
            f"{num_classes} classes. Received: labels[{bad[0]}]={labels[bad[0]]}"
        )


__all__ = ["ImageSource", "check_label_range"]
