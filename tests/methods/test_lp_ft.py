"""`--method=lp_ft`: the probed head is installed, then every layer fine-tunes."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_seltransfer import methods
from keras_seltransfer import training
from keras_seltransfer.data.readers import from_numpy
from keras_seltransfer.methods import linear_probe as lp
from keras_seltransfer.models.classifier import set_batchnorm_mode
from keras_seltransfer.training import loop
from keras_seltransfer.training.finetuning import load_backbone
from tests import helpers


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("lp_ft_world")
    return {
        "target": "numpy:" + helpers.write_npz(root / "target.npz", num_per_class=40),
        "backbone": helpers.saved_backbone(root / "backbone.keras"),
    }


def _config(world, run_dir, **overrides):
    return helpers.small_run_config(
        **{
            "target": world["target"],
            "backbone": world["backbone"],
            "output_dir": str(run_dir),
            "method": "lp_ft",
            **overrides,
        }
    )


def test_head_after_the_probe_stage_is_the_probe(world, tmp_path):
    config = _config(world, tmp_path / "run", probe_c_grid="0.01,0.1,1", lp_ft_lr_scale=0.25)
    images, labels = helpers.easy_images(15, seed=3)
    val_images, val_labels = helpers.easy_images(6, seed=4)
    context = methods.MethodContext(
        strategy=tf.distribute.get_strategy(),
        train=from_numpy(images, labels),
        val=from_numpy(val_images, val_labels),
        num_classes=2,
        data_channels=1,
        run_dir=str(tmp_path),
        is_chief=True,
        load_backbone=lambda: load_backbone(config, 1),
    )
    method = methods.get("lp_ft")
    model = method.build_model(config, context)
    set_batchnorm_mode(model, "frozen")
    setup = method.setup(config, model, context)
    assert setup.model is model and setup.fit

    # The classifier's probabilities are sklearn's on the standardised
    # backbone features (an independent extraction and fit).
    features_model = lp.probe_features_model(model)
    train_x, train_y = lp.extract_features(features_model, context.train, 16, 8, verbose=0)
    val_x, val_y = lp.extract_features(features_model, context.val, 16, 8, verbose=0)
    fit = lp.fit_probe(train_x, train_y, val_x, val_y, (0.01, 0.1, 1.0), 2)
    np.testing.assert_allclose(
        np.asarray(model(images.astype("float32"))),
        fit.estimator.predict_proba(fit.scaler.transform(train_x)),
        atol=1e-5,
    )
    assert setup.report({})["lp_ft"]["probe"]["C"] == fit.c
    schedule = setup.learning_rate_schedule(config, steps_per_epoch=4)
    np.testing.assert_allclose(float(schedule(0)), 0.25 * config.learning_rate, rtol=1e-6)
    assert float(schedule(config.epochs * 4)) == pytest.approx(0.0, abs=1e-9)


def test_fine_tuning_then_moves_the_backbone_and_exports(world, tmp_path):
    run = tmp_path / "run"
    out = training.finetune(_config(world, run, probe_c_grid="0.1,1"))
    report = out["report"]
    assert report["epochs_run"] >= 1 and len(report["lp_ft"]["probe"]["c_grid"]) == 2
    assert report["accuracy"] >= 0.9
    pretrained = keras.saving.load_model(world["backbone"])
    loaded = keras.saving.load_model(str(run / "model.keras"), safe_mode=True)
    for name in ("block1_conv", "block2_conv"):
        drift = np.abs(
            loaded.get_layer(name).get_weights()[0] - pretrained.get_layer(name).get_weights()[0]
        ).max()
        assert drift > 0, name
    images = helpers.easy_images(4, seed=9)[0]
    reloaded = tf.saved_model.load(str(run / "saved_model"))
    served = reloaded.serve(tf.constant(images))
    np.testing.assert_allclose(
        served["probabilities"], loaded(images.astype("float32")), rtol=1e-5, atol=1e-6
    )


def test_balanced_sampling_reaches_the_pipeline(world, tmp_path, monkeypatch):
    seen = []
    original = loop.classifier_data

    def recording(*args, **kwargs):
        seen.append(args[5] if len(args) > 5 else kwargs.get("sampling", "uniform"))
        return original(*args, **kwargs)

    monkeypatch.setattr(loop, "classifier_data", recording)
    out = training.finetune(
        _config(world, tmp_path / "run", sampling="balanced", export=False, epochs=2)
    )
    assert seen == ["balanced"] and out["report"]["epochs_run"] == 2


def test_bad_lp_ft_options(world, tmp_path):
    with pytest.raises(ValueError, match="Received: lp_ft_lr_scale=0"):
        _config(world, tmp_path / "a", lp_ft_lr_scale=0)
    with pytest.raises(ValueError, match="Received: probe_c_grid='0'"):
        _config(world, tmp_path / "b", probe_c_grid="0")
