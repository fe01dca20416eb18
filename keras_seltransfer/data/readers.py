"""Readers that make an `ImageSource` from arrays, image folders or TFDS.

`from_numpy` wraps arrays in memory, `from_image_folder` lists an image
folder with one sub-folder per class (decoded later by the tf.data
pipeline), and `from_tfds` reads a TensorFlow Datasets split; it imports
TensorFlow Datasets only when called. Nothing else here touches TensorFlow.
"""

import os
import warnings

import numpy as np
from PIL import Image

from keras_seltransfer.data.image_source import ImageSource
from keras_seltransfer.data.image_source import check_label_range


DEFAULT_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif")


# Formats that `tf.io.decode_image` can decode; anything else PIL opens
# (TIFF, WebP, ...) would only fail later, inside the input pipeline.
# MPO is the multi-picture JPEG some cameras write; its first frame is JPEG.
_TF_DECODABLE_FORMATS = ("PNG", "JPEG", "MPO", "BMP", "GIF")


_RGBA_MODES = ("RGBA", "RGBa")


_GRAY_MODES = ("1", "L", "LA", "La", "I", "F")


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
        check_label_range(labels, len(class_names))
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

    Example:

    ```python
    # Needs the split prepared in `data_dir` (or download=True and a network).
    source = from_tfds("fashion_mnist", "train[:1000]", data_dir="/data/tfds")
    source.images.shape  # (1000, 28, 28, 1)
    ```
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


__all__ = ["DEFAULT_EXTENSIONS", "from_image_folder", "from_numpy", "from_tfds"]
