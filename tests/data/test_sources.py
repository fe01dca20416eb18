"""Tests for keras_seltransfer.data: image_source, readers, builtin and sources."""

import dataclasses
import gzip
import importlib.util
import os
import struct
import time

import numpy as np
import pytest
from PIL import Image

from keras_seltransfer.data import builtin
from keras_seltransfer.data import sources
from keras_seltransfer.data.builtin import load_elpv
from keras_seltransfer.data.builtin import load_fashion_mnist
from keras_seltransfer.data.builtin import load_textures
from keras_seltransfer.data.image_source import ImageSource
from keras_seltransfer.data.readers import from_image_folder
from keras_seltransfer.data.readers import from_numpy
from keras_seltransfer.data.readers import from_tfds
from keras_seltransfer.data.sources import load_dataset

REAL_FASHION_MNIST = all(
    os.path.isfile(os.path.join(builtin.FASHION_MNIST_DIR, f))
    for pair in builtin._FASHION_MNIST_FILES.values()
    for f in pair
)
ELPV_INSTALLED = importlib.util.find_spec("elpv_dataset") is not None
SKIMAGE_INSTALLED = importlib.util.find_spec("skimage") is not None


def _memory_source(num=6, channels=3):
    rng = np.random.default_rng(0)
    return ImageSource(
        labels=np.arange(num) % 3,
        class_names=("a", "b", "c"),
        channels=channels,
        images=rng.integers(0, 256, (num, 4, 4, channels), dtype=np.uint8),
        metadata={"id": np.arange(num) * 10},
        name="toy",
    )


def _save(path, array, fmt=None):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(array).save(path, fmt)


@pytest.fixture
def image_folder(tmp_path):
    """Three classes of 8x8 RGB images, PNG and JPEG, plus a stray text file."""
    rng = np.random.default_rng(0)
    root = tmp_path / "pets"
    counts = {"cat": 2, "dog": 3, "bird": 1}
    for name, count in counts.items():
        for i in range(count):
            array = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
            ext = ".png" if i % 2 == 0 else ".jpg"
            _save(str(root / name / f"img{i}{ext}"), array)
    (root / "dog" / "notes.txt").write_text("not an image")
    return root


# ImageSource -------------------------------------------------------------


def test_image_source_properties_and_subset():
    source = _memory_source()
    assert len(source) == 6
    assert source.num_classes == 3
    assert source.in_memory
    np.testing.assert_array_equal(source.class_counts(), [2, 2, 2])
    assert source.labels.dtype == np.int64

    sub = source.subset([5, 0, 0])
    np.testing.assert_array_equal(sub.labels, [2, 0, 0])
    np.testing.assert_array_equal(sub.images[0], source.images[5])
    np.testing.assert_array_equal(sub.metadata["id"], [50, 0, 0])
    assert sub.class_names == source.class_names and sub.name == "toy"
    np.testing.assert_array_equal(sub.class_counts(), [2, 0, 1])
    assert len(source.subset(np.array([], np.int64))) == 0


def test_image_source_subset_rejects_out_of_range():
    source = _memory_source()
    with pytest.raises(ValueError, match=r"in \[0, 6\).*indices\[1\]=6"):
        source.subset([0, 6])
    with pytest.raises(ValueError, match=r"indices\[0\]=-1"):
        source.subset([-1])
    with pytest.raises(ValueError, match="integers"):
        source.subset([0.5])


def test_image_source_is_immutable():
    source = _memory_source()
    with pytest.raises(dataclasses.FrozenInstanceError):
        source.name = "other"
    with pytest.raises(ValueError, match="read-only"):
        source.labels[0] = 1
    with pytest.raises(ValueError, match="read-only"):
        source.images[0, 0, 0, 0] = 1


def test_image_source_on_disk():
    source = ImageSource(
        labels=[0, 1], class_names=["x", "y"], channels=1, paths=["a.png", "b.png"]
    )
    assert not source.in_memory
    assert source.images is None
    assert source.paths.dtype.kind == "U"
    objects = ImageSource(
        labels=[0], class_names=["x"], channels=1, paths=np.array(["a.png"], dtype=object)
    )
    assert objects.paths.dtype.kind == "U"
    with pytest.raises(ValueError, match="1-D array of str"):
        ImageSource(labels=[0], class_names=["x"], channels=1, paths=np.array([3]))
    assert source.class_names == ("x", "y")
    assert list(source.subset([1]).paths) == ["b.png"]


_IMAGE_SOURCE_ERRORS = [
        ({"paths": np.array(["a"] * 6)}, "exactly one of `images` and `paths`"),
        ({"images": None}, "exactly one of `images` and `paths`"),
        ({"labels": np.array([0, 1, 2, 3, 0, 1])}, r"labels\[3\]=3"),
        ({"labels": np.zeros(6)}, "integer dtype"),
        ({"labels": np.zeros(5, np.int64)}, "same length"),
        ({"channels": 2}, "channels=2"),
        ({"channels": 1}, "last axis of `images`"),
        ({"images": np.zeros((6, 4, 4, 3), np.float32)}, "uint8"),
        ({"class_names": ("a", "a", "c")}, "distinct"),
        ({"class_names": ()}, "at least one class"),
        ({"class_names": "abc"}, "not a single string"),
        ({"metadata": {"id": np.arange(5)}}, r"metadata\['id'\]"),
        ({"skipped": (1,)}, "skipped"),
]


def test_image_source_validation():
    for changes, message in _IMAGE_SOURCE_ERRORS:
        fields = {
            "labels": np.arange(6) % 3,
            "class_names": ("a", "b", "c"),
            "channels": 3,
            "images": np.zeros((6, 4, 4, 3), np.uint8),
        }
        fields.update(changes)
        with pytest.raises(ValueError, match=message):
            ImageSource(**fields)


# from_numpy ----------------------------------------------------------------


def test_from_numpy_adds_channel_axis_and_default_names():
    images = np.arange(4 * 3 * 3, dtype=np.uint8).reshape(4, 3, 3)
    source = from_numpy(images, [0, 2, 1, 2])
    assert source.images.shape == (4, 3, 3, 1)
    assert source.channels == 1
    assert source.class_names == ("0", "1", "2")
    assert source.name == "numpy"
    np.testing.assert_array_equal(source.images[..., 0], images)


def test_from_numpy_float_images_and_labels():
    images = np.array([[[0.0, 254.6], [127.4, 255.0]]] * 2)
    source = from_numpy(images, np.array([1.0, 0.0]), class_names=["x", "y"])
    assert source.images.dtype == np.uint8
    np.testing.assert_array_equal(source.images[0, ..., 0], [[0, 255], [127, 255]])
    np.testing.assert_array_equal(source.labels, [1, 0])


_FROM_NUMPY_ERRORS = [
        (np.zeros((0, 4, 4), np.uint8), np.zeros(0, np.int64), None, "at least one image"),
        (np.zeros((3, 4, 4), np.uint8), [0, 1], None, r"len\(images\)=3, len\(labels\)=2"),
        (np.zeros((2, 4), np.uint8), [0, 1], None, r"images.shape=\(2, 4\)"),
        (np.zeros((2, 4, 4, 2), np.uint8), [0, 1], None, r"images.shape=\(2, 4, 4, 2\)"),
        (np.zeros((3, 4, 4), np.uint8), [0, 1, 5], ["a", "b"], r"\[0, 2\).*labels\[2\]=5"),
        (np.zeros((2, 4, 4), np.uint8), [0, -1], None, r"labels\[1\]=-1"),
        (np.full((2, 4, 4), np.nan), [0, 1], None, "NaN or inf"),
        (np.full((2, 4, 4), np.inf), [0, 1], None, "NaN or inf"),
        (np.full((2, 4, 4), 256.0), [0, 1], None, r"\[0, 255\].*max\(\)=256"),
        (np.full((2, 4, 4), -1, np.int16), [0, 1], None, r"min\(\)=-1"),
        (np.zeros((2, 4, 4), np.uint8), [0, 0.5], None, r"integer class labels.*labels\[1\]=0.5"),
        (np.zeros((2, 4, 4), np.uint8), ["a", "b"], None, "integer class labels"),
        (np.zeros((2, 4, 4), np.uint8), [[0, 1]], None, "1-D"),
]


def test_from_numpy_errors():
    for images, labels, class_names, message in _FROM_NUMPY_ERRORS:
        with pytest.raises(ValueError, match=message):
            from_numpy(images, labels, class_names)


# from_image_folder ---------------------------------------------------------


def test_from_image_folder_loads_classes(image_folder):
    source = from_image_folder(image_folder)
    assert source.class_names == ("bird", "cat", "dog")
    assert not source.in_memory
    assert source.channels == 3
    assert len(source) == 6  # notes.txt is not an image extension
    np.testing.assert_array_equal(source.class_counts(), [1, 2, 3])
    for path, label in zip(source.paths, source.labels):
        assert os.path.isabs(path)
        assert os.path.basename(os.path.dirname(path)) == source.class_names[label]
    assert {os.path.splitext(p)[1] for p in source.paths} == {".png", ".jpg"}
    assert source.name == "pets"
    assert source.skipped == ()


def test_from_image_folder_class_names_order(image_folder):
    source = from_image_folder(image_folder, class_names=["dog", "cat"])
    assert source.class_names == ("dog", "cat")
    np.testing.assert_array_equal(source.class_counts(), [3, 2])
    with pytest.raises(FileNotFoundError, match="'fish'"):
        from_image_folder(image_folder, class_names=["dog", "fish"])


def test_from_image_folder_missing_and_empty(tmp_path):
    with pytest.raises(FileNotFoundError, match="directory=.*nowhere"):
        from_image_folder(tmp_path / "nowhere")
    (tmp_path / "flat").mkdir()
    _save(str(tmp_path / "flat" / "a.png"), np.zeros((8, 8), np.uint8))
    with pytest.raises(ValueError, match="one sub-folder per class"):
        from_image_folder(tmp_path / "flat")
    root = tmp_path / "root"
    _save(str(root / "full" / "a.png"), np.zeros((8, 8), np.uint8))
    (root / "empty").mkdir()
    with pytest.raises(ValueError, match="Class folder 'empty'"):
        from_image_folder(root)
    with pytest.raises(ValueError, match="channels=2"):
        from_image_folder(root, channels=2)


def test_from_image_folder_corrupt_file(image_folder):
    bad = image_folder / "cat" / "broken.png"
    bad.write_bytes(b"this is not a png")
    with pytest.raises(ValueError, match="broken.png.*skip_corrupt=True"):
        from_image_folder(image_folder)

    with pytest.warns(UserWarning, match="Skipped 1 corrupt"):
        source = from_image_folder(image_folder, skip_corrupt=True)
    assert source.skipped == (str(bad),)
    assert len(source) == 6
    assert str(bad) not in set(source.paths)


def test_from_image_folder_truncated_png(tmp_path):
    root = tmp_path / "root"
    _save(str(root / "a" / "ok.png"), np.full((8, 8, 3), 7, np.uint8))
    rng = np.random.default_rng(0)
    _save(str(root / "b" / "whole.png"), rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    data = (root / "b" / "whole.png").read_bytes()
    (root / "b" / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="cut.png"):
        from_image_folder(root)
    with pytest.warns(UserWarning, match="Skipped 1"):
        source = from_image_folder(root, skip_corrupt=True)
    assert [os.path.basename(p) for p in source.skipped] == ["cut.png"]


def test_from_image_folder_all_files_corrupt_names_class(tmp_path):
    root = tmp_path / "root"
    _save(str(root / "a" / "ok.png"), np.zeros((8, 8), np.uint8))
    (root / "b").mkdir()
    (root / "b" / "bad.jpg").write_bytes(b"\xff\xd8garbage")
    with pytest.raises(ValueError, match=r"Class folder 'b'.*\(1 unreadable file\(s\) skipped\)"):
        from_image_folder(root, skip_corrupt=True)


def test_from_image_folder_mixed_channels(tmp_path):
    root = tmp_path / "root"
    _save(str(root / "a" / "gray.png"), np.zeros((8, 8), np.uint8))
    _save(str(root / "b" / "color.png"), np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(
        ValueError, match=r"gray.png has 1 .*color.png has 3.*channels=1 or channels=3"
    ):
        from_image_folder(root)
    source = from_image_folder(root, channels=3)
    assert source.channels == 3
    assert from_image_folder(root, channels=1).channels == 1


def test_from_image_folder_rgba_and_unsupported_format(tmp_path):
    root = tmp_path / "root"
    _save(str(root / "a" / "x.png"), np.zeros((8, 8, 4), np.uint8))
    _save(str(root / "b" / "y.png"), np.zeros((8, 8, 4), np.uint8))
    assert from_image_folder(root).channels == 4
    # A TIFF renamed .png: PIL reads it, but tf.io.decode_image cannot.
    Image.fromarray(np.zeros((8, 8, 4), np.uint8)).save(str(root / "b" / "z.png"), "TIFF")
    with pytest.raises(ValueError, match="z.png.*TIFF"):
        from_image_folder(root)


# Fashion-MNIST IDX -----------------------------------------------------------


def _write_idx(path, array, magic):
    header = struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture
def tiny_fashion(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {}
    for split, count in (("train", 12), ("test", 5)):
        images = rng.integers(0, 256, (count, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, count, dtype=np.uint8)
        image_file, label_file = builtin._FASHION_MNIST_FILES[split]
        _write_idx(tmp_path / image_file, images, 0x803)
        _write_idx(tmp_path / label_file, labels, 0x801)
        arrays[split] = (images, labels)
    return tmp_path, arrays


def test_load_fashion_mnist_tiny(tiny_fashion):
    folder, arrays = tiny_fashion
    for split in ("train", "test"):
        source = load_fashion_mnist(split, data_dir=folder)
        images, labels = arrays[split]
        assert source.images.shape == (len(images), 28, 28, 1)
        np.testing.assert_array_equal(source.images[..., 0], images)
        np.testing.assert_array_equal(source.labels, labels)
        assert source.class_names == builtin.FASHION_MNIST_CLASS_NAMES
        assert source.class_names[9] == "Ankle boot"
    with pytest.raises(ValueError, match="split='validation'"):
        load_fashion_mnist("validation", data_dir=folder)


def test_load_fashion_mnist_corrupt(tiny_fashion):
    folder, arrays = tiny_fashion
    path = folder / "train-images-idx3-ubyte.gz"
    images = arrays["train"][0]
    good = path.read_bytes()
    header = struct.pack(">IIII", 0x803, 12, 28, 28)
    corruptions = [
        (gzip.compress(header.replace(b"\x03", b"\x01", 1) + images.tobytes()),
         "magic number 0x00000801; expected 0x00000803"),
        (gzip.compress(header + images.tobytes()[:-5]), r"declares shape \(12, 28, 28\)"),
        (gzip.compress(header[:6]), "too short"),
        (b"plain bytes, not gzip", "Could not decompress"),
        (good[:200], "Could not decompress"),
    ]
    for data, message in corruptions:
        path.write_bytes(data)
        with pytest.raises(ValueError, match=message) as info:
            load_fashion_mnist("train", data_dir=folder)
        assert "train-images-idx3-ubyte.gz" in str(info.value)


def test_load_fashion_mnist_count_mismatch(tiny_fashion):
    folder, _ = tiny_fashion
    _write_idx(folder / "train-labels-idx1-ubyte.gz", np.zeros(3, np.uint8), 0x801)
    with pytest.raises(ValueError, match="12 images but .* 3 labels"):
        load_fashion_mnist("train", data_dir=folder)


def test_load_fashion_mnist_explicit_dir_does_not_download(tmp_path):
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte.gz"):
        load_fashion_mnist("train", data_dir=tmp_path)


def test_load_fashion_mnist_falls_back_to_tfds(tmp_path, monkeypatch):
    calls = []

    def fake_from_tfds(name, split, **kwargs):
        calls.append((name, split, kwargs))
        return from_numpy(np.zeros((2, 28, 28), np.uint8), [0, 9], [str(i) for i in range(10)])

    monkeypatch.setattr(builtin, "FASHION_MNIST_DIR", str(tmp_path))
    monkeypatch.setattr(builtin, "from_tfds", fake_from_tfds)
    with pytest.warns(UserWarning, match="TensorFlow Datasets with download=True"):
        source = load_fashion_mnist("test")
    assert calls == [("fashion_mnist", "test", {"download": True})]
    assert source.class_names == builtin.FASHION_MNIST_CLASS_NAMES


@pytest.mark.skipif(not REAL_FASHION_MNIST, reason="Fashion-MNIST IDX files not installed")
def test_load_fashion_mnist_real():
    train = load_fashion_mnist("train")
    test = load_fashion_mnist("test")
    assert train.images.shape == (60000, 28, 28, 1)
    assert test.images.shape == (10000, 28, 28, 1)
    assert train.images.dtype == np.uint8
    np.testing.assert_array_equal(train.class_counts(), [6000] * 10)
    np.testing.assert_array_equal(test.class_counts(), [1000] * 10)
    assert 0 < train.images.mean() < 255


# ELPV ----------------------------------------------------------------------


@pytest.mark.skipif(not ELPV_INSTALLED, reason="elpv-dataset is not installed")
def test_load_elpv_real():
    start = time.perf_counter()
    source = load_elpv()
    assert time.perf_counter() - start < 5  # no image is decoded
    assert len(source) == 2624
    assert source.channels == 1 and not source.in_memory
    assert source.class_names == ("functional", "defective")
    probability = source.metadata["probability"]
    assert probability.dtype == np.float64
    np.testing.assert_allclose(np.unique(probability), [0, 1 / 3, 2 / 3, 1])
    assert source.metadata["type"].dtype.kind == "U"
    assert set(source.metadata["type"]) == {"mono", "poly"}
    np.testing.assert_array_equal(source.labels, probability >= 0.5)
    assert source.class_counts()[1] / len(source) == pytest.approx(0.313, abs=0.01)
    assert all(p.endswith(".png") and os.path.isfile(p) for p in source.paths[:5])
    with Image.open(source.paths[0]) as image:
        assert image.mode == "L" and image.size == (300, 300)

    lenient = load_elpv(defect_threshold=1 / 3)
    np.testing.assert_array_equal(lenient.labels, probability >= 1 / 3)
    assert lenient.class_counts()[1] > source.class_counts()[1]


def test_load_elpv_bad_inputs(tmp_path):
    with pytest.raises(FileNotFoundError, match="labels.csv"):
        load_elpv(root=tmp_path / "missing")
    with pytest.raises(ValueError, match="defect_threshold=0"):
        load_elpv(root=tmp_path, defect_threshold=0)

    (tmp_path / "images").mkdir()
    _save(str(tmp_path / "images" / "cell0001.png"), np.zeros((8, 8), np.uint8))
    (tmp_path / "labels.csv").write_text(
        "images/cell0001.png  1.0  mono\nimages/cell0002.png  abc  poly\n"
    )
    with pytest.raises(ValueError, match="line 2 .*cell0002.png  abc"):
        load_elpv(root=tmp_path)
    (tmp_path / "labels.csv").write_text(
        "images/cell0001.png  0.0  mono\nimages/cell0002.png  1.0  poly\n"
    )
    with pytest.raises(FileNotFoundError, match="cell0002.png"):
        load_elpv(root=tmp_path)
    (tmp_path / "labels.csv").write_text("images/cell0001.png  0.6666666666666666  poly\n")
    source = load_elpv(root=tmp_path)
    np.testing.assert_array_equal(source.labels, [1])
    assert list(source.metadata["type"]) == ["poly"]


def test_load_elpv_not_installed(monkeypatch):
    monkeypatch.setattr(builtin.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ImportError, match="pip install elpv-dataset"):
        load_elpv()


# Textures ------------------------------------------------------------------


@pytest.mark.skipif(
    not SKIMAGE_INSTALLED, reason="scikit-image is not installed (pip install scikit-image)"
)
def test_load_textures_real():
    import skimage.data

    everything = load_textures()
    train, test = load_textures("train"), load_textures("test")
    assert everything.class_names == ("brick", "grass", "gravel")
    assert everything.name == "textures" and everything.channels == 1 and everything.in_memory
    assert everything.images.shape == (768, 32, 32, 1) and everything.images.dtype == np.uint8
    np.testing.assert_array_equal(everything.class_counts(), [256, 256, 256])
    assert train.images.shape == (576, 32, 32, 1) and test.images.shape == (192, 32, 32, 1)
    np.testing.assert_array_equal(train.class_counts(), [192, 192, 192])
    np.testing.assert_array_equal(test.class_counts(), [64, 64, 64])
    # The test split is the bottom quarter of every photograph: no tile row
    # is shared with the training split.
    assert train.metadata["row"].max() == 11 and test.metadata["row"].min() == 12
    # Every tile is the matching block of the photograph as scikit-image
    # itself loads it.
    photos = [skimage.data.brick(), skimage.data.grass(), skimage.data.gravel()]
    for source in (train, test):
        for image, label, r, c in zip(
            source.images, source.labels, source.metadata["row"], source.metadata["col"]
        ):
            block = photos[label][32 * r : 32 * (r + 1), 32 * c : 32 * (c + 1)]
            np.testing.assert_array_equal(image[..., 0], block)
    assert load_dataset("textures").class_counts().tolist() == [256, 256, 256]
    np.testing.assert_array_equal(load_dataset("textures", "test").images, test.images)
    coarse = load_textures("train", tile_size=64)
    np.testing.assert_array_equal(coarse.class_counts(), [48, 48, 48])


def test_load_textures_tiles_and_split(tmp_path):
    # 70x50 photographs with 16 px tiles: 4 rows and 3 columns of tiles,
    # the 6 px at the bottom and 2 px at the right are dropped, and the
    # last row (a quarter of 4) is the test split.
    photos = [
        (np.arange(70 * 50).reshape(70, 50) * (k + 1) % 251).astype(np.uint8) for k in range(3)
    ]
    for name, photo in zip(("brick", "grass", "gravel"), photos):
        _save(str(tmp_path / f"{name}.png"), photo)
    train = load_textures("train", tile_size=16, root=tmp_path)
    test = load_textures("test", tile_size=16, root=tmp_path)
    everything = load_textures("all", tile_size=16, root=tmp_path)
    np.testing.assert_array_equal(train.class_counts(), [9, 9, 9])
    np.testing.assert_array_equal(test.class_counts(), [3, 3, 3])
    assert len(everything) == 36 and everything.images.shape[1:] == (16, 16, 1)
    assert set(test.metadata["row"]) == {3} and set(train.metadata["row"]) == {0, 1, 2}
    for source in (train, test):
        for image, label, r, c in zip(
            source.images, source.labels, source.metadata["row"], source.metadata["col"]
        ):
            block = photos[label][16 * r : 16 * (r + 1), 16 * c : 16 * (c + 1)]
            np.testing.assert_array_equal(image[..., 0], block)
    # RGB files are read as grayscale, as scikit-image's are.
    _save(str(tmp_path / "grass.png"), np.stack([photos[1]] * 3, axis=-1))
    np.testing.assert_array_equal(
        load_textures("all", tile_size=16, root=tmp_path).images, everything.images
    )


def test_load_textures_bad_inputs(tmp_path):
    for name in ("brick", "grass"):
        _save(str(tmp_path / f"{name}.png"), np.zeros((64, 64), np.uint8))
    with pytest.raises(FileNotFoundError, match=r"gravel.png not found.*Received: root="):
        load_textures(root=tmp_path)
    (tmp_path / "gravel.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="Could not read texture image .*gravel.png"):
        load_textures(root=tmp_path)
    _save(str(tmp_path / "gravel.png"), np.zeros((64, 64), np.uint8))
    with pytest.raises(ValueError, match=r"\(64x64 px\)\. Received: tile_size=33"):
        load_textures(tile_size=33, root=tmp_path)
    for bad in (0, -4, 2.5, True, "32"):
        with pytest.raises(ValueError, match=f"Received: tile_size={bad!r}"):
            load_textures(tile_size=bad, root=tmp_path)
    with pytest.raises(ValueError, match="split='val'"):
        load_textures("val", root=tmp_path)
    assert len(load_textures(tile_size=32, root=tmp_path)) == 12


def test_load_textures_not_installed(monkeypatch):
    monkeypatch.setattr(builtin.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ImportError, match="pip install scikit-image"):
        load_textures()


# TFDS and specs --------------------------------------------------------------


def test_from_tfds_missing_dataset_fails_fast(tmp_path):
    start = time.perf_counter()
    with pytest.raises(FileNotFoundError, match="not prepared.*download=False"):
        from_tfds("fashion_mnist", "train", data_dir=str(tmp_path), download=False)
    with pytest.raises(ValueError, match="no data set named 'no_such_dataset_xyz'"):
        from_tfds("no_such_dataset_xyz", "train", data_dir=str(tmp_path))
    assert time.perf_counter() - start < 20
    with pytest.raises(ValueError, match="max_examples=0"):
        from_tfds("fashion_mnist", "train", max_examples=0)


def test_load_dataset_specs(tmp_path, tiny_fashion, image_folder, monkeypatch):
    fashion_dir, arrays = tiny_fashion
    monkeypatch.setattr(builtin, "FASHION_MNIST_DIR", str(fashion_dir))
    assert len(load_dataset("fashion_mnist")) == 12
    assert len(load_dataset("fashion_mnist", "test")) == 5

    assert load_dataset(f"folder:{image_folder}").class_names == ("bird", "cat", "dog")
    split_root = tmp_path / "split"
    _save(str(split_root / "train" / "a" / "x.png"), np.zeros((8, 8), np.uint8))
    _save(str(split_root / "train" / "b" / "y.png"), np.zeros((8, 8), np.uint8))
    assert load_dataset(f"folder:{split_root}", "train").class_names == ("a", "b")

    npz = tmp_path / "toy.npz"
    np.savez(npz, images=np.zeros((3, 5, 5), np.uint8), labels=[0, 1, 1], class_names=["n", "y"])
    source = load_dataset(f"numpy:{npz}")
    assert source.class_names == ("n", "y") and source.images.shape == (3, 5, 5, 1)
    assert source.name == "toy"
    np.savez(tmp_path / "bad.npz", pixels=np.zeros((3, 5, 5), np.uint8))
    with pytest.raises(ValueError, match=r"Missing: \['images', 'labels'\]"):
        load_dataset(f"numpy:{tmp_path / 'bad.npz'}")
    with pytest.raises(FileNotFoundError, match="nothere.npz"):
        load_dataset(f"numpy:{tmp_path / 'nothere.npz'}")


_BAD_SPECS = [
        ("cifar10", None, ValueError, r"one of: 'fashion_mnist'.*'folder:/path'.*spec='cifar10'"),
        ("folder:", None, ValueError, "spec='folder:'"),
        ("csv:/tmp/x.csv", None, ValueError, "'numpy:/path/file.npz'"),
        ("elpv", "train", ValueError, "split='train'"),
        ("textures", "val", ValueError, "split='val'"),
        ("numpy:/tmp/x.npz", "test", ValueError, "split='test'"),
        ("tfds:mnist", None, ValueError, "Expected a `split`"),
        ("fashion_mnist", "val", ValueError, "split='val'"),
        (3, None, ValueError, "spec=3"),
]


def test_load_dataset_bad_specs():
    for spec, split, error, message in _BAD_SPECS:
        with pytest.raises(error, match=message):
            load_dataset(spec, split)


def test_load_dataset_tfds_routing(monkeypatch):
    calls = []

    def fake_from_tfds(name, split, **kwargs):
        calls.append((name, split, kwargs))
        return from_numpy(np.zeros((1, 4, 4), np.uint8), [0])

    monkeypatch.setattr(sources, "from_tfds", fake_from_tfds)
    load_dataset("tfds:mnist", "test")
    load_dataset("tfds:cifar10", "train[:10%]", download=True)
    assert calls == [
        ("mnist", "test", {"download": False}),
        ("cifar10", "train[:10%]", {"download": True}),
    ]
