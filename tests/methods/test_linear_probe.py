"""`--method=linear_probe`: the scikit-learn probe, its folding into a Keras
head, the choice of C, the feature options, and a run end to end."""

import json

import keras
import numpy as np
import pytest
import tensorflow as tf
from sklearn.linear_model import LogisticRegression

from keras_seltransfer import models
from keras_seltransfer import training
from keras_seltransfer.data.readers import from_numpy
from keras_seltransfer.methods import linear_probe as lp
from tests import helpers


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("probe_world")
    return {
        "target": "numpy:" + helpers.write_npz(root / "target.npz", num_per_class=40),
        "target3": "numpy:" + helpers.write_npz(root / "t3.npz", num_per_class=30, num_classes=3),
        "backbone": helpers.saved_backbone(root / "backbone.keras"),
    }


def _config(world, run_dir, **overrides):
    return helpers.small_run_config(
        **{
            "target": world["target"],
            "backbone": world["backbone"],
            "output_dir": str(run_dir),
            "method": "linear_probe",
            **overrides,
        }
    )


def _softmax(logits):
    logits = logits - logits.max(-1, keepdims=True)
    return np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)


def _features_and_labels(num_classes, seed=0, n=60, d=6):
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % num_classes
    centres = rng.normal(0, 1.5, (num_classes, d))
    # Features on very different scales and offsets, as raw activations are.
    features = (centres[labels] + rng.normal(0, 1, (n, d))) * rng.uniform(0.1, 30, d) + 5
    return features, labels


def test_folded_head_reproduces_the_standardisation():
    rng = np.random.default_rng(1)
    coef, intercept = rng.normal(size=(3, 5)), rng.normal(size=3)
    mean, scale = rng.normal(size=5) * 10, rng.uniform(0.01, 20, 5)
    x = rng.normal(size=(7, 5)) * 10
    kernel, bias = lp.fold_standardisation(coef, intercept, mean, scale)
    assert kernel.shape == (5, 3) and bias.shape == (3,)
    expected = ((x - mean) / scale) @ coef.T + intercept
    np.testing.assert_allclose(x @ kernel + bias, expected, rtol=1e-12, atol=1e-10)


@pytest.mark.parametrize("num_classes", [2, 3])
def test_keras_head_equals_sklearn_predict_proba(num_classes):
    features, labels = _features_and_labels(num_classes)
    fit = lp.fit_probe(features, labels, features, labels, (0.1, 1.0), num_classes)
    kernel, bias = fit.folded()
    inputs = keras.Input((features.shape[1],))
    classifier = lp.probe_classifier(keras.Model(inputs, inputs), kernel, bias)
    ours = np.asarray(classifier(features.astype("float32")))
    theirs = fit.estimator.predict_proba(fit.scaler.transform(features))
    assert theirs.shape == (len(features), num_classes)
    np.testing.assert_allclose(ours, theirs, atol=1e-5)
    # The softmax rows of a binary probe give sklearn's sigmoid exactly.
    np.testing.assert_allclose(
        _softmax(fit.scaler.transform(features) @ fit.coef.T + fit.intercept), theirs, atol=1e-12
    )


def test_probe_on_a_backbone_equals_sklearn_on_its_features(world):
    images, labels = helpers.easy_images(12, seed=4, num_classes=3)
    source = from_numpy(images, labels)
    backbone = models.load_backbone(world["backbone"], (16, 16, 1))
    classifier = models.build_classifier(backbone, 3)
    features_model = lp.probe_features_model(classifier, "block1_relu", "flatten", pool_size=2)
    features, y = lp.extract_features(features_model, source, 16, batch_size=8, verbose=0)
    assert features.shape == (36, 4 * 4 * 4)
    fit = lp.fit_probe(features, y, features, y, (0.01, 1.0), 3)
    probe_model = lp.probe_classifier(features_model, *fit.folded())
    np.testing.assert_allclose(
        np.asarray(probe_model(images.astype("float32"))),
        fit.estimator.predict_proba(fit.scaler.transform(features)),
        atol=1e-5,
    )


def test_the_chosen_c_has_the_lowest_validation_crossentropy():
    features, labels = _features_and_labels(3, seed=2, n=105, d=20)
    train_x, train_y, val_x, val_y = features[:45], labels[:45], features[45:], labels[45:]
    grid = (1e-4, 1e-2, 1.0, 100.0)
    fit = lp.fit_probe(train_x, train_y, val_x, val_y, grid, 3)
    mean, std = train_x.mean(0), train_x.std(0)
    losses = []
    for c in grid:
        # An independent reference: a fresh fit, and the cross-entropy in NumPy.
        reference = LogisticRegression(C=c, max_iter=1000, random_state=0)
        reference.fit((train_x - mean) / std, train_y)
        p = reference.predict_proba((val_x - mean) / std)
        losses.append(-np.mean(np.log(p[np.arange(len(val_y)), val_y])))
    assert [s["C"] for s in fit.scores] == list(grid)
    np.testing.assert_allclose([s["val_crossentropy"] for s in fit.scores], losses, rtol=1e-6)
    assert max(losses) - min(losses) > 0.1  # the choice matters
    assert fit.c == grid[int(np.argmin(losses))]


def test_linear_probe_run_trains_no_epoch_and_saves_a_plain_classifier(world, tmp_path):
    run = tmp_path / "run"
    out = training.finetune(_config(world, run, probe_c_grid="0.01,1"))
    report = out["report"]
    assert report["epochs_run"] == 0 and report["history"] == {}
    probe = report["linear_probe"]
    assert [s["C"] for s in probe["c_grid"]] == [0.01, 1.0]
    assert probe["C"] in (0.01, 1.0) and probe["features"] == 8
    # Scored like every other method: the chosen C's validation cross-entropy.
    chosen = next(s for s in probe["c_grid"] if s["C"] == probe["C"])
    assert report["best_val_crossentropy"] == chosen["val_crossentropy"]
    assert chosen["val_crossentropy"] == min(s["val_crossentropy"] for s in probe["c_grid"])
    assert report["accuracy"] >= 0.9
    assert json.load(open(run / "report.json"))["linear_probe"]["C"] == probe["C"]
    assert json.load(open(run / "config.json"))["method"] == "linear_probe"
    # The backbone is untouched: its weights are the pretrained ones.
    pretrained = keras.saving.load_model(world["backbone"])
    loaded = keras.saving.load_model(str(run / "model.keras"), safe_mode=True)
    np.testing.assert_array_equal(
        loaded.get_layer("block2_conv").get_weights()[0],
        pretrained.get_layer("block2_conv").get_weights()[0],
    )
    assert loaded.output_shape == (None, 2) and loaded.layers[-1].name == "target_head"
    images = helpers.easy_images(4, seed=9)[0]
    reloaded = tf.saved_model.load(str(run / "saved_model"))
    served = reloaded.serve(tf.constant(images))
    np.testing.assert_allclose(
        served["probabilities"], loaded(images.astype("float32")), rtol=1e-5, atol=1e-6
    )


def test_flattened_intermediate_features_run(world, tmp_path):
    out = training.finetune(
        _config(
            world, tmp_path / "run", target=world["target3"], probe_layer="block1_pool",
            probe_pooling="flatten", export=False,
        )
    )
    assert out["report"]["linear_probe"]["features"] == 4 * 4 * 4
    loaded = keras.saving.load_model(str(tmp_path / "run" / "model.keras"))
    assert [layer.name for layer in loaded.layers][-2:] == ["probe_flatten", "target_head"]


def test_bad_probe_options(world, tmp_path):
    with pytest.raises(ValueError, match=r"e\.g\. .*block1_relu.*Received: probe_layer='block9'"):
        training.finetune(_config(world, tmp_path / "a", probe_layer="block9"))
    for grid in ("", "0.1,-1", "small"):
        with pytest.raises(ValueError, match=f"Received: probe_c_grid={grid!r}"):
            _config(world, tmp_path / "b", probe_c_grid=grid)
    with pytest.raises(ValueError, match="`probe_pooling` must be one of"):
        _config(world, tmp_path / "c", probe_pooling="max")
    with pytest.raises(ValueError, match="use --class_weight=balanced"):
        training.finetune(_config(world, tmp_path / "d", sampling="balanced"))
    # 128 x 128 x 4 = 65,536 flattened features: over the bound.
    big = models.build_classifier(models.small_cnn((256, 256, 1), widths=(4, 8)), 2)
    with pytest.raises(ValueError, match=f"more than the {lp.MAX_PROBE_FEATURES} allowed"):
        lp.probe_features_model(big, "block1_relu", "flatten")
    assert lp.probe_features_model(big, "block1_relu", "flatten", pool_size=2).output_shape == (
        None, 64 * 64 * 4,
    )
    with pytest.raises(ValueError, match="Received: probe_pool_size=300"):
        lp.probe_features_model(big, "block1_relu", "flatten", pool_size=300)


def test_a_class_without_training_images_is_rejected():
    features, labels = _features_and_labels(3)
    keep = labels != 1
    with pytest.raises(ValueError, match=r"every one of the 3 classes. Received: training labels \[0, 2\]"):
        lp.fit_probe(features[keep], labels[keep], features, labels, (1.0,), 3)
