"""finetune --method=filter_transfer end to end."""

import json

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_seltransfer import training
from keras_seltransfer.training import loop
from keras_seltransfer.layers.filter_mask import FilterMask
from keras_seltransfer.models import filter_masking as fm
from keras_seltransfer.models import filter_transfer as ft
from tests import helpers


def _config(tmp_path, **overrides):
    backbone = tmp_path / "backbone.keras"
    if not backbone.exists():
        helpers.saved_backbone(backbone, pretrain_epochs=1)
    return helpers.small_run_config(
        **{
            "method": "filter_transfer",
            "target": "numpy:" + helpers.write_npz(tmp_path / "target.npz", num_per_class=40),
            "source": "numpy:"
            + helpers.write_npz(tmp_path / "source.npz", num_per_class=20, seed=5),
            "backbone": str(backbone),
            "output_dir": str(tmp_path / "run"),
            **overrides,
        }
    )


def test_kl_transfer_with_pruning_reports_and_exports(tmp_path):
    config = _config(tmp_path, relevance_statistic="kl", prune_period=1, prune_fraction=0.25)
    out = training.finetune(config)
    report = out["report"]
    extra = report["filter_transfer"]
    assert extra["statistic"] == "kl" and extra["transfer_ratio"] == 0.5
    layers = extra["layers"]
    filters = {name: v["filters"] for name, v in layers.items()}
    assert filters == {"block1_conv": 4, "block2_conv": 8}
    assert all(v["transferred"] == v["filters"] // 2 == v["reinitialized"] for v in layers.values())
    # Rounds at the start of epochs 1 and 2: 0.125 then 0.25 of each layer.
    assert [r["pruned"] for r in extra["pruning"]["rounds"]] == [
        {"block1_conv": 0, "block2_conv": 1},
        {"block1_conv": 1, "block2_conv": 1},
    ]
    assert report["history"]["pruned_fraction"] == [0.0, 1 / 12, 3 / 12]
    saved = json.load(open(tmp_path / "run" / "report.json"))
    assert saved["filter_transfer"]["layers"] == layers

    loaded = keras.saving.load_model(out["model"], safe_mode=True)
    assert sum(isinstance(layer, FilterMask) for layer in loaded.layers) == 2
    assert ft.filter_transfer_summary(loaded) == layers
    images = helpers.easy_images(3, seed=9)[0]
    served = tf.saved_model.load(out["saved_model"])
    np.testing.assert_allclose(
        served.serve(tf.constant(images))["probabilities"],
        loaded(images.astype(np.float32)),
        rtol=1e-5,
        atol=1e-6,
    )


@pytest.mark.slow
def test_reinit_pruning_and_reinit_next_under_mirrored_strategy(tmp_path):
    config = _config(
        tmp_path,
        strategy="mirrored",
        reinit_next=True,
        transfer_ratio=0.75,
        prune_period=1,
        prune_action="reinit",
        export=False,
    )
    out = training.finetune(config)
    assert "2 replicas" in out["report"]["strategy"]
    extra = out["report"]["filter_transfer"]
    # ceil(0.75 n) transferred; the callback then re-initialises floor(0.25 n)
    # of each layer, which may include filters re-initialised at transfer.
    assert sum(r["pruned"]["block2_conv"] for r in extra["pruning"]["rounds"]) == 2
    assert 4 <= extra["layers"]["block2_conv"]["transferred"] <= 6
    assert all(v["masked"] == 0 for v in extra["layers"].values())


@pytest.mark.slow
def test_interrupted_reinit_pruning_run_resumes_to_the_same_result(tmp_path, monkeypatch):
    epochs, interrupt_after = 4, 2
    # Rounds at epochs 1, 2, 3 re-initialise 1/6, 1/3, 1/2 of each layer: the
    # resumed rounds must leave the filters of round 1 alone.
    settings = dict(
        export=False,
        epochs=epochs,
        patience=epochs,
        prune_period=1,
        prune_fraction=0.5,
        prune_action="reinit",
    )
    reference = training.finetune(_config(tmp_path, output_dir=str(tmp_path / "a"), **settings))

    class Interrupted(loop.TrainingCheckpoint):
        def on_epoch_end(self, epoch, logs=None):
            super().on_epoch_end(epoch, logs)  # the checkpoint is committed...
            if epoch + 1 == interrupt_after:
                raise KeyboardInterrupt  # ...then the process dies

    monkeypatch.setattr(loop, "TrainingCheckpoint", Interrupted)
    config = _config(tmp_path, output_dir=str(tmp_path / "b"), **settings)
    with pytest.raises(KeyboardInterrupt):
        training.finetune(config)
    monkeypatch.undo()
    keras.backend.clear_session()
    resumed = training.finetune(config)
    report, expected = resumed["report"], reference["report"]
    assert report["resumed_from_epoch"] == interrupt_after
    for key in ("pruned_fraction", "pruned_filters", "val_crossentropy"):
        np.testing.assert_allclose(
            report["history"][key], expected["history"][key][interrupt_after:], rtol=1e-5,
            err_msg=key,
        )
    # The flags restored from the checkpoint keep the resumed rounds from
    # re-initialising filters a second time.
    assert report["filter_transfer"]["layers"] == expected["filter_transfer"]["layers"]
    a = keras.saving.load_model(reference["model"])
    b = keras.saving.load_model(resumed["model"])
    for wa, wb in zip(a.get_weights(), b.get_weights()):
        np.testing.assert_allclose(wa, wb, rtol=1e-5, atol=1e-6)


def test_reinitialized_channels_batchnorm_trains_under_frozen_batchnorm(tmp_path):
    config = _config(tmp_path, export=False, reinit_batchnorm="channels")
    assert config.batchnorm_mode == "frozen"
    out = training.finetune(config)
    assert out["report"]["filter_transfer"]["reinit_batchnorm"] == "channels"
    pretrained = keras.saving.load_model(config.backbone, safe_mode=True)
    tuned = keras.saving.load_model(out["model"], safe_mode=True)
    for conv, mask in fm.filter_masks(tuned).items():
        bn_name = conv.replace("conv", "bn")
        kept = mask.transferred.numpy() == 1
        bn, original = tuned.get_layer(bn_name), pretrained.get_layer(bn_name)
        np.testing.assert_array_equal(bn.frozen.numpy(), kept.astype(np.float32))
        for w in ("gamma", "beta", "moving_mean", "moving_variance"):
            value = getattr(bn, w).numpy()
            # Transferred channels keep their pretrained BatchNorm exactly...
            np.testing.assert_array_equal(value[kept], getattr(original, w).numpy()[kept])
        # ...while the re-initialised ones learnt a scale and offset (they
        # would stay at 1 and 0 with their BatchNorm frozen).
        assert np.all(bn.gamma.numpy()[~kept] != 1.0) and np.all(bn.beta.numpy()[~kept] != 0.0)
