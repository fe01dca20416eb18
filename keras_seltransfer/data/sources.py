"""Labelled image collections: in memory, on disk, and the offline data sets.

Every loader returns an `ImageSource`, a small immutable record of labels,
class names and either the decoded images (in memory) or the image file
paths (on disk, decoded later by the tf.data pipeline in `pipeline.py`).
Nothing here touches TensorFlow except `from_tfds`, which imports
TensorFlow Datasets only when called.
"""

import dataclasses
import gzip
import importlib.util
import os
import struct
import warnings
import zlib

import numpy as np
from PIL import Image

from keras_seltransfer.utils.io import load_npz

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"

FASHION_MNIST_CLASS_NAMES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)

ELPV_CLASS_NAMES = ("functional", "defective")

# The three CC0 texture photographs that scikit-image ships inside its wheel
# (`skimage.data.brick()`, `grass()`, `gravel()`), one class each.
TEXTURE_CLASS_NAMES = ("brick", "grass", "gravel")

# Specs whose loader has its own test split (`load_dataset(spec, "test")`),
# so `holdout_split` is not applied to them.
SPECS_WITH_TEST_SPLIT = ("fashion_mnist", "textures")

DEFAULT_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif")

_FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}

# IDX magic numbers: two zero bytes, the element type (0x08 = unsigned byte)
# and the number of dimensions.
_IDX_IMAGES_MAGIC = 0x00000803
_IDX_LABELS_MAGIC = 0x00000801

# Formats that `tf.io.decode_image` can decode; anything else PIL opens
# (TIFF, WebP, ...) would only fail later, inside the input pipeline.
# MPO is the multi-picture JPEG some cameras write; its first frame is JPEG.
_TF_DECODABLE_FORMATS = ("PNG", "JPEG", "MPO", "BMP", "GIF")

_RGBA_MODES = ("RGBA", "RGBa")
_GRAY_MODES = ("1", "L", "LA", "La", "I", "F")

_SPEC_FORMS = (
    "'fashion_mnist' (split 'train' or 'test')",
    "'elpv' (split None or 'all')",
    "'textures' (split None, 'all', 'train' or 'test')",
    "'folder:/path' (split optional: reads /path/<split>)",
    "'tfds:name' (split required)",
    "'numpy:/path/file.npz' (arrays 'images', 'labels', optional 'class_names')",
)


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
        _check_label_range(labels, len(class_names))

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


def _check_label_range(labels, num_classes):
    bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
    if bad.size:
        raise ValueError(
            f"Expected every label to be in [0, {num_classes}) for "
            f"{num_classes} classes. Received: labels[{bad[0]}]={labels[bad[0]]}"
        )


def from_numpy(images, labels, class_names=None, name="numpy"):
    """Builds an in-memory `ImageSource` from NumPy arrays.

    Args:
        images: array of shape `[N, H, W]` (a channel axis is added) or
            `[N, H, W, C]` with C in 1, 3 or 4. uint8 is used as is; other
            integer or float arrays must hold finite values in `[0, 255]`
            and are rounded to the nearest integer and cast to uint8
            (rounding, because truncation would darken every image by half
            a grey level on average).
        labels: integer array of shape `[N]` with values in
            `[0, num_classes)`. Float arrays holding whole numbers are
            accepted.
        class_names: sequence of class names. Defaults to `"0"`, `"1"`, ...
            up to the largest label.
        name: a short name for logs and reports.

    Returns:
        An in-memory `ImageSource`.

    Raises:
        ValueError: for empty input, a wrong rank or channel count, NaN or
            infinite pixels, pixels outside `[0, 255]`, non-integer labels,
            a label out of range, or different lengths of `images` and
            `labels`.

    Example:

    >>> source = from_numpy(np.zeros((4, 28, 28), np.uint8), [0, 1, 2, 1])
    >>> source.images.shape, source.class_names
    ((4, 28, 28, 1), ('0', '1', '2'))
    """
    images = np.asarray(images)
    labels = np.asarray(labels)
    original_shape = images.shape
    if images.size == 0 or labels.size == 0:
        raise ValueError(
            "Expected at least one image and one label. "
            f"Received: images.shape={images.shape}, labels.shape={labels.shape}"
        )
    if images.ndim == 3:
        images = images[..., np.newaxis]
    if images.ndim != 4 or images.shape[-1] not in (1, 3, 4):
        raise ValueError(
            "Expected `images` of shape [N, H, W] or [N, H, W, C] with C in "
            f"(1, 3, 4). Received: images.shape={original_shape}"
        )
    if labels.ndim != 1:
        raise ValueError(
            f"Expected `labels` to be a 1-D array. Received: labels.shape={labels.shape}"
        )
    if len(images) != len(labels):
        raise ValueError(
            "Expected `images` and `labels` to have the same length. "
            f"Received: len(images)={len(images)}, len(labels)={len(labels)}"
        )
    images = _to_uint8(images)
    labels = _to_int_labels(labels)
    if class_names is None:
        negative = np.flatnonzero(labels < 0)
        if negative.size:
            raise ValueError(
                "Expected non-negative integer labels. "
                f"Received: labels[{negative[0]}]={labels[negative[0]]}"
            )
        class_names = tuple(str(i) for i in range(int(labels.max()) + 1))
    else:
        class_names = tuple(str(n) for n in class_names)
        _check_label_range(labels, len(class_names))
    return ImageSource(
        labels=labels,
        class_names=class_names,
        channels=images.shape[-1],
        images=images,
        name=name,
    )


def _to_uint8(images):
    if images.dtype == np.uint8:
        return images
    kind = images.dtype.kind
    if kind not in "iuf":
        raise ValueError(
            "Expected `images` to have an integer or float dtype. "
            f"Received: images.dtype={images.dtype}"
        )
    if kind == "f" and not np.all(np.isfinite(images)):
        index = tuple(int(i) for i in np.argwhere(~np.isfinite(images))[0])
        raise ValueError(
            "Expected `images` to hold finite values; found NaN or inf. "
            f"Received: images[{index}]={images[index]}"
        )
    low, high = images.min(), images.max()
    if low < 0 or high > 255:
        raise ValueError(
            "Expected pixel values of `images` in [0, 255] (raw pixels, not "
            f"normalised). Received: images.min()={low}, images.max()={high}"
        )
    if kind == "f":
        images = np.rint(images)
    return images.astype(np.uint8)


def _to_int_labels(labels):
    if labels.dtype.kind in "iu":
        return labels.astype(np.int64)
    if labels.dtype.kind == "f":
        bad = np.flatnonzero(~np.isfinite(labels) | (labels != np.round(labels)))
        if bad.size:
            raise ValueError(
                "Expected integer class labels. "
                f"Received: labels[{bad[0]}]={labels[bad[0]]}"
            )
        return labels.astype(np.int64)
    raise ValueError(
        "Expected integer class labels. "
        f"Received: labels.dtype={labels.dtype}"
    )


def _mode_channels(mode):
    """Channel count the pipeline gives an image of this PIL mode by default.

    Alpha is dropped unless the image is RGBA; palette images count as RGB,
    since `tf.io.decode_image` expands palettes to RGB.
    """
    if mode in _RGBA_MODES:
        return 4
    if mode in _GRAY_MODES or mode.startswith("I;"):
        return 1
    return 3


def _inspect_image(path):
    """Returns `(channels, None)` for a usable image, `(None, reason)` if not."""
    try:
        with warnings.catch_warnings():
            # PIL only warns for images above `Image.MAX_IMAGE_PIXELS` (and
            # refuses twice that): such a file, usually a few bytes declaring
            # a gigantic size, would make the input pipeline allocate
            # gigabytes per image, so it is refused like a corrupt one.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                image.verify()
            # `verify` checks structure (and PNG checksums) but does not
            # decode, and leaves the file object unusable: reopen and decode
            # fully to catch truncated pixel data and learn the mode.
            with Image.open(path) as image:
                image.load()
                mode, image_format = image.mode, image.format
    # PIL reports broken files with many exception types (OSError,
    # SyntaxError, struct.error, zlib.error, EOFError, ...); every one of
    # them means the file is unusable, and the caller either raises with the
    # reason or records the file as skipped.
    except Exception as error:  # noqa: BLE001
        return None, f"{type(error).__name__}: {error}"
    if image_format not in _TF_DECODABLE_FORMATS:
        return None, (
            f"{image_format} images cannot be decoded by tf.io.decode_image "
            f"(supported: {', '.join(_TF_DECODABLE_FORMATS)})"
        )
    return _mode_channels(mode), None


def from_image_folder(
    directory,
    class_names=None,
    skip_corrupt=False,
    channels=None,
    extensions=DEFAULT_EXTENSIONS,
    allow_empty_classes=False,
):
    """Scans a folder with one sub-folder per class into an on-disk source.

    Every file whose name ends with one of `extensions` (case-insensitive)
    anywhere under a class sub-folder is opened, verified and fully decoded
    once with PIL, so that corrupt or truncated files are found here, by
    name, rather than part-way through training. Hidden files are ignored.
    The images themselves are not kept: the input pipeline decodes them
    again from disk.

    Images above PIL's decompression-bomb limit (`PIL.Image.MAX_IMAGE_PIXELS`,
    about 89 megapixels) count as unreadable: raise that limit to accept
    larger ones.

    Channel counts are taken from the PIL mode: grayscale (`L`, `LA`, `I`,
    ...) counts as 1, `RGBA` as 4, everything else (RGB, palette, CMYK) as 3;
    alpha is dropped except for RGBA. When `channels` is None all images must
    agree, so that a batch never mixes layouts; with `channels` set, every
    image is converted to it in the pipeline.

    Args:
        directory: the root folder.
        class_names: the class sub-folders to use, in label order. Defaults
            to every sub-folder (hidden ones excluded), sorted by name. Other
            sub-folders are ignored when given.
        skip_corrupt: when True, unreadable files are skipped with a warning
            and listed in the source's `skipped`; when False they raise.
        channels: None (keep the images' common channel count), 1 or 3.
        extensions: file name endings to load.
        allow_empty_classes: when True, a class of `class_names` may have
            no sub-folder or no readable images (a test split that lacks
            some of the training classes): it keeps its label and has no
            examples. Requires `class_names`.

    Returns:
        An on-disk `ImageSource` named after the folder, with absolute paths
        sorted by class and then by path.

    Raises:
        FileNotFoundError: if `directory` or a named class folder does not
            exist (unless `allow_empty_classes`).
        ValueError: if there are no class folders, a class has no images
            (unless `allow_empty_classes`), the folder has no images at all,
            a file is unreadable (and `skip_corrupt` is False), or channel
            counts differ while `channels` is None.

    Example:

    >>> source = from_image_folder("flowers/train", channels=3)  # doctest: +SKIP
    >>> source.class_names  # doctest: +SKIP
    ('daisy', 'rose', 'tulip')
    """
    directory = os.path.abspath(os.fspath(directory))
    if not os.path.exists(directory):
        raise FileNotFoundError(
            f"Expected `directory` to be an existing folder. Received: directory={directory}"
        )
    if not os.path.isdir(directory):
        raise ValueError(
            f"Expected `directory` to be a folder, not a file. Received: directory={directory}"
        )
    if channels is not None and (isinstance(channels, bool) or channels not in (1, 3)):
        raise ValueError(
            f"Expected `channels` to be None, 1 or 3. Received: channels={channels!r}"
        )
    if isinstance(extensions, str):
        extensions = (extensions,)
    extensions = tuple(e.lower() for e in extensions)
    if not extensions:
        raise ValueError(
            f"Expected at least one file extension. Received: extensions={extensions}"
        )

    if allow_empty_classes and class_names is None:
        raise ValueError(
            "`allow_empty_classes` needs `class_names`: the classes a folder may "
            "lack must be named. Received: class_names=None"
        )

    if class_names is None:
        class_names = sorted(
            entry.name
            for entry in os.scandir(directory)
            if entry.is_dir() and not entry.name.startswith(".")
        )
        if not class_names:
            raise ValueError(
                "Expected one sub-folder per class under `directory`; found "
                f"none. Received: directory={directory}"
            )
    else:
        class_names = tuple(class_names)
        for class_name in class_names:
            if not allow_empty_classes and not os.path.isdir(os.path.join(directory, class_name)):
                raise FileNotFoundError(
                    f"Expected a sub-folder for class {class_name!r} under "
                    f"{directory}. Received: class_names={class_names}"
                )

    paths, labels, file_channels, skipped = [], [], [], []
    for label, class_name in enumerate(class_names):
        class_dir = os.path.join(directory, class_name)
        found, skipped_here = 0, 0
        files = _list_files(class_dir, extensions) if os.path.isdir(class_dir) else []
        for path in files:
            num_channels, reason = _inspect_image(path)
            if num_channels is None:
                if not skip_corrupt:
                    raise ValueError(
                        f"Could not read image file {path} ({reason}). Remove "
                        "or replace it (or, from Python, pass skip_corrupt=True "
                        "to skip unreadable files and list them in the source's "
                        f"`skipped`). Received: skip_corrupt={skip_corrupt}"
                    )
                skipped.append(path)
                skipped_here += 1
                continue
            paths.append(path)
            labels.append(label)
            file_channels.append(num_channels)
            found += 1
        if not found and not allow_empty_classes:
            raise ValueError(
                f"Class folder {class_name!r} ({class_dir}) has no readable "
                f"images with extensions {extensions} ({skipped_here} "
                "unreadable file(s) skipped)."
            )
    if not paths:
        raise ValueError(
            f"Found no readable images with extensions {extensions} under "
            f"{directory} ({len(skipped)} unreadable file(s) skipped). "
            f"Received: class_names={tuple(class_names)}"
        )

    if skipped:
        warnings.warn(
            f"Skipped {len(skipped)} corrupt or unreadable image file(s) under "
            f"{directory}, for example {skipped[0]}. They are listed in the "
            "source's `skipped` attribute.",
            stacklevel=2,
        )

    file_channels = np.asarray(file_channels)
    if channels is None:
        kinds = np.unique(file_channels)
        if len(kinds) > 1:
            first = paths[int(np.flatnonzero(file_channels == kinds[0])[0])]
            second = paths[int(np.flatnonzero(file_channels == kinds[1])[0])]
            raise ValueError(
                "Found images with different channel counts under "
                f"{directory}: {first} has {kinds[0]} channel(s) and {second} "
                f"has {kinds[1]}. Pass channels=1 or channels=3 to convert "
                f"every image. Received: channels={channels}"
            )
        channels = int(kinds[0])

    return ImageSource(
        labels=np.asarray(labels, np.int64),
        class_names=tuple(class_names),
        channels=channels,
        paths=np.asarray(paths, dtype=str),
        name=os.path.basename(directory) or directory,
        skipped=tuple(skipped),
    )


def _list_files(class_dir, extensions):
    found = []
    for root, dirs, files in os.walk(class_dir, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for filename in files:
            if not filename.startswith(".") and filename.lower().endswith(extensions):
                found.append(os.path.join(root, filename))
    return sorted(found)


def from_tfds(
    name,
    split,
    data_dir=None,
    download=False,
    image_key="image",
    label_key="label",
    max_examples=None,
):
    """Loads a TensorFlow Datasets split into an in-memory `ImageSource`.

    Meant for target-sized sets (up to some tens of thousands of small
    images): every example is decoded into one NumPy array. All images of
    the split must have the same shape. Class names come from the label
    feature of the dataset info when it has them.

    Args:
        name: the TFDS dataset name, e.g. `"fashion_mnist"`, optionally
            with a version (`"mnist:3.*.*"`).
        split: the TFDS split, e.g. `"train"`, `"test"` or `"train[:10%]"`.
        data_dir: the TFDS data folder. Defaults to TFDS' default
            (`$TFDS_DATA_DIR` or `~/tensorflow_datasets`).
        download: whether TFDS may download and prepare the data when it is
            not in `data_dir`. Needs internet access.
        image_key: the feature holding the image.
        label_key: the feature holding the integer class label.
        max_examples: keep only the first `max_examples` examples.

    Returns:
        An in-memory `ImageSource` named `name`.

    Raises:
        FileNotFoundError: if the data is not prepared in `data_dir` and
            `download` is False.
        ValueError: for an unknown dataset name, a missing feature, images
            of different shapes, or a non-positive `max_examples`.
    """
    if max_examples is not None and (
        isinstance(max_examples, bool) or not isinstance(max_examples, int) or max_examples <= 0
    ):
        raise ValueError(
            "Expected `max_examples` to be None or a positive int. "
            f"Received: max_examples={max_examples!r}"
        )
    # Imported here: TFDS is slow to import and only this loader needs it.
    import tensorflow_datasets as tfds

    try:
        dataset, info = tfds.load(
            name,
            split=split,
            data_dir=data_dir,
            download=download,
            with_info=True,
            shuffle_files=False,
        )
    except tfds.core.registered.DatasetNotFoundError as error:
        # TFDS' own message lists every registered data set.
        raise ValueError(
            f"TFDS has no data set named {name!r}. Received: name={name!r}"
        ) from error
    except AssertionError as error:
        # TFDS asserts when the prepared data is missing and download=False.
        raise FileNotFoundError(
            f"TFDS data set {name!r} (split {split!r}) is not prepared in "
            f"data_dir={data_dir or 'the TFDS default'}. Pass download=True (needs "
            "internet access) or prepare it with `tfds build`. "
            f"Received: download={download}"
        ) from error

    if image_key not in info.features or label_key not in info.features:
        raise ValueError(
            f"Expected features {image_key!r} and {label_key!r} in TFDS data set "
            f"{name!r}; it has {sorted(info.features.keys())}. "
            f"Received: image_key={image_key!r}, label_key={label_key!r}"
        )
    if max_examples is not None:
        dataset = dataset.take(max_examples)
    images, labels = [], []
    for example in tfds.as_numpy(dataset):
        images.append(example[image_key])
        labels.append(example[label_key])
    if not images:
        raise ValueError(f"TFDS split {split!r} of {name!r} has no examples.")
    shapes = {image.shape for image in images}
    if len(shapes) > 1:
        raise ValueError(
            f"TFDS data set {name!r} has images of different shapes (e.g. "
            f"{sorted(shapes)[:2]}); `from_tfds` needs equal shapes. Export the "
            "images to a folder and use `from_image_folder`, which resizes."
        )
    label_feature = info.features[label_key]
    class_names = getattr(label_feature, "names", None)
    if not class_names:
        num_classes = getattr(label_feature, "num_classes", None)
        class_names = [str(i) for i in range(num_classes or int(np.max(labels)) + 1)]
    return from_numpy(np.stack(images), np.asarray(labels), class_names, name=name)


def load_fashion_mnist(split="train", data_dir=None):
    """Loads a Fashion-MNIST split from its gzip IDX files.

    The files are the four standard ones (`train-images-idx3-ubyte.gz`,
    `train-labels-idx1-ubyte.gz`, `t10k-...`), as installed offline by the
    Debian package `dataset-fashion-mnist`. If `data_dir` is None and the
    default folder lacks the split's files, this falls back to
    `from_tfds("fashion_mnist", split, download=True)`, which needs internet
    access the first time, and warns. An explicit `data_dir` never falls
    back: missing files there raise.

    Args:
        split: `"train"` (60000 images) or `"test"` (10000 images).
        data_dir: the folder holding the gzip IDX files. Defaults to
            `/usr/share/datasets/fashion-mnist`.

    Returns:
        An in-memory `ImageSource` named `"fashion_mnist"`: uint8 images of
        shape `[N, 28, 28, 1]` and the 10 Fashion-MNIST class names.

    Raises:
        ValueError: for an unknown split, or a file that is not a valid
            gzip IDX file of the expected kind (bad gzip data, wrong magic
            number, size not matching the header, images and labels of
            different counts, labels out of range).
        FileNotFoundError: if an explicit `data_dir` lacks a file.

    Reference:
        Xiao, Rasul and Vollgraf, "Fashion-MNIST: a Novel Image Dataset for
        Benchmarking Machine Learning Algorithms", 2017.
    """
    if split not in _FASHION_MNIST_FILES:
        raise ValueError(
            f"Expected `split` to be 'train' or 'test'. Received: split={split!r}"
        )
    image_file, label_file = _FASHION_MNIST_FILES[split]
    folder = FASHION_MNIST_DIR if data_dir is None else os.fspath(data_dir)
    image_path = os.path.join(folder, image_file)
    label_path = os.path.join(folder, label_file)
    missing = [p for p in (image_path, label_path) if not os.path.isfile(p)]
    if missing:
        if data_dir is not None:
            raise FileNotFoundError(
                f"Fashion-MNIST file {missing[0]} not found. "
                f"Received: data_dir={data_dir}"
            )
        warnings.warn(
            f"Fashion-MNIST files not found in {folder}; loading through "
            "TensorFlow Datasets with download=True instead.",
            stacklevel=2,
        )
        source = from_tfds("fashion_mnist", split, download=True)
        return dataclasses.replace(
            source, class_names=FASHION_MNIST_CLASS_NAMES, name="fashion_mnist"
        )
    images = _read_idx(image_path, _IDX_IMAGES_MAGIC, 3)
    labels = _read_idx(label_path, _IDX_LABELS_MAGIC, 1)
    if len(images) != len(labels):
        raise ValueError(
            f"Fashion-MNIST files disagree: {image_path} has {len(images)} "
            f"images but {label_path} has {len(labels)} labels."
        )
    if labels.size and labels.max() >= len(FASHION_MNIST_CLASS_NAMES):
        raise ValueError(
            f"Fashion-MNIST label file {label_path} holds label "
            f"{int(labels.max())}; expected labels in [0, 10)."
        )
    return from_numpy(images, labels, FASHION_MNIST_CLASS_NAMES, name="fashion_mnist")


def _read_idx(path, expected_magic, expected_rank):
    """Reads a gzip IDX file of unsigned bytes into an array."""
    try:
        with gzip.open(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError, zlib.error) as error:
        raise ValueError(
            f"Could not decompress IDX file {path} ({type(error).__name__}: "
            f"{error}); the file is corrupt or not gzip-compressed."
        ) from error
    header_size = 4 + 4 * expected_rank
    if len(data) < header_size:
        raise ValueError(
            f"IDX file {path} is too short ({len(data)} bytes) to hold its header."
        )
    (magic,) = struct.unpack(">I", data[:4])
    if magic != expected_magic:
        raise ValueError(
            f"IDX file {path} has magic number {magic:#010x}; expected "
            f"{expected_magic:#010x} (unsigned bytes, {expected_rank} dimension(s))."
        )
    shape = struct.unpack(f">{expected_rank}I", data[4:header_size])
    expected_bytes = int(np.prod(shape, dtype=np.int64))
    if len(data) - header_size != expected_bytes:
        raise ValueError(
            f"IDX file {path} declares shape {shape} ({expected_bytes} bytes) "
            f"but holds {len(data) - header_size} bytes of data."
        )
    return np.frombuffer(data, np.uint8, offset=header_size).reshape(shape)


def _package_data_dir(module, pip_name, what, contents):
    """The `data` folder inside an installed package, or a clear ImportError."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            f"{what} is not installed. Install it with `pip install {pip_name}`, "
            f"or pass `root` pointing to a folder with {contents}."
        )
    return os.path.join(list(spec.submodule_search_locations)[0], "data")


def _elpv_data_dir():
    return _package_data_dir(
        "elpv_dataset", "elpv-dataset", "The ELPV data set", "labels.csv and images/"
    )


def load_elpv(root=None, defect_threshold=0.5):
    """Loads the ELPV solar-cell data set as an on-disk source.

    The 2624 grayscale 300x300 electroluminescence images of solar cells are
    labelled with a defect probability in {0, 1/3, 2/3, 1}. Label 1
    (`"defective"`) is given when the probability is at least
    `defect_threshold`, label 0 (`"functional"`) otherwise; with the default
    0.5 about 31% of the cells are defective. Images are not decoded here
    (only their existence is checked), so loading is fast.

    Args:
        root: folder holding `labels.csv` and `images/`. Defaults to the data
            folder of the installed `elpv-dataset` package.
        defect_threshold: probability in `(0, 1]` from which a cell counts
            as defective.

    Returns:
        An on-disk `ImageSource` named `"elpv"` with `channels=1`, class
        names `("functional", "defective")` and metadata `"probability"`
        (float64) and `"type"` (str, `"mono"` or `"poly"`).

    Raises:
        ImportError: if `root` is None and `elpv-dataset` is not installed.
        FileNotFoundError: if `labels.csv` or an image it lists is missing.
        ValueError: for a malformed line of `labels.csv` or a bad threshold.

    Reference:
        Buerhop-Lutz et al., "A Benchmark for Visual Identification of
        Defective Solar Cells in Electroluminescence Imagery", EU PVSEC 2018;
        Deitsch et al., "Automatic classification of defective photovoltaic
        module cells in electroluminescence images", Solar Energy 2019.
        The data is licensed CC BY-NC-SA 4.0.
    """
    if isinstance(defect_threshold, bool) or not 0 < defect_threshold <= 1:
        raise ValueError(
            "Expected `defect_threshold` to be a probability in (0, 1]. "
            f"Received: defect_threshold={defect_threshold!r}"
        )
    root = _elpv_data_dir() if root is None else os.path.abspath(os.fspath(root))
    labels_path = os.path.join(root, "labels.csv")
    if not os.path.isfile(labels_path):
        raise FileNotFoundError(
            f"ELPV labels file {labels_path} not found; `root` must hold "
            f"labels.csv and images/. Received: root={root}"
        )
    paths, probabilities, types = [], [], []
    with open(labels_path, encoding="utf-8") as f:
        for line_number, line in enumerate(f, start=1):
            fields = line.split()
            if not fields:
                continue
            try:
                if len(fields) != 3:
                    raise ValueError("expected 3 fields")
                probability = float(fields[1])
                if not 0 <= probability <= 1:
                    raise ValueError("probability outside [0, 1]")
            except ValueError as error:
                raise ValueError(
                    f"Malformed line {line_number} of {labels_path} ({error}): "
                    f"{line.strip()!r}. Expected 'images/<file>.png <probability> "
                    "<mono|poly>'."
                ) from error
            paths.append(os.path.join(root, fields[0]))
            probabilities.append(probability)
            types.append(fields[2])
    if not paths:
        raise ValueError(f"ELPV labels file {labels_path} lists no images.")
    for path in paths:
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"ELPV image {path}, listed in {labels_path}, does not exist."
            )
    probabilities = np.asarray(probabilities, np.float64)
    return ImageSource(
        labels=(probabilities >= defect_threshold).astype(np.int64),
        class_names=ELPV_CLASS_NAMES,
        channels=1,
        paths=np.asarray(paths, dtype=str),
        metadata={"probability": probabilities, "type": np.asarray(types, dtype=str)},
        name="elpv",
    )


def load_textures(split=None, tile_size=32, root=None):
    """Loads three texture classes (brick, grass, gravel) as image tiles.

    scikit-image ships three 512x512 grayscale texture photographs inside
    its wheel (`skimage.data.brick`, `grass` and `gravel`, each CC0). Each
    photograph is cut into non-overlapping `tile_size` x `tile_size` tiles
    labelled with its texture, as texture benchmarks cut one photograph per
    class into patches (Brodatz, Kylberg). With the default 32 px that is
    256 tiles per class, 768 in all, exactly balanced.

    Tiles of one photograph are correlated, so a random held-out split would
    score the neighbours of training tiles. The test split is therefore
    spatially disjoint: the bottom quarter of each photograph's tile rows
    (64 tiles per class at 32 px); the training split is the rest (192 per
    class). Pixels left over at the right and bottom edges (none at 32 px)
    are dropped.

    Args:
        split: `"train"`, `"test"`, or None / `"all"` for every tile.
        tile_size: side of the square tiles in pixels; each photograph must
            hold at least two rows and one column of tiles.
        root: folder holding `brick.png`, `grass.png` and `gravel.png`.
            Defaults to the data folder of the installed `scikit-image`.

    Returns:
        An in-memory `ImageSource` named `"textures"` with `channels=1`,
        uint8 images of shape `[N, tile_size, tile_size, 1]`, class names
        `("brick", "grass", "gravel")`, and metadata `"row"` and `"col"`
        (int64): the tile's position in its photograph, in tiles.

    Raises:
        ImportError: if `root` is None and `scikit-image` is not installed.
        FileNotFoundError: if one of the three files is missing.
        ValueError: for a bad `split` or `tile_size`, or a file that is not
            a readable image.

    Example:

    >>> train = load_textures("train")  # doctest: +SKIP
    >>> train.images.shape, train.class_counts().tolist()  # doctest: +SKIP
    ((576, 32, 32, 1), [192, 192, 192])

    Reference:
        The photographs come from CC0Textures (Bricks25, Gravel04) and
        DeviantArt user linolafett (Grass 01), as `skimage.data` documents;
        all are licensed CC0. They are read from the installed package and
        never copied into this repository.
    """
    if split not in (None, "all", "train", "test"):
        raise ValueError(
            "Expected `split` to be 'train', 'test', 'all' or None. "
            f"Received: split={split!r}"
        )
    if (
        isinstance(tile_size, bool)
        or not isinstance(tile_size, (int, np.integer))
        or tile_size < 1
    ):
        raise ValueError(
            f"Expected `tile_size` to be a positive int. Received: tile_size={tile_size!r}"
        )
    files = tuple(f"{name}.png" for name in TEXTURE_CLASS_NAMES)
    if root is None:
        root = _package_data_dir(
            "skimage", "scikit-image", "scikit-image (for its texture images)", ", ".join(files)
        )
    root = os.path.abspath(os.fspath(root))
    tiles, labels, rows, cols = [], [], [], []
    for label, file_name in enumerate(files):
        path = os.path.join(root, file_name)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"Texture image {path} not found; `root` must hold {', '.join(files)}. "
                f"Received: root={root}"
            )
        try:
            with Image.open(path) as image:
                pixels = np.asarray(image.convert("L"))
        except (OSError, ValueError) as error:
            raise ValueError(
                f"Could not read texture image {path} ({type(error).__name__}: {error})."
            ) from error
        num_rows, num_cols = pixels.shape[0] // tile_size, pixels.shape[1] // tile_size
        if num_rows < 2 or num_cols < 1:
            raise ValueError(
                "Expected `tile_size` to fit at least 2 rows and 1 column of tiles into "
                f"{path} ({pixels.shape[1]}x{pixels.shape[0]} px). "
                f"Received: tile_size={tile_size}"
            )
        # [rows*t, cols*t] -> [rows, cols, t, t], where tile (r, c) is
        # pixels[r*t:(r+1)*t, c*t:(c+1)*t].
        grid = pixels[: num_rows * tile_size, : num_cols * tile_size]
        grid = grid.reshape(num_rows, tile_size, num_cols, tile_size).swapaxes(1, 2)
        first_test_row = num_rows - max(1, num_rows // 4)
        kept_rows = {
            "train": range(first_test_row),
            "test": range(first_test_row, num_rows),
        }.get(split, range(num_rows))
        for r in kept_rows:
            tiles.append(grid[r])
            labels.append(np.full(num_cols, label))
            rows.append(np.full(num_cols, r))
            cols.append(np.arange(num_cols))
    source = from_numpy(
        np.concatenate(tiles), np.concatenate(labels), TEXTURE_CLASS_NAMES, name="textures"
    )
    return dataclasses.replace(
        source,
        metadata={
            "row": np.concatenate(rows).astype(np.int64),
            "col": np.concatenate(cols).astype(np.int64),
        },
    )


def load_dataset(spec, split=None, *, download=False, channels=None, class_names=None):
    """Resolves a data set spec string, as used by the command-line apps.

    Accepted forms:

    - `"fashion_mnist"`: `load_fashion_mnist(split)`; split `"train"`
      (the default when None) or `"test"`.
    - `"elpv"`: `load_elpv()`; split must be None or `"all"` (ELPV has no
      official split; use `holdout_split`).
    - `"textures"`: `load_textures(split)`; split None or `"all"` (every
      tile), `"train"` or `"test"` (spatially disjoint parts of each
      texture photograph).
    - `"folder:/path"`: `from_image_folder("/path")`, or
      `from_image_folder("/path/<split>")` when `split` is given.
    - `"tfds:name"`: `from_tfds(name, split, download=download)`; split
      required.
    - `"numpy:/path/file.npz"`: arrays `images` and `labels`, optional
      `class_names`; split must be None or `"all"`.

    Args:
        spec: the spec string.
        split: the split, as above.
        download: passed to `from_tfds` for `"tfds:"` specs. Off by
            default so that a missing data set fails fast instead of
            reaching for the network.
        channels: for `"folder:"` specs, passed to `from_image_folder`
            (None, 1 or 3: convert every image, so folders mixing grayscale,
            RGB and RGBA load). Other sources are converted by the input
            pipeline and ignore it.
        class_names: for `"folder:"` specs, the classes in label order,
            typically the training split's when loading the test split: a
            class listed here may be missing or empty in the folder (it then
            has no examples), and a sub-folder not listed raises, so that
            labels mean the same classes in both splits. Ignored by other
            specs.

    Returns:
        An `ImageSource`.

    Raises:
        ValueError: for an unknown spec, a split the spec does not accept,
            a class folder outside `class_names`, or unusable data (see the
            loaders; `.npz` archives must also have at least one image of
            every class they name).
        FileNotFoundError: if the named path or data does not exist.
    """
    if not isinstance(spec, str):
        raise ValueError(f"Expected `spec` to be a str. Received: spec={spec!r}")
    if spec == "fashion_mnist":
        return load_fashion_mnist("train" if split is None else split)
    if spec == "elpv":
        _check_no_split(spec, split)
        return load_elpv()
    if spec == "textures":
        return load_textures(split)
    kind, sep, target = spec.partition(":")
    if sep and target:
        if kind == "folder":
            directory = target if split is None else os.path.join(target, split)
            if class_names is None:
                return from_image_folder(directory, channels=channels)
            return _folder_with_classes(directory, tuple(class_names), channels)
        if kind == "tfds":
            if split is None:
                raise ValueError(
                    f"Expected a `split` (e.g. 'train') for spec {spec!r}. "
                    f"Received: split={split}"
                )
            return from_tfds(target, split, download=download)
        if kind == "numpy":
            _check_no_split(spec, split)
            return _load_npz(target)
    raise ValueError(
        "Expected `spec` to be one of: " + "; ".join(_SPEC_FORMS) + f". Received: spec={spec!r}"
    )


def _check_no_split(spec, split):
    if split not in (None, "all"):
        raise ValueError(
            f"Spec {spec!r} has no predefined splits; expected split None or "
            f"'all' (use `holdout_split` to make one). Received: split={split!r}"
        )


def _folder_with_classes(directory, class_names, channels):
    """`from_image_folder` with a fixed label order that the folder may not fill."""
    if os.path.isdir(directory):
        unknown = sorted(
            entry.name
            for entry in os.scandir(directory)
            if entry.is_dir() and not entry.name.startswith(".") and entry.name not in class_names
        )
        if unknown:
            raise ValueError(
                f"{directory} has class folder(s) {unknown} that are not among the "
                f"classes {list(class_names)} (those of the training split): its "
                "images would have no label the model knows. Received: "
                f"class_names={class_names}"
            )
    return from_image_folder(
        directory, class_names=class_names, channels=channels, allow_empty_classes=True
    )


def _load_npz(path):
    # Pickles are never loaded: an .npz from elsewhere must not run code.
    archive = load_npz(path, required=("images", "labels"), what="NumPy data set")
    class_names = archive.get("class_names")
    if class_names is not None:
        class_names = [str(n) for n in np.ravel(class_names)]
    name = os.path.splitext(os.path.basename(path))[0]
    try:
        source = from_numpy(archive["images"], archive["labels"], class_names, name=name)
    except ValueError as error:
        raise ValueError(f"Unusable NumPy data set {path!r}: {error}") from error
    empty = [n for n, count in zip(source.class_names, source.class_counts()) if not count]
    if empty:
        # A named class without images gets an output that never trains.
        raise ValueError(
            f"NumPy data set {path!r} names class(es) {empty} without any image; "
            "every class in 'class_names' needs at least one. Received: "
            f"class_names={list(source.class_names)}, "
            f"images per class={source.class_counts().tolist()}"
        )
    return source
