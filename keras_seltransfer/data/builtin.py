"""The offline real data sets: Fashion-MNIST, ELPV and scikit-image's textures.

Each loader returns an `ImageSource` and reads only what is installed on the
machine: Fashion-MNIST's IDX files (or its TFDS copy), the `elpv-dataset`
package's solar-cell images, and the texture photographs inside
scikit-image's wheel.
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

from keras_seltransfer.data.image_source import ImageSource
from keras_seltransfer.data.readers import from_numpy
from keras_seltransfer.data.readers import from_tfds


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


_FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


# IDX magic numbers: two zero bytes, the element type (0x08 = unsigned byte)
# and the number of dimensions.
_IDX_IMAGES_MAGIC = 0x00000803


_IDX_LABELS_MAGIC = 0x00000801


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

    Example:

    >>> test = load_fashion_mnist("test")  # doctest: +SKIP
    >>> test.images.shape, test.class_names[0]  # doctest: +SKIP
    ((10000, 28, 28, 1), 'T-shirt/top')

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

    Example:

    >>> elpv = load_elpv()  # doctest: +SKIP
    >>> len(elpv), elpv.class_names, elpv.in_memory  # doctest: +SKIP
    (2624, ('functional', 'defective'), False)

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


__all__ = [
    "ELPV_CLASS_NAMES",
    "FASHION_MNIST_CLASS_NAMES",
    "FASHION_MNIST_DIR",
    "TEXTURE_CLASS_NAMES",
    "load_elpv",
    "load_fashion_mnist",
    "load_textures",
]
