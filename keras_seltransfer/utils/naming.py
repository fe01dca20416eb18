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


def name_list(spec, name):
    """The names of a comma-separated option value, or None for an unset one.

    Args:
        spec: the option's value (a string such as `"block2_pool, block3_pool"`,
            or None).
        name: the option's name, for the error.

    Returns:
        A list of the stripped, non-empty names, or None when `spec` is None.

    Raises:
        ValueError: for a value that names nothing.

    Example:

    >>> name_list("block2_pool, block3_pool", "ktft_layers")
    ['block2_pool', 'block3_pool']
    """
    if spec is None:
        return None
    names = [part.strip() for part in spec.split(",") if part.strip()]
    if not names:
        raise ValueError(
            f"`{name}` must be a comma-separated list of layer names or None. "
            f"Received: {name}={spec!r}"
        )
    return names


__all__ = ["name_list", "spec_slug"]
