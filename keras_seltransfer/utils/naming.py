"""File-system names derived from user specs."""

import os


def spec_slug(spec):
    """A data set spec (`"numpy:/data/x.npz"`, `"tfds:cifar10"`) as one path
    component: separators and colons become underscores.

    Example:

    >>> spec_slug("folder:/data/cells")
    'folder__data_cells'
    """
    return spec.replace(":", "_").replace(os.sep, "_").strip("_")


__all__ = ["spec_slug"]
