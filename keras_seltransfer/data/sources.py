"""Data set specs: one string that names any labelled image collection.

`load_dataset(spec, split)` resolves the spec strings the command-line apps
take (`"fashion_mnist"`, `"elpv"`, `"textures"`, `"folder:/path"`,
`"tfds:name"`, `"numpy:/path/file.npz"`) to an `ImageSource` through the
readers of `data.readers` and the loaders of `data.builtin`.
"""

import os

import numpy as np

from keras_seltransfer.data.builtin import load_elpv
from keras_seltransfer.data.builtin import load_fashion_mnist
from keras_seltransfer.data.builtin import load_textures
from keras_seltransfer.data.readers import from_image_folder
from keras_seltransfer.data.readers import from_numpy
from keras_seltransfer.data.readers import from_tfds
from keras_seltransfer.utils.io import load_npz


# Specs whose loader has its own test split (`load_dataset(spec, "test")`),
# so `holdout_split` is not applied to them.
SPECS_WITH_TEST_SPLIT = ("fashion_mnist", "textures")


_SPEC_FORMS = (
    "'fashion_mnist' (split 'train' or 'test')",
    "'elpv' (split None or 'all')",
    "'textures' (split None, 'all', 'train' or 'test')",
    "'folder:/path' (split optional: reads /path/<split>)",
    "'tfds:name' (split required)",
    "'numpy:/path/file.npz' (arrays 'images', 'labels', optional 'class_names')",
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

    Example:

    >>> import os, tempfile
    >>> path = os.path.join(tempfile.mkdtemp(), "toy.npz")
    >>> np.savez(path, images=np.zeros((8, 4, 4), np.uint8), labels=np.repeat([0, 1], 4))
    >>> source = load_dataset("numpy:" + path)
    >>> len(source), source.num_classes, source.name
    (8, 2, 'toy')
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


__all__ = ["SPECS_WITH_TEST_SPLIT", "load_dataset"]
