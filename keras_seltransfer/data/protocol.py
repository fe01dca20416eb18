"""The data protocol of a run: which images train, validate and test.

A run's held-out test images must never depend on its training seed or
fraction, so every data set is split the same way by every app and tool.
"""

import os

from keras_seltransfer.data.sources import SPECS_WITH_TEST_SPLIT
from keras_seltransfer.data.sources import load_dataset
from keras_seltransfer.data.splits import holdout_split


def load_train_test(spec, test_fraction=0.25, split_seed=0, channels=None):
    """Loads a data set spec as `(train, test)` ImageSources.

    Data sets with their own test split (Fashion-MNIST, the textures, TFDS,
    image folders with `train/` and `test/` sub-folders) use it; others (ELPV,
    a single folder, a `.npz`) are split once, stratified, with `split_seed`, so the
    held-out images never depend on the training seed or fraction.

    The test split of a folder takes the training split's classes, so a
    label means the same class in both; a class may be missing from it.
    `channels` (None, 1 or 3) converts the images of folders that mix
    grayscale, RGB and RGBA (see `load_dataset`).

    Args:
        spec: a data set spec string (see `load_dataset`).
        test_fraction: share held out when the data set has no test split,
            in `(0, 1)`.
        split_seed: seed of that held-out split.
        channels: None, 1 or 3, for `"folder:"` specs.

    Returns:
        `(train, test)`: two `ImageSource`s.

    Raises:
        ValueError: for a bad spec or split arguments (see `load_dataset`
            and `holdout_split`).
        FileNotFoundError: if the named data does not exist.

    Example:

    >>> import os, tempfile
    >>> path = os.path.join(tempfile.mkdtemp(), "toy.npz")
    >>> np.savez(path, images=np.zeros((8, 4, 4), np.uint8), labels=np.repeat([0, 1], 4))
    >>> train, test = load_train_test("numpy:" + path, test_fraction=0.25)
    >>> len(train), len(test)
    (6, 2)
    """
    if spec in SPECS_WITH_TEST_SPLIT or spec.startswith("tfds:"):
        return load_dataset(spec, "train"), load_dataset(spec, "test")
    if spec.startswith("folder:"):
        root = spec[len("folder:"):]
        if os.path.isdir(os.path.join(root, "train")) and os.path.isdir(
            os.path.join(root, "test")
        ):
            train = load_dataset(spec, "train", channels=channels)
            test = load_dataset(
                spec, "test", channels=channels, class_names=train.class_names
            )
            return train, test
    source = load_dataset(spec, channels=channels)
    train_idx, test_idx = holdout_split(
        source.labels, test_fraction=test_fraction, seed=split_seed
    )
    return source.subset(train_idx), source.subset(test_idx)


__all__ = ["load_train_test"]
