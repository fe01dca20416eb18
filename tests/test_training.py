import importlib.util
import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_seltransfer import training
from tests import helpers


def _config(tmp_path, **overrides):
    # The shared small budget, trained longer and faster: these tests check
    # that the runs learn.
    fields = dict(
        target="numpy:" + helpers.write_npz(tmp_path / "target.npz", num_per_class=80),
        backbone=helpers.saved_backbone(tmp_path / "backbone.keras"),
        output_dir=str(tmp_path / "run"),
        epochs=6,
        patience=6,
        learning_rate=3e-2,
    )
    return helpers.small_run_config(**{**fields, **overrides})


def test_finetune_writes_every_output_and_learns(tmp_path):
    config = _config(tmp_path)
    out = training.finetune(config)
    report = out["report"]
    assert report["accuracy"] >= 0.9 and report["balanced_accuracy"] >= 0.9
    assert report["num_examples"] == 40  # 25% of 160, stratified
    assert report["train_examples"] + report["val_examples"] == 120
    run = tmp_path / "run"
    for name in ("config.json", "model.keras", "report.json", "report.md", "saved_model"):
        assert (run / name).exists(), name
    assert not (run / "backup").exists()  # removed after a completed run
    assert json.load(open(run / "config.json"))["method"] == "baseline"

    # The exported SavedModel and the saved .keras model agree on raw uint8 images.
    images = helpers.easy_images(4, seed=9)[0]
    served = tf.saved_model.load(str(run / "saved_model"))
    outputs = served.serve(tf.constant(images))
    loaded = keras.saving.load_model(str(run / "model.keras"))
    np.testing.assert_allclose(
        outputs["probabilities"], loaded(images.astype("float32")), rtol=1e-5, atol=1e-6
    )


def test_l2sp_keeps_backbone_near_pretrained_weights(tmp_path):
    pretrained = keras.saving.load_model(helpers.saved_backbone(tmp_path / "b.keras"))
    start = pretrained.get_layer("block2_conv").get_weights()[0]
    drift = {}
    for method, alpha in (("baseline", 0.0), ("l2sp", 100.0)):
        config = _config(
            tmp_path,
            backbone=str(tmp_path / "b.keras"),
            method=method,
            l2sp_alpha=alpha,
            output_dir=str(tmp_path / method),
            export=False,
            seed=0,
        )
        training.finetune(config)
        tuned = keras.saving.load_model(str(tmp_path / method / "model.keras"))
        drift[method] = np.linalg.norm(tuned.get_layer("block2_conv").get_weights()[0] - start)
    assert drift["baseline"] > 0
    assert drift["l2sp"] < 0.5 * drift["baseline"]


@pytest.mark.slow
def test_finetune_under_mirrored_strategy(tmp_path):
    out = training.finetune(_config(tmp_path, strategy="mirrored", export=False))
    assert "2 replicas" in out["report"]["strategy"]
    assert out["report"]["accuracy"] >= 0.9


def test_from_scratch_and_per_class(tmp_path):
    out = training.finetune(
        _config(tmp_path, from_scratch=True, per_class=10, epochs=1, export=False)
    )
    assert out["report"]["train_examples"] + out["report"]["val_examples"] == 20


def test_pretrain_writes_a_backbone_finetune_can_load(tmp_path):
    source = "numpy:" + helpers.write_npz(tmp_path / "source.npz", num_classes=3)
    out = training.pretrain(
        training.PretrainConfig(
            source=source,
            output_dir=str(tmp_path / "pre"),
            image_size=16,
            epochs=1,
            batch_size=16,
            verbose=0,
            tensorboard=False,
        )
    )
    assert os.path.isfile(out["model"])
    ft = training.finetune(_config(tmp_path, backbone=out["model"], epochs=1, export=False))
    assert 0.0 <= ft["report"]["accuracy"] <= 1.0


def test_missing_default_backbone_says_how_to_make_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="Run `python -m apps.pretrain` first"):
        training.finetune(training.FinetuneConfig())


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"method": "magic"}, "`method` must be one of"),
        ({"fraction": 0.0}, "`fraction` must be a number in"),
        ({"per_class": 0}, "`per_class` must be a positive int"),
        ({"batch_size": 0}, "`batch_size` must be a positive int"),
        ({"learning_rate": -1.0}, "`learning_rate` must be a number > 0"),
        ({"val_fraction": 1.0}, "`val_fraction` must be a number in"),
        ({"channels": 2}, "`channels` must be 1, 3 or None"),
        ({"precision": "float8"}, "`precision` must be one of"),
        ({"gated_batchnorm": "mixed"}, "`gated_batchnorm` must be one of"),
        ({"first_gate_input": "pixels"}, "`first_gate_input` must be one of"),
        ({"gate_lr_multiplier": 0.0}, "`gate_lr_multiplier` must be a number > 0"),
        ({"gate_lr_multiplier": True}, "Received: gate_lr_multiplier=True"),
    ],
)
def test_config_errors(overrides, message):
    with pytest.raises(ValueError, match=message):
        training.FinetuneConfig(**overrides)


def test_default_output_dir_names_the_run():
    config = training.FinetuneConfig(method="l2sp", fraction=0.15, seed=2)
    assert config.output_dir == os.path.join("runs", "finetune", "l2sp-elpv-0.15-seed2")



@pytest.mark.skipif(
    importlib.util.find_spec("skimage") is None,
    reason="scikit-image is not installed (pip install scikit-image)",
)
def test_textures_keep_their_spatially_disjoint_test_split():
    # A random held-out split would put neighbours of training tiles into
    # the test set; the textures' own split keeps whole tile rows apart.
    train, test = training.load_train_test("textures")
    np.testing.assert_array_equal(train.class_counts(), [192, 192, 192])
    np.testing.assert_array_equal(test.class_counts(), [64, 64, 64])
    assert train.metadata["row"].max() < test.metadata["row"].min()

def test_mixed_precision_run_keeps_head_float32_and_restores_policy(tmp_path):
    out = training.finetune(_config(tmp_path, precision="mixed_bfloat16", export=False))
    assert keras.config.dtype_policy().name == "float32"
    model = keras.saving.load_model(out["model"])
    assert model.get_layer("block1_conv").compute_dtype == "bfloat16"
    assert model.get_layer("target_head").compute_dtype == "float32"
    assert out["report"]["accuracy"] >= 0.9


def test_early_stopping_watches_crossentropy_not_the_penalty(tmp_path):
    out = training.finetune(
        _config(tmp_path, method="l2sp", l2sp_alpha=10.0, epochs=3, patience=3, export=False)
    )
    history = out["report"]["history"]
    # The penalty makes loss and cross-entropy differ; selection used the latter.
    assert history["val_loss"][-1] > history["val_crossentropy"][-1]
    assert out["report"]["best_val_crossentropy"] == pytest.approx(min(history["val_crossentropy"]))
