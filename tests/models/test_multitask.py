"""The two-head model of selective joint fine-tuning."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_seltransfer.export import export_saved_model
from keras_seltransfer.models import build_multitask_model
from keras_seltransfer.models import joint_compile_args
from keras_seltransfer.models import small_cnn
from keras_seltransfer.models import target_model


def _model(num_source=5, dropout=0.0):
    return build_multitask_model(
        small_cnn((16, 16, 1), widths=(4, 8)), num_source, 2, dropout=dropout
    )


def test_heads_share_one_backbone():
    model = _model()
    out = model(np.zeros((3, 16, 16, 1), np.float32))
    assert set(out) == {"target", "source"}
    assert out["target"].shape == (3, 2) and out["source"].shape == (3, 5)
    heads = [layer.name for layer in model.layers if isinstance(layer, keras.layers.Dense)]
    assert sorted(heads) == ["source_head", "target_head"]
    # Only the heads differ: the backbone's variables appear once.
    names = [v.path for v in model.weights]
    assert len(names) == len(set(names))


def test_joint_loss_is_the_weighted_sum_of_half_batch_cross_entropies():
    model = _model()
    model.compile(keras.optimizers.SGD(0.0), **joint_compile_args(0.7, 0.3))
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, (8, 16, 16, 1)).astype(np.float32)
    y_t = np.array([0, 1, 1, 0, 0, 0, 0, 0], np.int32)
    y_s = np.array([0, 0, 0, 0, 4, 2, 1, 3], np.int32)
    w_t = np.array([2, 2, 2, 2, 0, 0, 0, 0], np.float32)
    w_s = np.array([0, 0, 0, 0, 2, 2, 2, 2], np.float32)
    logs = model.evaluate(
        x, {"target": y_t, "source": y_s}, sample_weight={"target": w_t, "source": w_s},
        batch_size=8, verbose=0, return_dict=True,
    )
    probs = model.predict(x, verbose=0)
    ce_t = -np.log(probs["target"][np.arange(4), y_t[:4]]).mean()
    ce_s = -np.log(probs["source"][np.arange(4, 8), y_s[4:]]).mean()
    np.testing.assert_allclose(logs["loss"], 0.7 * ce_t + 0.3 * ce_s, rtol=1e-5)
    np.testing.assert_allclose(logs["target_crossentropy"], ce_t, rtol=1e-5)
    accuracy = (probs["target"][:4].argmax(1) == y_t[:4]).mean()
    np.testing.assert_allclose(logs["target_accuracy"], accuracy)


def test_target_model_shares_weights_and_exports(tmp_path):
    model = _model(dropout=0.2)
    classifier = target_model(model)
    x = np.random.default_rng(1).integers(0, 256, (4, 16, 16, 1)).astype(np.uint8)
    np.testing.assert_allclose(
        classifier(x.astype(np.float32)), model(x.astype(np.float32))["target"], rtol=1e-6
    )
    # Training the joint model moves the classifier too (shared variables).
    head = model.get_layer("target_head")
    head.kernel.assign(head.kernel + 1.0)
    np.testing.assert_allclose(
        classifier(x.astype(np.float32)), model(x.astype(np.float32))["target"], rtol=1e-6
    )
    path = export_saved_model(classifier, str(tmp_path / "served"), class_names=["ok", "bad"])
    served = tf.saved_model.load(path)
    out = served.serve(tf.constant(x))
    np.testing.assert_allclose(
        out["probabilities"], classifier(x.astype(np.float32)), rtol=1e-5, atol=1e-6
    )
    keras_path = str(tmp_path / "multitask.keras")
    model.save(keras_path)
    reloaded = keras.saving.load_model(keras_path)
    np.testing.assert_allclose(
        reloaded(x.astype(np.float32))["source"], model(x.astype(np.float32))["source"], rtol=1e-6
    )


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"num_source_classes": 0}, "num_source_classes"),
        ({"num_target_classes": 1}, "num_target_classes"),
        ({"dropout": 1.0}, "dropout"),
        ({"source_head": "target_head"}, "different names"),
    ],
)
def test_builder_errors(kwargs, message):
    args = {"num_source_classes": 3, "num_target_classes": 2, **kwargs}
    backbone = small_cnn((16, 16, 1), widths=(4, 8))
    with pytest.raises(ValueError, match=message):
        build_multitask_model(
            backbone,
            args.pop("num_source_classes"),
            args.pop("num_target_classes"),
            **args,
        )


def test_target_model_needs_a_target_head():
    plain = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2, name="other")])
    with pytest.raises(ValueError, match="no layer named 'target_head'"):
        target_model(plain)
    with pytest.raises(ValueError, match="target_weight"):
        joint_compile_args(0.0, 1.0)
