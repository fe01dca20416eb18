import glob
import json

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_seltransfer import training
from keras_seltransfer.training import loop
from keras_seltransfer.layers.gated_conv import GatedConv
from keras_seltransfer.models.gating import gated_layers
from tests import helpers


def _config(tmp_path, run="run", **overrides):
    # Written once per test: a second pretraining would draw another backbone.
    target, backbone = tmp_path / "target.npz", tmp_path / "backbone.keras"
    if not backbone.exists():
        helpers.write_npz(target, num_per_class=40)
        helpers.saved_backbone(backbone, pretrain_epochs=1)
    return helpers.small_run_config(
        **{
            "target": f"numpy:{target}",
            "backbone": str(backbone),
            "method": "adafilter",
            "output_dir": str(tmp_path / run),
            **overrides,
        }
    )


def _tags(directory):
    tags = set()
    for path in glob.glob(f"{directory}/*"):
        for event in tf.compat.v1.train.summary_iterator(path):
            tags.update(value.tag for value in event.summary.value)
    return tags


def test_adafilter_run_trains_reports_gate_usage_and_exports_hard_gates(tmp_path):
    out = training.finetune(_config(tmp_path, batchnorm="train", tensorboard=True, epochs=2))
    report = out["report"]
    ada = report["adafilter"]
    assert ada["gated_layers"] == ["block1_conv", "block2_conv"]
    assert ada["fine_tuned_batchnorm"] is True
    assert ada["gate_lr_multiplier"] == training.FinetuneConfig.gate_lr_multiplier
    assert ada["first_gate_input"] == "features"
    assert 0 <= ada["val_gate_usage"] <= 1
    assert set(ada["val_gate_usage_per_layer"]) == {"block1_conv", "block2_conv"}
    history = report["history"]
    for key in (
        "gate_usage",
        "gate_usage_block1_conv",
        "val_gate_usage_block2_conv",
        "gate_entropy",
        "val_gate_input_dependence",
        "val_gate_input_dependence_block1_conv",
    ):
        assert len(history[key]) == report["epochs_run"], key
    # The report's usage is measured with hard gates on the validation
    # images: the last validation epoch logged the same (best epoch = last,
    # since the weights of the best epoch are restored).
    if np.argmin(history["val_crossentropy"]) == len(history["val_crossentropy"]) - 1:
        assert ada["val_gate_usage"] == pytest.approx(history["val_gate_usage"][-1], abs=1e-6)
    # TensorBoard logs what is in the logs.
    train_tags = _tags(tmp_path / "run/logs/train")
    assert {
        "epoch_gate_usage",
        "epoch_gate_usage_block1_conv",
        "epoch_gate_entropy",
        "epoch_gate_input_dependence_block2_conv",
    } <= train_tags
    assert {"epoch_gate_usage", "epoch_gate_input_dependence"} <= _tags(
        tmp_path / "run/logs/validation"
    )

    loaded = keras.saving.load_model(out["model"])
    layers = gated_layers(loaded)
    assert len(layers) == 2 and all(isinstance(layer, GatedConv) for layer in layers)
    assert all(layer.train_batchnorm for layer in layers)
    images = helpers.easy_images(4, seed=9)[0]
    served = tf.saved_model.load(out["saved_model"])
    probabilities = served.serve(tf.constant(images))["probabilities"]
    np.testing.assert_allclose(
        probabilities, loaded(images.astype("float32")), rtol=1e-5, atol=1e-6
    )
    assert json.load(open(tmp_path / "run" / "report.json"))["adafilter"] == ada


@pytest.mark.slow
def test_interrupted_gumbel_run_resumes_to_the_same_result(tmp_path, monkeypatch):
    epochs, interrupt_after = 3, 1
    settings = dict(
        export=False,
        epochs=epochs,
        patience=epochs,
        gated_layers="block2",
        gate_estimator="gumbel",
        gate_temperature=0.5,
        gate_usage_target=0.3,
        gate_usage_weight=1.0,
    )
    reference = training.finetune(_config(tmp_path, "a", **settings))
    ref_history = reference["report"]["history"]

    class Interrupted(loop.TrainingCheckpoint):
        def on_epoch_end(self, epoch, logs=None):
            super().on_epoch_end(epoch, logs)  # the checkpoint is committed...
            if epoch + 1 == interrupt_after:
                raise KeyboardInterrupt  # ...then the process dies

    monkeypatch.setattr(loop, "TrainingCheckpoint", Interrupted)
    config = _config(tmp_path, "b", **settings)
    with pytest.raises(KeyboardInterrupt):
        training.finetune(config)
    backup = tmp_path / "b" / "backup"
    state = json.load(open(backup / "state.json"))
    # The Gumbel noise generator's position is kept with the checkpoint.
    with np.load(backup / state["random_state"]) as saved:
        assert any(saved[key].any() for key in saved.files)
    monkeypatch.undo()

    keras.backend.clear_session()
    resumed = training.finetune(config)
    report = resumed["report"]
    assert report["resumed_from_epoch"] == interrupt_after and report["epochs_run"] == epochs
    for key in ("gate_usage", "gate_usage_block2_conv", "loss", "val_crossentropy"):
        np.testing.assert_allclose(
            report["history"][key], ref_history[key][interrupt_after:], rtol=1e-5, err_msg=key
        )
    assert report["adafilter"] == reference["report"]["adafilter"]
    assert report["adafilter"]["gated_layers"] == ["block2_conv"]
    a = keras.saving.load_model(reference["model"])
    b = keras.saving.load_model(resumed["model"])
    assert all(layer.train_batchnorm for layer in gated_layers(b))  # default: trained
    for wa, wb in zip(a.get_weights(), b.get_weights()):
        np.testing.assert_allclose(wa, wb, rtol=1e-5, atol=1e-6)


class _Context:
    """The parts of a `MethodContext` the adafilter method reads to build."""

    def __init__(self):
        self.strategy = tf.distribute.get_strategy()


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_gate_network_steps_with_the_multiplied_learning_rate(tmp_path, optimizer):
    from keras_seltransfer import methods
    from keras_seltransfer.models import backbones
    from keras_seltransfer.models import build_classifier
    from keras_seltransfer.models import set_batchnorm_mode
    from keras_seltransfer.models.gating import gate_controller

    config = _config(tmp_path, optimizer=optimizer, learning_rate=1e-3, gate_lr_multiplier=25.0)
    assert config.batchnorm_mode == "frozen"
    classifier = build_classifier(backbones.small_cnn((16, 16, 1), widths=(4, 8)), 3)
    set_batchnorm_mode(classifier, config.batchnorm_mode)
    setup = methods.get("adafilter").setup(config, classifier, _Context())
    model = setup.model
    controller = gate_controller(model)
    multipliers = methods.transform_lr_multipliers(config, model)
    assert multipliers == {f"^{controller.name}/": 25.0}
    opt = loop.optimizer_for(config, 10, multipliers)
    images, labels = helpers.easy_images(8, seed=1)
    with tf.GradientTape() as tape:
        loss = keras.losses.sparse_categorical_crossentropy(
            labels, model(images.astype("float32"), training=True)
        )
    variables = model.trainable_variables
    grads = tape.gradient(loss, variables)
    before = [v.numpy().copy() for v in variables]
    opt.apply_gradients(zip(grads, variables))
    gate_paths = {v.path for v in controller.trainable_variables}
    # Nonzero gate gradients at initialisation (the fine-tuned path's batch
    # norm trains in this frozen-BatchNorm run).
    assert max(np.abs(g).max() for v, g in zip(variables, grads) if v.path in gate_paths) > 0
    for v, g, w in zip(variables, grads, before):
        rate = 1e-3 * (25.0 if v.path in gate_paths else 1.0)
        g = np.asarray(g, "float64")
        if optimizer == "sgd":  # first step of momentum SGD: -rate * g
            expected = w - rate * g
        else:  # first Adam step: -rate * g / (|g| + eps / sqrt(1 - beta2))
            expected = w - rate * g / (np.abs(g) + 1e-7 / np.sqrt(1 - 0.999))
        # float32 arithmetic: compare to within 0.1% of a full step.
        np.testing.assert_allclose(v.numpy(), expected, rtol=1e-4, atol=1e-3 * rate, err_msg=v.path)
