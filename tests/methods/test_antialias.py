import json

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_seltransfer import training
from keras_seltransfer.training import loop
from keras_seltransfer.layers.blur_pool import BlurPool
from keras_seltransfer.models.antialiasing import antialias
from keras_seltransfer.models.antialiasing import blur_layers
from tests import helpers


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("antialias_world")
    return {
        "target": "numpy:" + helpers.write_npz(root / "target.npz", num_per_class=40),
        "source": "numpy:" + helpers.write_npz(root / "source.npz", num_per_class=12, seed=5),
        "backbone": helpers.saved_backbone(root / "backbone.keras"),
    }


def _config(world, run_dir, **overrides):
    return helpers.small_run_config(
        **{
            "target": world["target"],
            "backbone": world["backbone"],
            "output_dir": str(run_dir),
            "epochs": 2,
            "patience": 2,
            "recalibrate_batchnorm": "target",
            **overrides,
        }
    )


def _serves_like_the_keras_file(run_dir):
    images = helpers.easy_images(3, seed=7)[0]
    reloaded = tf.saved_model.load(str(run_dir / "saved_model"))
    served = reloaded.serve(tf.constant(images))["probabilities"].numpy()
    loaded = keras.saving.load_model(str(run_dir / "model.keras"), safe_mode=True)
    np.testing.assert_allclose(
        served, np.asarray(loaded(images.astype("float32"))), rtol=1e-5, atol=1e-6
    )
    return loaded


def test_antialias_ft_trains_saves_and_exports_the_antialiased_classifier(world, tmp_path):
    out = training.finetune(
        _config(world, tmp_path / "run", method="antialias_ft", blur_filt_size=3)
    )
    report = out["report"]
    assert report["antialias"]["filt_size"] == 3
    assert report["antialias"]["blur_layers"] == ["block1_relu_blurpool", "block1_pool_blurpool"]
    assert "pixel_loss" not in report["history"]
    loaded = _serves_like_the_keras_file(tmp_path / "run")
    assert blur_layers(loaded) == report["antialias"]["blur_layers"]
    assert loaded.get_layer("block1_conv").strides == (1, 1)
    # The run's BatchNorm mode (frozen for fine-tuning) reaches the student.
    assert not any(
        layer.trainable
        for layer in loaded.layers
        if isinstance(layer, keras.layers.BatchNormalization)
    )


def test_ktft_logs_every_term_and_saves_only_the_student(world, tmp_path):
    config = _config(
        world,
        tmp_path / "run",
        method="ktft",
        epochs=1,
        ktft_pixel_weight=2.0,
        ktft_global_weight=0.5,
        ktft_logit_weight=0.1,
        blur_pad_type="zero",
    )
    out = training.finetune(config)
    report = out["report"]
    assert report["ktft"] == {
        "layers": [["block1_relu", "block1_relu_blurpool"], ["block2_relu", "block2_relu"]],
        "pixel_weight": 2.0,
        "global_weight": 0.5,
        "logit_weight": 0.1,
    }
    for key in ("pixel_loss", "global_loss", "logit_loss", "val_pixel_loss", "val_crossentropy"):
        assert len(report["history"][key]) == report["epochs_run"], key
    loaded = _serves_like_the_keras_file(tmp_path / "run")
    # model.keras is the student alone: no teacher, no second copy of a layer.
    names = [layer.name for layer in loaded.layers]
    assert len(names) == len(set(names))
    assert sum(isinstance(layer, BlurPool) for layer in loaded.layers) == 2
    assert not any(isinstance(layer, keras.Model) for layer in loaded.layers)
    assert loaded.get_layer("block1_relu_blurpool").pad_type == "zero"
    assert json.load(open(tmp_path / "run" / "config.json"))["method"] == "ktft"


@pytest.mark.slow
def test_interrupted_ktft_run_resumes(world, tmp_path, monkeypatch):
    class Interrupted(loop.TrainingCheckpoint):
        def on_epoch_end(self, epoch, logs=None):
            super().on_epoch_end(epoch, logs)
            raise KeyboardInterrupt

    monkeypatch.setattr(loop, "TrainingCheckpoint", Interrupted)
    config = _config(world, tmp_path / "run", method="ktft", ktft_layers="block2_relu")
    with pytest.raises(KeyboardInterrupt):
        training.finetune(config)
    assert json.load(open(tmp_path / "run" / "backup" / "state.json"))["epoch"] == 1
    monkeypatch.undo()
    keras.backend.clear_session()
    out = training.finetune(config)
    assert out["report"]["resumed_from_epoch"] == 1 and out["report"]["epochs_run"] == 2
    assert out["report"]["ktft"]["layers"] == [["block2_relu", "block2_relu"]]


def test_bad_ktft_layers(world, tmp_path):
    with pytest.raises(ValueError, match="has no layer 'block9_relu'"):
        training.finetune(_config(world, tmp_path / "a", method="ktft", ktft_layers="block9_relu"))
    with pytest.raises(ValueError, match="`ktft_layers` must be a comma-separated list"):
        training.finetune(_config(world, tmp_path / "b", method="ktft", ktft_layers=" , "))


def _first_batchnorm_statistics(model, images):
    """Mean and variance over images and positions of `block1_conv`'s output:
    what the first BatchNormalization layer normalises."""
    probe = keras.Model(model.inputs, model.get_layer("block1_conv").output)
    features = np.asarray(probe.predict(images, verbose=0), np.float64)
    return features.mean(axis=(0, 1, 2)), features.var(axis=(0, 1, 2))


@pytest.mark.parametrize("where", ["target", "source", "none"])
def test_antialias_ft_starts_from_recalibrated_batchnorm_statistics(world, tmp_path, where):
    from keras_seltransfer import data as data_lib

    config = _config(
        world,
        tmp_path / "run",
        method="antialias_ft",
        source=world["source"],
        recalibrate_batchnorm=where,
        epochs=1,
        export=False,
    )
    out = training.finetune(config)
    assert out["report"]["antialias"]["recalibrate_batchnorm"] == where
    loaded = keras.saving.load_model(str(tmp_path / "run" / "model.keras"), safe_mode=True)
    if where == "target":
        train_full, _, train_ids, _ = training.finetune_split(config)
        images = train_full.subset(train_ids)
    else:
        images, _ = data_lib.load_train_test(world["source"])
    # The first BatchNorm's input before fine-tuning moved the kernels: the
    # pretrained convolution, unstrided by anti-aliasing.
    pretrained = keras.saving.load_model(world["backbone"], safe_mode=True)
    mean, var = _first_batchnorm_statistics(
        antialias(pretrained, filt_size=config.blur_filt_size),
        data_lib.prepared_images(images, 16, 1),
    )
    bn = loaded.get_layer("block1_bn")
    # Frozen BatchNorm keeps what the recalibration measured through training.
    if where == "none":
        np.testing.assert_array_equal(
            bn.moving_mean.numpy(), pretrained.get_layer("block1_bn").moving_mean.numpy()
        )
        assert np.abs(bn.moving_mean.numpy() - mean).max() > 1e-3
    else:
        np.testing.assert_allclose(bn.moving_mean.numpy(), mean, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(bn.moving_variance.numpy(), var, rtol=1e-3, atol=1e-4)
