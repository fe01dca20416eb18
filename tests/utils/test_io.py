import os

import keras
import numpy as np
import pytest

from keras_seltransfer.utils import atomic_directory
from keras_seltransfer.utils import atomic_write_bytes
from keras_seltransfer.utils import atomic_write_text
from keras_seltransfer.utils import load_json_object
from keras_seltransfer.utils import load_npz
from keras_seltransfer.utils import npz_bytes
from keras_seltransfer.utils import save_model_atomic


def test_atomic_write_replaces_whole_file(tmp_path):
    path = tmp_path / "sub" / "f.txt"
    atomic_write_text(path, "one")
    atomic_write_text(path, "two")
    assert path.read_text() == "two"
    assert os.listdir(path.parent) == ["f.txt"]


def test_atomic_directory_keeps_old_output_when_writer_fails(tmp_path):
    out = tmp_path / "out"
    with atomic_directory(out) as tmp:
        open(os.path.join(tmp, "a"), "w").write("good")
    with pytest.raises(RuntimeError):
        with atomic_directory(out) as tmp:
            open(os.path.join(tmp, "a"), "w").write("half")
            raise RuntimeError("crash mid-write")
    assert (out / "a").read_text() == "good"
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_atomic_directory_refuses_overwrite(tmp_path):
    (tmp_path / "out").mkdir()
    with pytest.raises(FileExistsError, match="Refusing to overwrite"):
        with atomic_directory(tmp_path / "out", overwrite=False):
            pass


def test_save_model_atomic(tmp_path):
    inputs = keras.Input((3,))
    model = keras.Model(inputs, keras.layers.Dense(2)(inputs))
    path = str(tmp_path / "m.keras")
    save_model_atomic(model, path)
    loaded = keras.saving.load_model(path)
    x = np.ones((1, 3), "float32")
    np.testing.assert_allclose(loaded(x), model(x))
    assert os.listdir(tmp_path) == ["m.keras"]
    with pytest.raises(ValueError, match=".keras"):
        save_model_atomic(model, str(tmp_path / "m.h5"))


def test_published_outputs_get_the_permissions_of_a_direct_write(tmp_path):
    # tempfile makes 0600 files and 0700 directories; published outputs must
    # be as readable as `open`/`mkdir` would have made them.
    reference_file = tmp_path / "plain.txt"
    reference_file.write_text("x")
    reference_dir = tmp_path / "plain"
    reference_dir.mkdir()
    atomic_write_text(tmp_path / "f.txt", "x")
    with atomic_directory(tmp_path / "d") as tmp:
        open(os.path.join(tmp, "a"), "w").write("x")
    inputs = keras.Input((3,))
    save_model_atomic(keras.Model(inputs, keras.layers.Dense(2)(inputs)), str(tmp_path / "m.keras"))

    def mode(p):
        return os.stat(p).st_mode & 0o777

    assert mode(reference_file) != 0o600  # the usual umask leaves files readable by others
    assert mode(tmp_path / "f.txt") == mode(reference_file)
    assert mode(tmp_path / "m.keras") == mode(reference_file)
    assert mode(tmp_path / "d") == mode(reference_dir)


def test_load_json_object_names_the_file_and_what_was_wrong(tmp_path):
    path = tmp_path / "record.json"
    path.write_text('{"a": [1, 2]}')
    assert load_json_object(str(path), "record") == {"a": [1, 2]}
    for content, match in [
        (b"{not json", r"^The record 'r' is not valid JSON \(.*\); fix it\.$"),
        (b"\xff\xfe\x00", r"^The record 'r' is not valid JSON \(.*\); fix it\.$"),
        (b"", r"is not valid JSON"),
        (b"[1, 2]", r"^Expected the record 'r' to be a JSON object\. Received: a JSON list; fix it\.$"),
        (b"3.5", r"Received: a JSON float"),
    ]:
        path.write_bytes(content)
        with pytest.raises(ValueError, match=match):
            load_json_object(str(path), "record 'r'", "; fix it")
    with pytest.raises(FileNotFoundError):
        load_json_object(str(tmp_path / "absent.json"), "record")


def test_npz_bytes_round_trips_through_load_npz(tmp_path):
    arrays = {"x": np.arange(6, dtype=np.int32).reshape(2, 3), "name": np.array("a")}
    path = tmp_path / "arrays.npz"
    atomic_write_bytes(path, npz_bytes(arrays))
    loaded = load_npz(path, required=("x", "name"))
    np.testing.assert_array_equal(loaded["x"], arrays["x"])
    assert loaded["x"].dtype == np.int32 and str(loaded["name"]) == "a"
