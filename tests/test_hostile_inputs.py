"""Hostile input: every app and public loader fed broken files, bad data and nonsense flags.

Each case names the entry point, what it is fed, and the behaviour it must
show:

- `error`: a clear error. Apps exit with status 2 and print exactly one line
  `<app>: error: ...` naming what was wrong, where, and what was expected
  (or, for flags absl rejects while parsing, absl's usage message and exit
  status 1); loaders raise `ValueError` / `FileNotFoundError` with such a
  message.
- `skip`: a documented, reported skip (`skip_corrupt=True` lists the file in
  the source's `skipped` and warns).
- `converted` / `reported`: documented handling that is not a failure
  (images of mixed channel counts converted when `channels` is given; a
  class absent from the test split reported as `n/a`).

No case may print a Python traceback, hang (every case runs under a
timeout) or change a good output: app cases name the files of an earlier,
good run (model.keras, saved_model/, report, an export, an index) that must
stay byte-identical, and untrusted model files would create a marker file if
any of their code ran.

The app cases run through `tests/apps/app_driver.py`, one process that imports
the apps once and runs every command line as `absl.app.run` would; a few
also run as real `python -m apps.<app>` processes, which must behave exactly
as in the driver. Loader cases run in this process.

Set `KST_HOSTILE_TABLE=/path/table.json` to write every case with its
expected and observed behaviour and the message seen (with `-n 2`, one
table per worker: /path/table.gw0.json, /path/table.gw1.json).
"""

import dataclasses
import io
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import warnings
import zipfile
import zlib

import keras
import numpy as np
import pytest
from PIL import Image

from keras_seltransfer import evaluation
from keras_seltransfer import training
from keras_seltransfer.methods import sjft
from keras_seltransfer.data.readers import from_image_folder
from keras_seltransfer.data.readers import from_numpy
from keras_seltransfer.data.sources import load_dataset
from keras_seltransfer.models import backbones
from keras_seltransfer.retrieval import workflow
from keras_seltransfer.retrieval.index import SourceIndex
from tests import helpers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", TF_ENABLE_ONEDNN_OPTS="0", PYTHONPATH=ROOT)

# Seconds one app case may take before it counts as a hang.
CASE_TIMEOUT = 120

_TABLE = []


def _record(case_id, entry, expected, observed, message):
    _TABLE.append(
        {
            "case": case_id,
            "entry_point": entry,
            "expected": expected,
            "observed": observed,
            "message": " ".join(str(message).split())[:240],
        }
    )


@pytest.fixture(scope="module", autouse=True)
def _write_table():
    yield
    path = os.environ.get("KST_HOSTILE_TABLE")
    if path:
        # Under pytest-xdist each worker sees only its share of the cases:
        # one table per worker (table.gw0.json, ...) instead of one
        # overwriting another.
        worker = os.environ.get("PYTEST_XDIST_WORKER")
        if worker:
            root, ext = os.path.splitext(path)
            path = f"{root}.{worker}{ext}"
        with open(path, "w") as f:
            json.dump(sorted(_TABLE, key=lambda row: row["case"]), f, indent=1)


@pytest.fixture(autouse=True)
def _seed_everything():
    """Replaces the suite's per-test seeding for this module's many small cases.

    The suite's version also clears the Keras session after every test, a
    garbage collection that costs most of a second: over well over a hundred
    cases that train nothing, once for the module is enough.
    """
    keras.utils.set_random_seed(1234)
    np.random.seed(1234)
    yield


@pytest.fixture(scope="module", autouse=True)
def _clear_session_once():
    yield
    keras.backend.clear_session()


# Hostile files ----------------------------------------------------------------


def _png_declaring(width, height):
    """A few bytes of PNG whose header declares `width` x `height` grey pixels."""

    def chunk(kind, data):
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + chunk(b"IEND", b"")
    )


def _save_image(path, array, fmt=None):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(array).save(path, fmt)


def _png_bytes(array):
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, "PNG")
    return buffer.getvalue()


def _class_folder(root, bad_name=None, bad_bytes=None, per_class=4, seed=0):
    """Classes a and b of 16x16 grey PNGs; `bad_name` holds `bad_bytes` in b."""
    rng = np.random.default_rng(seed)
    for label, name in enumerate("ab"):
        for i in range(per_class):
            level = 60 + 120 * label
            array = np.clip(rng.normal(level, 20, (16, 16)), 0, 255).astype(np.uint8)
            _save_image(os.path.join(root, name, f"{i}.png"), array)
    if bad_name is not None:
        with open(os.path.join(root, "b", bad_name), "wb") as f:
            f.write(bad_bytes)
    return str(root)


def _lambda_model(path, marker):
    """A model whose Lambda layer writes `marker` when its code runs (`.keras`
    or, by the file name, the legacy `.h5` format)."""
    inputs = keras.Input((16, 16, 1))
    x = keras.layers.Lambda(lambda t: (open(marker, "w").write("code ran"), t)[1] * 1.0)(inputs)
    x = keras.layers.GlobalAveragePooling2D(name="features")(x)
    outputs = keras.layers.Dense(2, activation="softmax")(x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy format warns
        keras.Model(inputs, outputs).save(path)
    if os.path.exists(marker):  # building the model ran the layer
        os.remove(marker)
    return str(path)


def _gadget_model(path, good_keras, marker):
    """A `.keras` archive whose config asks for `os.system` as a layer class."""
    with zipfile.ZipFile(good_keras) as archive:
        members = {name: archive.read(name) for name in archive.namelist()}
    config = json.loads(members["config.json"])
    layer = config["config"]["layers"][-1]
    layer.update(module="os", class_name="system", config={"command": f"touch {marker}"})
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, json.dumps(config) if name == "config.json" else data)
    return str(path)


def _two_output_model(path):
    inputs = keras.Input((16, 16, 1))
    x = keras.layers.GlobalAveragePooling2D()(inputs)
    keras.Model(
        inputs, [keras.layers.Dense(2, name="a")(x), keras.layers.Dense(3, name="b")(x)]
    ).save(path)
    return str(path)


def _rewrite_npz(src, dst, **changes):
    with np.load(src) as data:
        arrays = {name: data[name] for name in data.files}
    for name, value in changes.items():
        if value is None:
            arrays.pop(name)
        else:
            arrays[name] = value
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    np.savez(dst, **arrays)


def _truncate(path, keep=0.5):
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[: int(len(data) * keep)])


def _flip_byte(path):
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0xFF
    with open(path, "wb") as f:
        f.write(bytes(data))


@dataclasses.dataclass
class Files:
    d: str
    marker: str

    def __call__(self, relative):
        return os.path.join(self.d, relative)


INDEX_SETTINGS = dict(bank="gabor", image_size=16, num_bins=8, k_max=5, batch_size=16, progress=False)


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    h = Files(str(root), str(root / "MARKER_code_ran"))
    rng = np.random.default_rng(0)

    # Data sets: good ones, and .npz archives broken in every way.
    target = helpers.write_npz(h("target.npz"), num_per_class=12, seed=1)
    helpers.write_npz(h("source.npz"), num_per_class=10, num_classes=3, seed=4)
    images, labels = helpers.easy_images(12, seed=1)
    np.savez(h("target_other.npz"), images=255 - images, labels=labels,
             class_names=np.array(["class0", "class1"]))
    nan = images.astype(np.float32)
    nan[3, 2, 2, 0] = np.nan
    np.savez(h("nan.npz"), images=nan, labels=labels)
    inf = images.astype(np.float32)
    inf[5, 0, 1, 0] = np.inf
    np.savez(h("inf.npz"), images=inf, labels=labels)
    np.savez(h("label_out_of_range.npz"), images=images, labels=labels + 3,
             class_names=np.array(["class0", "class1"]))
    np.savez(h("label_negative.npz"), images=images, labels=labels - 1)
    np.savez(h("empty_class.npz"), images=images, labels=labels,
             class_names=np.array(["class0", "class1", "unused"]))
    np.savez(h("pixels_300.npz"), images=images.astype(np.float32) + 300, labels=labels)
    np.savez(h("missing_arrays.npz"), pixels=images)
    np.savez(h("object_array.npz"), images=np.array([{"x": 1}], dtype=object), labels=[0])
    shutil.copy(target, h("truncated.npz"))
    _truncate(h("truncated.npz"))
    open(h("zero_byte.npz"), "wb").close()
    with open(h("pickled.npz"), "wb") as f:
        f.write(b"\x80\x04\x95" + b"pickled" * 20)
    with open(h("single_array.npz"), "wb") as f:
        np.save(f, images)

    # Image folders.
    good_png = _png_bytes(rng.integers(0, 256, (32, 32), dtype=np.uint8))
    _class_folder(h("folders/zero_byte"), "zero.png", b"")
    _class_folder(h("folders/truncated"), "cut.png", good_png[: len(good_png) // 2])
    _class_folder(h("folders/not_an_image"), "notes.jpg", b"plain text, not a JPEG\n" * 4)
    _class_folder(h("folders/huge"), "huge.png", _png_declaring(100_000, 100_000))
    # Between PIL's warning limit (MAX_IMAGE_PIXELS, 89.5 Mpx) and twice it.
    _class_folder(h("folders/over_pil_limit"), "big.png", _png_declaring(10_000, 10_000))
    # Just under the limit: PIL decodes it and finds the pixel data missing.
    _class_folder(h("folders/under_pil_limit"), "big.png", _png_declaring(9_000, 9_000))
    tiff = io.BytesIO()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tiff, "TIFF")
    _class_folder(h("folders/tiff_named_png"), "tiff.png", tiff.getvalue())
    makers = (
        lambda: rng.integers(0, 256, (16, 16), dtype=np.uint8),
        lambda: rng.integers(0, 256, (16, 16, 3), dtype=np.uint8),
        lambda: rng.integers(0, 256, (16, 16, 4), dtype=np.uint8),
    )
    for name in "ab":
        for i in range(6):
            _save_image(h(f"folders/mixed/{name}/{i}.png"), makers[i % 3]())
    _class_folder(h("folders/empty_class"))
    shutil.rmtree(h("folders/empty_class/b"))
    os.makedirs(h("folders/empty_class/b"))
    os.makedirs(h("folders/no_classes"))
    for split, classes in (("train", "abc"), ("test", "ac")):
        for name in classes:
            for i in range(4):
                _save_image(h(f"folders/split_missing/{split}/{name}/{i}.png"), makers[0]())
    for split, classes in (("train", "ab"), ("test", "abz")):
        for name in classes:
            for i in range(4):
                _save_image(h(f"folders/split_extra/{split}/{name}/{i}.png"), makers[0]())
    for name in "ab":
        for i in range(4):
            _save_image(h(f"folders/split_empty_test/train/{name}/{i}.png"), makers[0]())
        os.makedirs(h(f"folders/split_empty_test/test/{name}"))

    # Model files: a good backbone, untrusted code, garbage.
    backbone = helpers.saved_backbone(h("backbone.keras"), pretrain_epochs=0)
    _lambda_model(h("lambda.keras"), h.marker)
    _lambda_model(h("lambda.h5"), h.marker)
    _gadget_model(h("os_system.keras"), backbone, h.marker)
    with open(h("garbage.keras"), "wb") as f:
        f.write(b"definitely not a zip archive" * 10)
    open(h("empty.keras"), "wb").close()
    shutil.copy(backbone, h("truncated.keras"))
    _truncate(h("truncated.keras"))
    with zipfile.ZipFile(h("not_a_model.keras"), "w") as archive:
        archive.writestr("readme.txt", "a zip archive, but no Keras model in it")
    with open(h("garbage.weights.h5"), "wb") as f:
        f.write(b"\x89HDF garbage" * 10)
    _two_output_model(h("two_outputs.keras"))
    # A run directory whose report.json is garbage, beside a good model.
    os.makedirs(h("bad_report"))
    with open(h("bad_report/report.json"), "w") as f:
        f.write("{ not json")
    os.makedirs(h("list_report"))
    with open(h("list_report/report.json"), "w") as f:
        f.write('["class0", "class1"]')
    for name in ("bad_report", "list_report"):
        shutil.copy(backbone, h(f"{name}/model.keras"))

    # A finished retrieval run, and tampered copies of its files.
    index_run = h("index_good")
    workflow.build_neighbours(
        workflow.IndexConfig(
            source=f"numpy:{h('source.npz')}", target=f"numpy:{target}",
            output_dir=index_run, **INDEX_SETTINGS,
        )
    )
    neighbours = os.path.join(index_run, "neighbours.npz")
    with np.load(neighbours) as data:
        stored = {name: data[name] for name in data.files}
    tampered_config = json.loads(str(stored["config"]))

    def neighbours_dir(name, **changes):
        _rewrite_npz(neighbours, h(f"neighbours/{name}/neighbours.npz"), **changes)

    neighbours_dir("ids_out_of_range", neighbour_ids=stored["neighbour_ids"] + 1000)
    neighbours_dir("ids_1d", neighbour_ids=stored["neighbour_ids"][:, 0])
    neighbours_dir("rows_mismatch", neighbour_ids=stored["neighbour_ids"][:3])
    neighbours_dir("config_list", config=np.array("[1, 2]"))
    neighbours_dir("no_config", config=None)
    neighbours_dir("other_target_subset", target_ids=stored["target_ids"] + 100)
    neighbours_dir(
        "other_source",
        config=np.array(json.dumps({**tampered_config, "source": "numpy:/elsewhere.npz"})),
    )
    for name, damage in (("truncated", _truncate), ("zero_byte", lambda p: _truncate(p, 0))):
        os.makedirs(h(f"neighbours/{name}"))
        shutil.copy(neighbours, h(f"neighbours/{name}/neighbours.npz"))
        damage(h(f"neighbours/{name}/neighbours.npz"))
    os.makedirs(h("neighbours/pickled"))
    shutil.copy(h("pickled.npz"), h("neighbours/pickled/neighbours.npz"))

    def index_copy(name, damage):
        path = h(f"indexes/{name}")
        shutil.copytree(os.path.join(index_run, "index"), path)
        damage(path)

    def edit_json(path, **changes):
        config = json.load(open(os.path.join(path, "index.json")))
        config.update(changes)
        json.dump(config, open(os.path.join(path, "index.json"), "w"))

    def edit_arrays(path, **changes):
        _rewrite_npz(os.path.join(path, "arrays.npz"), os.path.join(path, "arrays.npz"), **changes)

    with np.load(os.path.join(index_run, "index", "arrays.npz")) as data:
        descriptors = data["descriptors"]
    nan_descriptors = descriptors.copy()
    nan_descriptors[2, 1, 3] = np.nan
    index_copy("truncated", lambda p: _truncate(os.path.join(p, "arrays.npz")))
    index_copy("bit_flip", lambda p: _flip_byte(os.path.join(p, "arrays.npz")))
    index_copy("garbage_json", lambda p: open(os.path.join(p, "index.json"), "w").write("{x"))
    index_copy("count_mismatch", lambda p: edit_json(p, num_sources=3))
    index_copy("nan_descriptors", lambda p: edit_arrays(p, descriptors=nan_descriptors))
    index_copy("unnormalised", lambda p: edit_arrays(p, descriptors=descriptors * 2))
    index_copy("no_index_json", lambda p: os.remove(os.path.join(p, "index.json")))
    index_copy("pickled", lambda p: shutil.copy(h("pickled.npz"), os.path.join(p, "arrays.npz")))

    def run_copy(name, damage):
        path = h(f"runs/{name}")
        shutil.copytree(index_run, path)
        damage(path)

    run_copy("topk_truncated", lambda p: _truncate(os.path.join(p, "index", "topk.npz")))
    run_copy("topk_wrong_shape", lambda p: _rewrite_npz(
        os.path.join(p, "index", "topk.npz"), os.path.join(p, "index", "topk.npz"),
        ids=np.zeros((2, 5), np.int64)))
    run_copy("bin_edges_garbage", lambda p: shutil.copy(h("pickled.npz"), os.path.join(p, "bin_edges.npz")))
    run_copy("target_descriptors_empty", lambda p: _truncate(os.path.join(p, "target_descriptors.npz"), 0))
    run_copy("shard_arrays_truncated", lambda p: _truncate(os.path.join(p, "index", "arrays.npz")))
    run_copy("record_garbage", lambda p: open(os.path.join(p, "config.json"), "w").write("{x"))
    for name in ("other_target", "other_source", "other_k"):
        run_copy(name, lambda p: None)

    # Run directories owned by a run on another host (whose process cannot
    # be checked from here), and one whose lock file is garbage.
    other_host = {"host": "elsewhere.example", "pid": 4242, "started": "2024-01-01T09:30:00+00:00",
                  "command": "python -m apps.finetune --output_dir=/shared/run"}
    for path in ("run_locked/run.lock", "index_locked/shard-1-of-2.lock"):
        os.makedirs(os.path.dirname(h(path)))
        with open(h(path), "w") as f:
            json.dump(other_host, f)
    os.makedirs(h("run_lock_garbage"))
    with open(h("run_lock_garbage/run.lock"), "w") as f:
        f.write("{ not a lock")
    return h


# Loader cases (in process) ----------------------------------------------------


@dataclasses.dataclass
class LoaderCase:
    id: str
    entry: str
    call: object
    expect: str = "error"
    match: str = ""
    error: type = ValueError
    bad_file: str = None

    def __str__(self):
        return self.id


def _index_config(h, **changes):
    base = dict(
        source=f"numpy:{h('source.npz')}", target=f"numpy:{h('target.npz')}",
        output_dir=h("index_good"), **INDEX_SETTINGS,
    )
    base.update(changes)
    return workflow.IndexConfig(**base)


def _load_neighbours(h, name):
    config = training.FinetuneConfig(
        method="sjft", target=f"numpy:{h('target.npz')}", source=f"numpy:{h('source.npz')}",
        index_dir=h(f"neighbours/{name}"), k0=2, k_max=5, image_size=16, verbose=0,
    )
    _, _, train_ids, _ = training.finetune_split(config)
    return sjft.load_neighbours(config, train_ids)


FOLDER = "data.from_image_folder"
NUMPY = "data.from_numpy"
SPEC = "data.load_dataset"
SPLITS = "training.load_train_test"
BACKBONE = "models.load_backbone"
INDEX = "SourceIndex.load"
NEIGHBOURS = "methods.sjft.load_neighbours"
BUILD = "retrieval.build_neighbours"


def _folder(h, name, **kwargs):
    return from_image_folder(h(f"folders/{name}"), **kwargs)


def _images(dtype=np.uint8, value=None, index=None, shape=(6, 8, 8, 1)):
    images = np.zeros(shape, dtype)
    if index is not None:
        images[index] = value
    return images


_LABELS = np.arange(6) % 2

LOADER_CASES = [
    # Broken and unreadable image files; each also skipped with skip_corrupt=True.
    *[
        case
        for folder, bad, match in (
            ("zero_byte", "zero.png", r"zero\.png \(UnidentifiedImageError"),
            ("truncated", "cut.png", r"cut\.png \((UnidentifiedImageError|OSError).*"),
            ("not_an_image", "notes.jpg", r"notes\.jpg \(UnidentifiedImageError"),
            ("huge", "huge.png", r"huge\.png \(DecompressionBombError: Image size \(10000000000 pixels\)"),
            ("over_pil_limit", "big.png", r"big\.png \(DecompressionBombWarning: Image size \(100000000 pixels\)"),
            ("under_pil_limit", "big.png", r"big\.png \(OSError: image file is truncated"),
            ("tiff_named_png", "tiff.png", r"tiff\.png \(TIFF images cannot be decoded by tf\.io\.decode_image"),
        )
        for case in (
            LoaderCase(f"folder-{folder}", FOLDER, lambda h, f=folder: _folder(h, f),
                       match=match + r".*Remove or replace it"),
            LoaderCase(f"folder-{folder}-skip_corrupt", FOLDER,
                       lambda h, f=folder: _folder(h, f, skip_corrupt=True),
                       expect="skip", bad_file=f"folders/{folder}/b/{bad}"),
        )
    ],
    LoaderCase("folder-mixed-gray-rgb-rgba", FOLDER, lambda h: _folder(h, "mixed"),
               match=r"different channel counts under .*mixed: .*0\.png has 1 channel\(s\) and "
                     r".*1\.png has 3\. Pass channels=1 or channels=3"),
    LoaderCase("folder-mixed-channels=3", FOLDER, lambda h: _folder(h, "mixed", channels=3),
               expect="converted"),
    LoaderCase("folder-mixed-channels=1", FOLDER, lambda h: _folder(h, "mixed", channels=1),
               expect="converted"),
    LoaderCase("folder-channels=2", FOLDER, lambda h: _folder(h, "mixed", channels=2),
               match=r"`channels` to be None, 1 or 3\. Received: channels=2"),
    LoaderCase("folder-empty-class", FOLDER, lambda h: _folder(h, "empty_class"),
               match=r"Class folder 'b' \(.*empty_class/b\) has no readable images"),
    LoaderCase("folder-no-class-folders", FOLDER, lambda h: _folder(h, "no_classes"),
               match=r"one sub-folder per class .*found none"),
    LoaderCase("folder-missing", FOLDER, lambda h: _folder(h, "nowhere"), error=FileNotFoundError,
               match=r"existing folder\. Received: directory=.*nowhere"),
    LoaderCase("folder-is-a-file", FOLDER, lambda h: from_image_folder(h("target.npz")),
               match=r"a folder, not a file\. Received: directory=.*target\.npz"),
    LoaderCase("folder-allow_empty_classes-without-names", FOLDER,
               lambda h: _folder(h, "mixed", allow_empty_classes=True),
               match=r"`allow_empty_classes` needs `class_names`"),
    # Arrays.
    LoaderCase("numpy-nan-pixels", NUMPY,
               lambda h: from_numpy(_images(np.float32, np.nan, (2, 3, 4, 0)), _LABELS),
               match=r"finite values; found NaN or inf\. Received: images\[\(2, 3, 4, 0\)\]=nan"),
    LoaderCase("numpy-inf-pixels", NUMPY,
               lambda h: from_numpy(_images(np.float64, -np.inf, (0, 0, 0, 0)), _LABELS),
               match=r"found NaN or inf\. Received: images\[\(0, 0, 0, 0\)\]=-inf"),
    LoaderCase("numpy-pixels-out-of-range", NUMPY,
               lambda h: from_numpy(_images(np.float32, 256.0, (1, 1, 1, 0)), _LABELS),
               match=r"pixel values of `images` in \[0, 255\].*images\.max\(\)=256\.0"),
    LoaderCase("numpy-label-out-of-range", NUMPY,
               lambda h: from_numpy(_images(), _LABELS + 1, ["a", "b"]),
               match=r"every label to be in \[0, 2\) for 2 classes\. Received: labels\[1\]=2"),
    LoaderCase("numpy-label-negative", NUMPY,
               lambda h: from_numpy(_images(), _LABELS - 1, ["a", "b"]),
               match=r"in \[0, 2\).*Received: labels\[0\]=-1"),
    LoaderCase("numpy-label-not-integer", NUMPY,
               lambda h: from_numpy(_images(), _LABELS + 0.5),
               match=r"integer class labels\. Received: labels\[0\]=0\.5"),
    LoaderCase("numpy-length-mismatch", NUMPY, lambda h: from_numpy(_images(), _LABELS[:4]),
               match=r"same length\. Received: len\(images\)=6, len\(labels\)=4"),
    LoaderCase("numpy-two-channels", NUMPY, lambda h: from_numpy(_images(shape=(6, 8, 8, 2)), _LABELS),
               match=r"C in \(1, 3, 4\)\. Received: images\.shape=\(6, 8, 8, 2\)"),
    LoaderCase("numpy-empty", NUMPY, lambda h: from_numpy(np.zeros((0, 8, 8)), []),
               match=r"at least one image and one label"),
    # Data set specs.
    *[
        LoaderCase(f"spec-numpy-{name}", SPEC, lambda h, n=name: load_dataset(f"numpy:{h(n + '.npz')}"),
                   error=error, match=match)
        for name, error, match in (
            ("nan", ValueError, r"Unusable NumPy data set '.*nan\.npz': .*NaN or inf\. Received: images\[\(3, 2, 2, 0\)\]=nan"),
            ("inf", ValueError, r"'.*inf\.npz': .*NaN or inf\. Received: images\[\(5, 0, 1, 0\)\]=inf"),
            ("label_out_of_range", ValueError, r"'.*label_out_of_range\.npz': Expected every label to be in \[0, 2\)"),
            ("label_negative", ValueError, r"'.*label_negative\.npz': Expected non-negative integer labels\. Received: labels\[0\]=-1"),
            ("empty_class", ValueError, r"'.*empty_class\.npz' names class\(es\) \['unused'\] without any image.*images per class=\[12, 12, 0\]"),
            ("pixels_300", ValueError, r"'.*pixels_300\.npz': Expected pixel values of `images` in \[0, 255\]"),
            ("missing_arrays", ValueError, r"'.*missing_arrays\.npz' to hold the arrays \['images', 'labels'\]; it holds \['pixels'\]"),
            ("object_array", ValueError, r"'.*object_array\.npz' is corrupt \(it holds pickled Python objects, which are never loaded\)"),
            ("truncated", ValueError, r"'.*truncated\.npz' is not a readable \.npz archive \(BadZipFile"),
            ("zero_byte", ValueError, r"'.*zero_byte\.npz' is not a readable \.npz archive \(the file is empty\)"),
            ("pickled", ValueError, r"'.*pickled\.npz' is not a readable \.npz archive \(it holds pickled Python objects, which are never loaded\)\.$"),
            ("single_array", ValueError, r"'.*single_array\.npz' to be an \.npz archive of named arrays\. Received: a single ndarray"),
            ("nowhere", FileNotFoundError, r"'.*nowhere\.npz' not found"),
        )
    ],
    LoaderCase("spec-folder-corrupt-file", SPEC, lambda h: load_dataset(f"folder:{h('folders/zero_byte')}"),
               match=r"Could not read image file .*zero\.png"),
    LoaderCase("spec-folder-mixed", SPEC, lambda h: load_dataset(f"folder:{h('folders/mixed')}"),
               match=r"different channel counts"),
    LoaderCase("spec-folder-mixed-channels=1", SPEC,
               lambda h: load_dataset(f"folder:{h('folders/mixed')}", channels=1), expect="converted"),
    LoaderCase("spec-folder-missing", SPEC, lambda h: load_dataset(f"folder:{h('nowhere')}"),
               error=FileNotFoundError, match=r"existing folder"),
    LoaderCase("spec-unknown", SPEC, lambda h: load_dataset("numpy"),
               match=r"Expected `spec` to be one of: .*Received: spec='numpy'"),
    # Train and test splits of a folder.
    LoaderCase("splits-class-missing-from-test", SPLITS,
               lambda h: training.load_train_test(f"folder:{h('folders/split_missing')}"),
               expect="reported"),
    LoaderCase("splits-class-only-in-test", SPLITS,
               lambda h: training.load_train_test(f"folder:{h('folders/split_extra')}"),
               match=r"split_extra/test has class folder\(s\) \['z'\] that are not among the classes "
                     r"\['a', 'b'\] \(those of the training split\)"),
    LoaderCase("splits-empty-test", SPLITS,
               lambda h: training.load_train_test(f"folder:{h('folders/split_empty_test')}"),
               match=r"no readable images .* under .*split_empty_test/test"),
    # Model files.
    *[
        LoaderCase(f"backbone-{name}", BACKBONE,
                   lambda h, n=name: backbones.load_backbone(h(n), (16, 16, 1)),
                   error=error, match=match)
        for name, error, match in (
            ("lambda.keras", ValueError, r"Refused to load the backbone in '.*lambda\.keras': it holds Python code \(Requested the deserialization of a `Lambda` layer .*safe_mode=True"),
            ("lambda.h5", ValueError, r"Refused to load the backbone in '.*lambda\.h5': it holds Python code"),
            ("os_system.keras", ValueError, r"Could not load the backbone in '.*os_system\.keras' \(Keras safe mode\): TypeError: Could not locate class 'system'"),
            ("garbage.keras", ValueError, r"'.*garbage\.keras' is not a Keras model archive: a \.keras file is a zip archive, and this one is truncated or in another format"),
            ("empty.keras", ValueError, r"'.*empty\.keras' is not a Keras model archive: .* this one is empty"),
            ("truncated.keras", ValueError, r"'.*truncated\.keras' is not a Keras model archive"),
            ("not_a_model.keras", ValueError, r"Could not load the backbone in '.*not_a_model\.keras' \(Keras safe mode\)"),
            ("nowhere.keras", FileNotFoundError, r"Backbone file not found: '.*nowhere\.keras'"),
        )
    ],
    LoaderCase("backbone-unknown-name", BACKBONE, lambda h: backbones.load_backbone("resnet9000", (32, 32, None)),
               match=r"Unknown backbone 'resnet9000'\. Did you mean 'ResNet\w+'.*Expected a path to a `\.keras` file, 'kerashub:<preset>' or one of: small_cnn, .*Received: spec='resnet9000'"),
    LoaderCase("backbone-weights-missing", BACKBONE,
               lambda h: backbones.load_backbone("small_cnn", (16, 16, 1), weights=h("nowhere.weights.h5")),
               error=FileNotFoundError, match=r"Backbone weights file not found: '.*nowhere\.weights\.h5'"),
    LoaderCase("backbone-weights-garbage", BACKBONE,
               lambda h: backbones.load_backbone("small_cnn", (16, 16, 1), weights=h("garbage.weights.h5")),
               match=r"Could not load the weights file '.*garbage\.weights\.h5' into backbone 'small_cnn'"),
    LoaderCase("backbone-wrong-channels", BACKBONE,
               lambda h: backbones.load_backbone(h("backbone.keras"), (16, 16, 3)),
               match=r"takes 1-channel images but input_shape asks for 3"),
    # Source index directories.
    *[
        LoaderCase(f"index-{name}", INDEX, lambda h, n=name: SourceIndex.load(h(f"indexes/{n}")),
                   error=error, match=match)
        for name, error, match in (
            ("truncated", ValueError, r"source index at '.*truncated' is corrupt or unreadable: source index arrays '.*arrays\.npz' is not a readable \.npz archive \(BadZipFile"),
            ("bit_flip", ValueError, r"source index at '.*bit_flip' is corrupt or unreadable: source index arrays '.*arrays\.npz' is (corrupt|not a readable)"),
            ("garbage_json", ValueError, r"index file '.*garbage_json/index\.json' is not valid JSON"),
            ("count_mismatch", ValueError, r"Inconsistent source index at '.*count_mismatch': index\.json records descriptors of shape \(3, 48, 8\)"),
            ("nan_descriptors", ValueError, r"Inconsistent source index at '.*nan_descriptors': .*finite values.*descriptors\[2, 1, 3\]=nan"),
            ("unnormalised", ValueError, r"Inconsistent source index at '.*unnormalised': Expected every channel histogram of `descriptors` to sum to 1"),
            ("no_index_json", FileNotFoundError, r"'.*no_index_json' is incomplete: index\.json is missing"),
            ("pickled", ValueError, r"source index at '.*pickled' is corrupt or unreadable: .*it holds pickled Python objects, which are never loaded"),
        )
    ],
    # Neighbour lists of selective joint fine-tuning.
    *[
        LoaderCase(f"neighbours-{name}", NEIGHBOURS, lambda h, n=name: _load_neighbours(h, n), match=match)
        for name, match in (
            ("truncated", r"neighbour index '.*truncated/neighbours\.npz' is not a readable \.npz archive \(BadZipFile"),
            ("zero_byte", r"neighbour index '.*zero_byte/neighbours\.npz' is not a readable \.npz archive \(the file is empty\)"),
            ("pickled", r"neighbour index '.*pickled/neighbours\.npz' is not a readable .*never loaded"),
            ("ids_1d", r"neighbours\.npz is not a neighbour index written by apps\.build_index: neighbour_ids must be a 2-D integer array"),
            ("rows_mismatch", r"not a neighbour index .*: neighbour_ids has 3 rows for 18 target ids"),
            ("config_list", r"not a neighbour index .*: its config is unreadable \(a JSON list, not an object\)"),
            ("no_config", r"neighbours\.npz' to hold the arrays \['target_ids', 'neighbour_ids', 'config'\].*Missing: \['config'\]"),
            ("other_target_subset", r"has no neighbours for 14 of the 14 training images"),
            ("other_source", r"was built with source='numpy:/elsewhere\.npz', but this run has source='numpy:.*source\.npz'"),
        )
    ],
    # Retrieval runs: corrupt files of a finished run, and mismatched sets.
    *[
        LoaderCase(f"build-{name}", BUILD,
                   lambda h, n=name, c=changes: workflow.build_neighbours(
                       _index_config(h, output_dir=h(f"runs/{n}"), **_resolve(h, c))),
                   match=match)
        for name, changes, match in (
            ("topk_truncated", {}, r"shard top-k file '.*topk_truncated/index/topk\.npz' is not a readable \.npz archive"),
            ("topk_wrong_shape", {}, r"shard top-k file '.*topk_wrong_shape/index/topk\.npz' is inconsistent.*Delete .*to rebuild the shard"),
            ("bin_edges_garbage", {}, r"bin edge file '.*bin_edges\.npz' is not a readable \.npz archive \(it holds pickled"),
            ("target_descriptors_empty", {}, r"target descriptor file '.*target_descriptors\.npz' is not a readable .*the file is empty"),
            ("shard_arrays_truncated", {}, r"source index at '.*shard_arrays_truncated/index' is corrupt or unreadable.*Delete .*shard_arrays_truncated/index to rebuild the shard"),
            ("record_garbage", {}, r"retrieval run file '.*record_garbage/config\.json' is not valid JSON"),
            ("other_target", {"target": "numpy:{target_other}"}, r"holds a retrieval run made with other settings: target='numpy:.*/target\.npz' \(this command: 'numpy:.*target_other\.npz'\)"),
            ("other_source", {"source": "numpy:{target}"}, r"other settings: source='numpy:.*source\.npz' \(this command: 'numpy:.*target\.npz'\)"),
            ("other_k", {"k_max": 3}, r"other settings: k_max=5 \(this command: 3\)"),
        )
    ],
]


def _resolve(h, changes):
    """Fills the `{target}` / `{target_other}` placeholders of index settings."""
    names = {"target": h("target.npz"), "target_other": h("target_other.npz")}
    return {k: v.format(**names) if isinstance(v, str) else v for k, v in changes.items()}


@pytest.mark.parametrize("case", LOADER_CASES, ids=str)
def test_loader_case(case, hostile):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if case.expect == "error":
            with pytest.raises(case.error) as raised:
                case.call(hostile)
            message = str(raised.value)
            _record(case.id, case.entry, case.expect, type(raised.value).__name__, message)
            assert re.search(case.match, message), message
            # The message must not send the user to unsafe loading.
            assert "allow_pickle=" not in message and "If you trust" not in message
            return
        result = case.call(hostile)
    if case.expect == "skip":
        bad = hostile(case.bad_file)
        assert result.skipped == (bad,)
        assert bad not in set(result.paths) and len(result) == 8
        skipped = [w for w in caught if "Skipped 1 corrupt or unreadable" in str(w.message)]
        assert skipped, [str(w.message) for w in caught]
        _record(case.id, case.entry, "skip", "skip", f"{skipped[0].message} skipped={result.skipped}")
    elif case.expect == "converted":
        from keras_seltransfer.data import make_dataset

        images, _ = next(iter(make_dataset(result, 16, 12)))
        assert images.shape[-1] == result.channels
        _record(case.id, case.entry, "converted", "converted",
                f"{len(result)} images of 1, 3 and 4 channels loaded as {result.channels}-channel images")
    elif case.expect == "reported":
        train, test = result
        assert train.class_names == test.class_names == ("a", "b", "c")
        np.testing.assert_array_equal(test.class_counts(), [4, 0, 4])
        _record(case.id, case.entry, "reported", "reported",
                f"test split aligned to the training classes {test.class_names}, counts "
                f"{test.class_counts().tolist()}")
    else:
        raise AssertionError(case.expect)


def test_class_missing_from_test_split_is_reported_not_crashed(hostile):
    """A class in train but not in test: the labels keep meaning the same
    classes, and the report marks the absent class n/a, its balanced
    accuracy taken over the classes present."""
    train, test = training.load_train_test(f"folder:{hostile('folders/split_missing')}")
    # A model that answers class c for every image.
    probabilities = np.tile([0.1, 0.2, 0.7], (len(test), 1))
    report = evaluation.classification_report(test.labels, probabilities, test.class_names)
    assert report["support"] == {"a": 4, "b": 0, "c": 4}
    assert report["per_class_accuracy"] == {"a": 0.0, "b": None, "c": 1.0}
    assert report["balanced_accuracy"] == 0.5 and report["accuracy"] == 0.5
    assert "| b | 0 | n/a |" in evaluation.format_markdown(report)
    # Test label 1 is class c, so the model's class-c answers score there.
    assert [os.path.basename(os.path.dirname(p)) for p in test.paths[test.labels == 2]] == ["c"] * 4


def test_mixed_channel_folder_converts_grey_to_rgb_by_repetition(hostile):
    source = from_image_folder(hostile("folders/mixed"), channels=3)
    from keras_seltransfer.data import make_dataset

    images, _ = next(iter(make_dataset(source, 16, 12)))
    grey = [i for i, p in enumerate(source.paths) if p.endswith(("0.png", "3.png"))]
    pixels = np.asarray(images)[grey]
    np.testing.assert_array_equal(pixels[..., 0], pixels[..., 1])
    np.testing.assert_array_equal(pixels[..., 0], pixels[..., 2])
    original = np.asarray(Image.open(source.paths[grey[0]]), np.float32)
    np.testing.assert_array_equal(pixels[0, ..., 0], original)


# App cases (one driver process) ----------------------------------------------


@dataclasses.dataclass
class AppCase:
    id: str
    app: str
    argv: tuple
    match: str = ""
    rc: int = 2
    watch: tuple = ()
    expect: str = "error"
    process: bool = False

    def __str__(self):
        return self.id


_FT = (
    "--image_size=16", "--batch_size=8", "--epochs=1", "--verbose=0", "--notensorboard",
)
_T = "--target=numpy:{d}/target.npz"
_B = "--backbone={d}/backbone.keras"
_RUN = "--output_dir={d}/run_good"
_SJFT = ("--method=sjft", "--source=numpy:{d}/source.npz", "--k0=2", "--k_max=5")
_GOOD_RUN = ("run_good/model.keras", "run_good/saved_model", "run_good/report.json",
             "run_good/report.md", "run_good/config.json")
_GOOD_EXPORT = ("export_good",)
_GOOD_EVAL = ("eval_good/evaluation.json", "eval_good/evaluation.md")
_GOOD_INDEX = ("index_good",)
_IX = ("--source=numpy:{d}/source.npz", "--bank=gabor", "--image_size=16", "--num_bins=8",
       "--k_max=5", "--noprogress")

SETUP_CASES = [
    AppCase("setup-finetune", "finetune", (_T, _B, _RUN, *_FT), expect="ok", rc=0),
    AppCase("setup-evaluate", "evaluate", ("--model={d}/run_good/model.keras",
            "--data=numpy:{d}/target.npz", "--output_dir={d}/eval_good"), expect="ok", rc=0),
    AppCase("setup-export", "export", ("--model={d}/run_good/model.keras",
            "--output={d}/export_good"), expect="ok", rc=0),
    AppCase("setup-finetune-auto", "finetune", (_T, _B, "--output_dir={d}/run_auto", *_FT,
            "--method=auto", "--auto_candidates=linear_probe,baseline", "--auto_folds=2",
            "--noexport"), expect="ok", rc=0),
]

USAGE = r"FATAL Flags parsing error: flag "

APP_CASES = [
    # Nonsense flags, rejected by absl while parsing (exit status 1).
    AppCase("finetune-fraction-out-of-range", "finetune", (_T, "--fraction=2"), rc=1,
            match=USAGE + r"--fraction=2: 2\.0 is not a number in the range \[0\.0, 1\.0\]"),
    AppCase("finetune-epochs-zero", "finetune", (_T, "--epochs=0"), rc=1,
            match=USAGE + r"--epochs=0: 0 is not a positive integer"),
    AppCase("finetune-epochs-not-a-number", "finetune", ("--epochs=abc",), rc=1,
            match=USAGE + r"--epochs=abc: invalid literal for int\(\)"),
    AppCase("finetune-learning-rate-negative", "finetune", ("--learning_rate=-1",), rc=1,
            match=USAGE + r"--learning_rate=-1: -1\.0 is not a non-negative"),
    AppCase("finetune-image-size-huge", "finetune", (_T, _B, "--image_size=100000"), rc=1,
            match=USAGE + r"--image_size=100000: 100000 is not an integer in the range \[8, 4096\]"),
    AppCase("finetune-seed-negative", "finetune", ("--seed=-1",), rc=1,
            match=USAGE + r"--seed=-1: -1 is not an integer in the range \[0, 4294967295\]"),
    AppCase("finetune-method-unknown", "finetune", ("--method=magic",), rc=1,
            match=USAGE + r"--method=magic: value should be one of <baseline\|l2sp\|"),
    AppCase("finetune-channels-two", "finetune", ("--channels=2",), rc=1,
            match=USAGE + r"--channels=2: value should be one of <1\|3>"),
    AppCase("finetune-boolean-maybe", "finetune", ("--deterministic=maybe",), rc=1,
            match=USAGE + r"--deterministic=maybe: \('Non-boolean argument to boolean flag', 'maybe'\)"),
    AppCase("finetune-unknown-flag", "finetune", ("--no_such_flag=1",), rc=1,
            match=r"FATAL Flags parsing error: Unknown command line flag 'no_such_flag'"),
    AppCase("finetune-positional-argument", "finetune", (_T, "stray"), rc=1,
            match=r"Unexpected positional arguments: stray\. All options are flags; see --help\."),
    AppCase("pretrain-unknown-flag", "pretrain", ("--target=elpv",), rc=1,
            match=r"Unknown command line flag 'target'"),
    AppCase("build_index-bank-unknown", "build_index", ("--bank=wavelet",), rc=1,
            match=USAGE + r"--bank=wavelet: value should be one of <conv\|gabor>", process=True),
    AppCase("build_index-num-bins-zero", "build_index", ("--num_bins=0",), rc=1,
            match=USAGE + r"--num_bins=0: 0 is not an integer in the range \[1, 1000\]"),
    AppCase("build_index-search-mode-unknown", "build_index", ("--search_mode=quick",), rc=1,
            match=USAGE + r"--search_mode=quick: value should be one of <auto\|exact\|fast>"),
    AppCase("finetune-index-search-mode-unknown", "finetune",
            (_T, "--method=sjft", "--index_search_mode=quick"), rc=1,
            match=USAGE + r"--index_search_mode=quick: value should be one of <auto\|exact\|fast>"),
    AppCase("evaluate-missing-model-flag", "evaluate", ("--data=elpv",), rc=1,
            match=USAGE + r"--model=None: Flag --model must have a value other than None"),
    AppCase("evaluate-positional-argument", "evaluate", ("--model=x.keras", "extra", "args"), rc=1,
            match=r"Unexpected positional arguments: extra args\.", process=True),
    AppCase("export-missing-output-flag", "export", ("--model=x.keras",), rc=1,
            match=USAGE + r"--output=None: Flag --output must have a value other than None",
            process=True),
    # Values absl accepts but the library refuses (exit status 2, one line).
    AppCase("finetune-learning-rate-zero", "finetune", (_T, _B, _RUN, "--learning_rate=0", *_FT),
            match=r"`learning_rate` must be a number > 0\. Received: learning_rate=0\.0", watch=_GOOD_RUN),
    AppCase("finetune-test-fraction-one", "finetune", (_T, _B, "--test_fraction=1"),
            match=r"`test_fraction` must be a number in \(0, 1\)\. Received: test_fraction=1\.0"),
    AppCase("finetune-adafilter-transfer-ratio-zero", "finetune",
            (_T, _B, "--method=adafilter", "--transfer_ratio=0"),
            match=r"`transfer_ratio` must be a number in \(0, 1\]\. Received: transfer_ratio=0\.0"),
    AppCase("finetune-per-class-too-many", "finetune", (_T, _B, _RUN, "--per_class=1000", *_FT),
            match=r"Class 0 has only 9 example\(s\); cannot keep 1000 per class", watch=_GOOD_RUN),
    AppCase("finetune-sjft-k0-above-k-max", "finetune", (_T, _B, *_SJFT, "--k0=50"),
            match=r"`k0` \(50\) must not exceed `k_max` \(5\)"),
    AppCase("finetune-auto-candidate-unknown", "finetune",
            (_T, _B, "--method=auto", "--auto_candidates=linear_probe,magic"),
            match=r"`auto_candidates` takes method names from \(.*\)\. Received: 'magic'"),
    AppCase("finetune-auto-candidate-fixed-option", "finetune",
            (_T, _B, "--method=auto", "--auto_candidates=baseline:seed=3"),
            match=r"Candidate 'baseline:seed=3': `seed` is the same for every candidate"),
    AppCase("finetune-auto-candidate-bad-value", "finetune",
            (_T, _B, "--method=auto", "--auto_candidates=baseline:learning_rate=fast"),
            match=r"`learning_rate` takes a float\. Received: learning_rate='fast'"),
    # Missing and untrusted files.
    AppCase("finetune-backbone-missing", "finetune", (_T, "--backbone={d}/nowhere.keras"),
            match=r"Backbone file not found: '.*nowhere\.keras'"),
    AppCase("finetune-backbone-untrusted-lambda", "finetune",
            (_T, "--backbone={d}/lambda.keras", _RUN, *_FT), watch=_GOOD_RUN,
            match=r"Refused to load the backbone in '.*lambda\.keras': it holds Python code"),
    AppCase("finetune-backbone-os-system-gadget", "finetune",
            (_T, "--backbone={d}/os_system.keras", _RUN, *_FT), watch=_GOOD_RUN,
            match=r"Could not load the backbone in '.*os_system\.keras' \(Keras safe mode\): "
                  r"TypeError: Could not locate class 'system'"),
    AppCase("finetune-backbone-garbage", "finetune", (_T, "--backbone={d}/garbage.keras", _RUN, *_FT),
            watch=_GOOD_RUN, match=r"'.*garbage\.keras' is not a Keras model archive"),
    AppCase("finetune-backbone-unknown-name", "finetune", (_T, "--backbone=resnet9000", *_FT),
            match=r"Unknown backbone 'resnet9000'\. Did you mean .*Expected a path to a `\.keras` file, 'kerashub:<preset>' or one of: small_cnn"),
    AppCase("finetune-backbone-weights-garbage", "finetune",
            (_T, "--backbone=small_cnn", "--backbone_weights={d}/garbage.weights.h5", *_FT),
            match=r"Could not load the weights file '.*garbage\.weights\.h5' into backbone 'small_cnn'"),
    AppCase("finetune-cut-layer-unknown", "finetune", (_T, _B, "--cut_layer=nope", *_FT),
            match=r"has no layer named 'nope'; its last layers are: .*Received: layer_name='nope'"),
    AppCase("finetune-channels-disagree-with-backbone", "finetune", (_T, _B, "--channels=3", *_FT),
            match=r"takes 1-channel images but input_shape asks for 3"),
    # Broken data, as rerun into the good run's directory.
    AppCase("finetune-target-nan", "finetune", ("--target=numpy:{d}/nan.npz", _B, _RUN, *_FT),
            watch=_GOOD_RUN, match=r"'.*nan\.npz': Expected `images` to hold finite values; found NaN"),
    AppCase("finetune-target-inf", "finetune", ("--target=numpy:{d}/inf.npz", _B, _RUN, *_FT),
            watch=_GOOD_RUN, match=r"'.*inf\.npz': .*found NaN or inf"),
    AppCase("finetune-target-label-out-of-range", "finetune",
            ("--target=numpy:{d}/label_out_of_range.npz", _B, _RUN, *_FT), watch=_GOOD_RUN,
            match=r"'.*label_out_of_range\.npz': Expected every label to be in \[0, 2\)"),
    AppCase("finetune-target-empty-class", "finetune",
            ("--target=numpy:{d}/empty_class.npz", _B, _RUN, *_FT), watch=_GOOD_RUN,
            match=r"names class\(es\) \['unused'\] without any image"),
    AppCase("finetune-target-truncated-npz", "finetune",
            ("--target=numpy:{d}/truncated.npz", _B, _RUN, *_FT), watch=_GOOD_RUN,
            match=r"'.*truncated\.npz' is not a readable \.npz archive"),
    AppCase("finetune-target-missing-npz", "finetune", ("--target=numpy:{d}/nowhere.npz", _B, *_FT),
            match=r"NumPy data set '.*nowhere\.npz' not found"),
    AppCase("finetune-target-unknown-spec", "finetune", ("--target=mnist_typo", _B, *_FT),
            match=r"Received: spec='mnist_typo'"),
    AppCase("finetune-target-folder-zero-byte-image", "finetune",
            ("--target=folder:{d}/folders/zero_byte", _B, _RUN, *_FT), watch=_GOOD_RUN,
            match=r"Could not read image file .*zero\.png \(UnidentifiedImageError"),
    AppCase("finetune-target-folder-huge-image", "finetune",
            ("--target=folder:{d}/folders/huge", _B, *_FT),
            match=r"huge\.png \(DecompressionBombError"),
    AppCase("finetune-target-folder-mixed-channels", "finetune",
            ("--target=folder:{d}/folders/mixed", _B, *_FT),
            match=r"different channel counts .* Pass channels=1 or channels=3"),
    AppCase("finetune-target-folder-class-only-in-test", "finetune",
            ("--target=folder:{d}/folders/split_extra", _B, *_FT),
            match=r"split_extra/test has class folder\(s\) \['z'\] that are not among the classes"),
    AppCase("finetune-target-folder-missing", "finetune", ("--target=folder:{d}/nowhere", _B, *_FT),
            match=r"existing folder\. Received: directory=.*nowhere"),
    # Neighbour indexes of selective joint fine-tuning.
    AppCase("finetune-sjft-index-truncated", "finetune",
            (_T, _B, *_SJFT, "--index_dir={d}/neighbours/truncated", *_FT),
            match=r"neighbour index '.*truncated/neighbours\.npz' is not a readable \.npz archive"),
    AppCase("finetune-sjft-index-ids-out-of-range", "finetune",
            (_T, _B, *_SJFT, "--index_dir={d}/neighbours/ids_out_of_range", *_FT),
            match=r"Neighbour ids must be positions in the source set \(0\.\.21\)\. Received values in \[1000, "),
    AppCase("finetune-sjft-index-of-another-target", "finetune",
            ("--target=numpy:{d}/target_other.npz", _B, *_SJFT, "--index_dir={d}/index_good", *_FT),
            watch=_GOOD_INDEX,
            match=r"was built with target='numpy:.*/target\.npz', but this run has "
                  r"target='numpy:.*target_other\.npz'; pass another --index_dir"),
    # pretrain.
    AppCase("pretrain-source-nan", "pretrain", ("--source=numpy:{d}/nan.npz", "--output_dir={d}/pre"),
            match=r"'.*nan\.npz': Expected `images` to hold finite values"),
    AppCase("pretrain-fraction-zero", "pretrain", ("--source=numpy:{d}/target.npz", "--fraction=0"),
            match=r"`fraction` must be a number in \(0, 1\]\. Received: fraction=0\.0"),
    AppCase("pretrain-backbone-untrusted-lambda", "pretrain",
            ("--source=numpy:{d}/target.npz", "--val_fraction=0.3", "--backbone={d}/lambda.keras",
             "--output_dir={d}/pre"),
            match=r"Refused to load the backbone in '.*lambda\.keras'"),
    # build_index.
    AppCase("build_index-shard-index-out-of-range", "build_index", ("--num_shards=2", "--shard_index=5"),
            match=r"`shard_index` must be in \[0, num_shards=2\)\. Received: shard_index=5"),
    AppCase("build_index-target-nan", "build_index",
            (*_IX, "--target=numpy:{d}/nan.npz", "--output_dir={d}/index_nan"),
            match=r"'.*nan\.npz': Expected `images` to hold finite values"),
    AppCase("build_index-backbone-untrusted-lambda", "build_index",
            ("--source=numpy:{d}/source.npz", _T, "--backbone={d}/lambda.keras",
             "--output_dir={d}/index_lambda", "--image_size=16", "--noprogress"),
            match=r"Refused to load the backbone in '.*lambda\.keras'"),
    AppCase("build_index-rerun-with-another-target", "build_index",
            (*_IX, "--target=numpy:{d}/target_other.npz", "--output_dir={d}/index_good"),
            watch=_GOOD_INDEX,
            match=r"index_good holds a retrieval run made with other settings: target="),
    AppCase("build_index-rerun-with-another-bin-count", "build_index",
            (*_IX[:3], "--num_bins=16", *_IX[4:], _T, "--output_dir={d}/index_good"),
            watch=_GOOD_INDEX, match=r"other settings: num_bins=8 \(this command: 16\)"),
    AppCase("build_index-corrupt-finished-shard", "build_index",
            (*_IX, _T, "--output_dir={d}/runs/shard_arrays_truncated"),
            match=r"source index at '.*shard_arrays_truncated/index' is corrupt or unreadable.*Delete .* to rebuild the shard"),
    AppCase("build_index-merge-without-shards", "build_index",
            ("--num_shards=2", "--merge", "--output_dir={d}/index_empty"),
            match=r"Cannot merge: 2 of 2 shards are not finished: .*shard-0-of-2, .*shard-1-of-2"),
    AppCase("build_index-channels-two", "build_index", ("--channels=2",), rc=1,
            match=USAGE + r"--channels=2: value should be one of <1\|3>"),
    # The tf.data service: addresses that are not one, a dispatcher not there.
    AppCase("build_index-data-service-not-an-address", "build_index", ("--data_service=localhost",),
            match=r"Expected `service` to be the address of a tf\.data service dispatcher, "
                  r"'grpc://host:port' or 'host:port'.*Received: service='localhost'"),
    AppCase("build_index-data-service-unreachable", "build_index",
            (*_IX, _T, "--output_dir={d}/index_service", "--data_service=localhost:1",
             "--data_service_timeout=5"),
            match=r"Cannot reach the tf\.data service dispatcher at grpc://localhost:1 \(.*\)\. "
                  r"Start it \(python -m apps\.data_service --role=dispatcher"),
    AppCase("data_service-role-missing", "data_service", ("--port=5050",), rc=1,
            match=USAGE + r"--role=None: Flag --role must have a value other than None"),
    AppCase("data_service-port-out-of-range", "data_service", ("--role=dispatcher", "--port=70000"),
            rc=1, match=USAGE + r"--port=70000: 70000 is not an integer in the range \[0, 65535\]"),
    AppCase("data_service-worker-without-dispatcher", "data_service", ("--role=worker",),
            match=r"A worker needs --dispatcher_address, the dispatcher's host:port\."),
    AppCase("data_service-worker-dispatcher-not-grpc", "data_service",
            ("--role=worker", "--dispatcher_address=http://hostA:5050"),
            match=r"Expected `service` to use the grpc protocol.*Received: service='http://hostA:5050'"),
    # Run directories owned by another run: refused, the owner's lock left as it was.
    AppCase("finetune-output-dir-locked-on-another-host", "finetune",
            (_T, _B, "--output_dir={d}/run_locked", *_FT), watch=("run_locked/run.lock",),
            process=True,
            match=r"The run directory '.*run_locked' is locked by a run on another host \(host "
                  r"elsewhere\.example, pid 4242, started 2024-01-01T09:30:00\+00:00, command: .*\); "
                  r"its lock file is '.*run_locked/run\.lock'\. Whether that run is still going "
                  r"cannot be checked from .* pass --force \(force=True\) to take the directory over"),
    AppCase("finetune-output-dir-lock-file-garbage", "finetune",
            (_T, _B, "--output_dir={d}/run_lock_garbage", *_FT), watch=("run_lock_garbage/run.lock",),
            match=r"The run directory '.*run_lock_garbage' has a lock file '.*run\.lock' that is not "
                  r"a lock record \(it is not JSON: .*\)"),
    AppCase("pretrain-output-dir-locked-on-another-host", "pretrain",
            ("--source=numpy:{d}/target.npz", "--output_dir={d}/run_locked"),
            watch=("run_locked/run.lock",),
            match=r"The run directory '.*run_locked' is locked by a run on another host \(host "
                  r"elsewhere\.example, pid 4242,"),
    AppCase("build_index-shard-locked-on-another-host", "build_index",
            (*_IX, _T, "--num_shards=2", "--shard_index=1", "--output_dir={d}/index_locked"),
            watch=("index_locked/shard-1-of-2.lock",),
            match=r"Shard 1 of 2 of the retrieval run '.*index_locked' is locked by a run on another "
                  r"host \(host elsewhere\.example, pid 4242,"),
    # evaluate: untrusted and mismatched models and data; the good report stays.
    AppCase("evaluate-model-untrusted-lambda", "evaluate",
            ("--model={d}/lambda.keras", "--data=numpy:{d}/target.npz", "--output_dir={d}/eval_good"),
            watch=_GOOD_EVAL, process=True,
            match=r"Refused to load the model in '.*lambda\.keras': it holds Python code"),
    AppCase("evaluate-model-os-system-gadget", "evaluate",
            ("--model={d}/os_system.keras", "--data=numpy:{d}/target.npz"),
            match=r"Could not load the model in '.*os_system\.keras' \(Keras safe mode\)"),
    AppCase("evaluate-model-garbage", "evaluate", ("--model={d}/garbage.keras", "--data=numpy:{d}/target.npz"),
            match=r"model file '.*garbage\.keras' is not a Keras model archive"),
    AppCase("evaluate-model-is-a-directory", "evaluate", ("--model={d}/run_good", "--data=numpy:{d}/target.npz"),
            match=r"--model file not found: '.*run_good'"),
    AppCase("evaluate-model-two-outputs", "evaluate",
            ("--model={d}/two_outputs.keras", "--data=numpy:{d}/target.npz"),
            match=r"two_outputs\.keras has 2 outputs; apps\.evaluate scores a single-output classifier"),
    AppCase("evaluate-data-nan", "evaluate",
            ("--model={d}/run_good/model.keras", "--data=numpy:{d}/nan.npz", "--output_dir={d}/eval_good"),
            watch=_GOOD_EVAL, match=r"'.*nan\.npz': Expected `images` to hold finite values"),
    AppCase("evaluate-data-other-class-count", "evaluate",
            ("--model={d}/run_good/model.keras", "--data=folder:{d}/folders/split_missing",
             "--output_dir={d}/eval_good"), watch=_GOOD_EVAL,
            match=r"run_good/model\.keras predicts 2 classes but --data=folder:.*split_missing has 3 \(a, b, c\)"),
    AppCase("evaluate-data-other-class-names", "evaluate",
            ("--model={d}/run_good/model.keras", "--data=folder:{d}/folders/mixed",
             "--output_dir={d}/eval_good"), watch=_GOOD_EVAL,
            match=r"was trained on the classes \['class0', 'class1'\] \(its report\.json\) but "
                  r"--data=folder:.* has \['a', 'b'\]"),
    # export: failures leave an existing good export intact.
    AppCase("export-model-untrusted-lambda-overwrite", "export",
            ("--model={d}/lambda.keras", "--output={d}/export_good", "--overwrite"), watch=_GOOD_EXPORT,
            match=r"Refused to load the model in '.*lambda\.keras': it holds Python code"),
    AppCase("export-model-truncated-overwrite", "export",
            ("--model={d}/truncated.keras", "--output={d}/export_good", "--overwrite"), watch=_GOOD_EXPORT,
            match=r"model file '.*truncated\.keras' is not a Keras model archive"),
    AppCase("export-existing-output-without-overwrite", "export",
            ("--model={d}/run_good/model.keras", "--output={d}/export_good"), watch=_GOOD_EXPORT,
            match=r"Refusing to overwrite existing output directory: .*export_good"),
    AppCase("export-two-outputs-overwrite", "export",
            ("--model={d}/two_outputs.keras", "--output={d}/export_good", "--overwrite"), watch=_GOOD_EXPORT,
            match=r"exports one classifier output; for a multi-task model pass its target sub-model"),
    AppCase("export-report-json-garbage", "export",
            ("--model={d}/bad_report/model.keras", "--output={d}/export_good", "--overwrite"),
            watch=_GOOD_EXPORT, match=r"run report '.*bad_report/report\.json' beside --model is not valid JSON"),
    AppCase("export-report-json-not-an-object", "export",
            ("--model={d}/list_report/model.keras", "--output={d}/export_bad"),
            match=r"run report '.*list_report/report\.json' beside --model to be a JSON object\. "
                  r"Received: a JSON list"),
    AppCase("export-model-missing", "export", ("--model={d}/nowhere.keras", "--output={d}/export_bad"),
            match=r"--model file not found: '.*nowhere\.keras'"),
]


def _argv(case, h):
    return [a.format(d=h.d) for a in case.argv]


@pytest.fixture(scope="module", autouse=True)
def _driver(hostile, tmp_path_factory):
    """Starts the driver on the setup and app cases as soon as the files exist.

    It runs beside the in-process loader cases, which read only files it
    does not write. The setup cases make good outputs (a fine-tuning run, its
    evaluation and its export); the driver digests the files a case watches
    before and after running it.
    """
    h = hostile
    work = tmp_path_factory.mktemp("driver")
    cases = [
        {
            "id": case.id,
            "app": f"apps.{case.app}",
            "argv": _argv(case, h),
            "timeout": CASE_TIMEOUT,
            "watch": [h(path) for path in case.watch],
        }
        for case in SETUP_CASES + APP_CASES
    ]
    with open(work / "cases.json", "w") as f:
        json.dump(cases, f)
    # A file, not a pipe: nothing the driver prints can fill a pipe and stall it.
    log = open(work / "driver.log", "w")
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.apps.app_driver", str(work / "cases.json"), str(work / "out.json")],
        cwd=ROOT, env=ENV, stdout=log, stderr=subprocess.STDOUT,
    )
    try:
        yield process, work
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        log.close()


@pytest.fixture(scope="module")
def app_results(_driver, hostile):
    """The driver's results by case id, and what became of the marker file."""
    process, work = _driver
    process.wait(timeout=600)
    assert process.returncode == 0, (work / "driver.log").read_text()[-3000:]
    results = {result["id"]: result for result in json.load(open(work / "out.json"))}
    # The untrusted files were fed to many cases; had any of their code
    # run, the marker would exist. The control shows the files do carry
    # live code: loading one without safe mode runs it.
    results["_marker_after_cases"] = os.path.exists(hostile.marker)
    keras.saving.load_model(hostile("lambda.keras"), safe_mode=False)
    results["_marker_after_unsafe_load"] = os.path.exists(hostile.marker)
    os.remove(hostile.marker)
    return results


def _error_lines(stderr, app):
    return [line for line in stderr.splitlines() if line.startswith(f"{app}: error: ")]


def _check_app_result(case, result):
    stderr = result["stderr"]
    assert not result["timed_out"], f"{case.id} hung"
    assert "Traceback" not in stderr, stderr[-3000:]
    assert result["rc"] == case.rc, (result["rc"], stderr[-2000:])
    if case.rc == 2:
        lines = _error_lines(stderr, case.app)
        assert len(lines) == 1, stderr
        assert re.search(case.match, lines[0]), lines[0]
        return lines[0]
    assert re.search(case.match, stderr), stderr[-2000:]
    return next(line for line in stderr.splitlines() if re.search(case.match, line))


def test_setup_runs_succeeded(app_results, hostile):
    for case in SETUP_CASES:
        result = app_results[case.id]
        assert result["rc"] == 0, result["stderr"][-3000:]
    for path in _GOOD_RUN + _GOOD_EXPORT + _GOOD_EVAL:
        assert os.path.exists(hostile(path)), path


def test_auto_run_prints_the_candidates_and_the_choice(app_results, hostile):
    stdout = app_results["setup-finetune-auto"]["stdout"]
    assert "## Method selection (--method=auto)" in stdout
    assert "| linear_probe" in stdout and "| baseline" in stdout
    choice = re.search(r"\nauto \((linear_probe|baseline)\) on numpy:.*: test accuracy", stdout)
    assert choice, stdout[-2000:]
    with open(hostile("run_auto/report.json")) as f:
        assert json.load(f)["auto_choice"] == choice.group(1)


@pytest.mark.parametrize("case", APP_CASES, ids=str)
def test_app_case(case, app_results):
    result = app_results[case.id]
    line = _check_app_result(case, result)
    _record(case.id, f"apps.{case.app}", case.expect, f"exit {result['rc']}", line)
    for path, digest in result["watch_before"].items():
        assert digest is not None, f"{path} was never written"
        assert result["watch_after"][path] == digest, f"{case.id} changed {path}"


def test_untrusted_model_files_ran_no_code(app_results):
    assert app_results["_marker_after_cases"] is False
    # The control: the same file loaded without safe mode does run its code.
    assert app_results["_marker_after_unsafe_load"] is True


@pytest.mark.parametrize(
    "case",
    [
        # Apps whose flag errors come before any TensorFlow import start in
        # a fraction of a second; the others take seconds each.
        pytest.param(c, marks=[pytest.mark.slow] if c.rc == 2 else [])
        for c in APP_CASES
        if c.process
    ],
    ids=str,
)
def test_app_case_as_its_own_process(case, app_results, hostile):
    """A real `python -m apps.<app>` behaves exactly as in the driver."""
    completed = subprocess.run(
        [sys.executable, "-m", f"apps.{case.app}", *_argv(case, hostile)],
        cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=CASE_TIMEOUT,
    )
    result = {"rc": completed.returncode, "stderr": completed.stderr, "timed_out": False}
    line = _check_app_result(case, result)
    assert line == _check_app_result(case, app_results[case.id])
    assert not os.path.exists(hostile.marker)


def test_every_entry_point_is_fed_hostile_input():
    cases = LOADER_CASES + APP_CASES
    ids = [case.id for case in cases]
    assert len(ids) == len(set(ids))
    assert {case.expect for case in cases} <= {"error", "skip", "converted", "reported"}
    entries = {case.entry for case in LOADER_CASES} | {f"apps.{case.app}" for case in APP_CASES}
    assert entries == {
        "apps.pretrain", "apps.finetune", "apps.build_index", "apps.evaluate", "apps.export",
        "apps.data_service", FOLDER, NUMPY, SPEC, SPLITS, BACKBONE, INDEX, NEIGHBOURS, BUILD,
    }
