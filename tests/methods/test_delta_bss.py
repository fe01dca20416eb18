"""DELTA and BSS: their terms against NumPy references, the channel attention
against a hand-computed ablation, the training models' logged terms, and one
short run of each method that saves, reloads and serves its classifier."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_seltransfer import losses
from keras_seltransfer import models
from keras_seltransfer import training
from keras_seltransfer.models.regularized_training import head_features_layer
from tests import helpers


# -- the numerical pieces ---------------------------------------------------


@pytest.mark.parametrize("shape, k", [((8, 5), 1), ((8, 5), 2), ((3, 6), 1), ((3, 6), 3)])
def test_batch_spectral_shrinkage_matches_numpy_svd(shape, k):
    features = np.random.default_rng(0).normal(size=shape).astype("float32")
    singular = np.linalg.svd(features.astype("float64"), compute_uv=False)  # descending
    expected = np.sum(np.sort(singular)[:k] ** 2)
    actual = float(losses.batch_spectral_shrinkage(features, k=k))
    np.testing.assert_allclose(actual, expected, rtol=1e-4)


def test_batch_spectral_shrinkage_gradient_is_that_of_the_smallest_singular_value():
    features = tf.constant(np.random.default_rng(1).normal(size=(6, 4)).astype("float32"))
    with tf.GradientTape() as tape:
        tape.watch(features)
        penalty = losses.batch_spectral_shrinkage(features, k=1)
    u, s, vt = np.linalg.svd(features.numpy().astype("float64"), full_matrices=False)
    # d(sigma^2)/dF = 2 sigma u v^T for the smallest singular value.
    expected = 2.0 * s[-1] * np.outer(u[:, -1], vt[-1])
    np.testing.assert_allclose(tape.gradient(penalty, features).numpy(), expected, atol=1e-4)


def test_batch_spectral_shrinkage_rejects_bad_arguments():
    with pytest.raises(ValueError, match=r"`k` must be a positive int. Received: k=0"):
        losses.batch_spectral_shrinkage(np.ones((3, 2), "float32"), k=0)
    with pytest.raises(ValueError, match=r"`features` must be a \[batch, dim\] matrix"):
        losses.batch_spectral_shrinkage(np.ones((3, 2, 2), "float32"))


def _distance_with_loops(teacher, student, weights):
    """DELTA's per-example distance, one example, layer, channel and position at a time."""
    batch = teacher[0].shape[0]
    out = np.zeros(batch)
    for b in range(batch):
        for t, s, w in zip(teacher, student, weights):
            height, width, channels = t.shape[1:]
            for c in range(channels):
                squared = 0.0
                for i in range(height):
                    for j in range(width):
                        squared += (s[b, i, j, c] - t[b, i, j, c]) ** 2
                out[b] += 0.5 * channels * w[c] * squared / (height * width)
    return out


def test_weighted_feature_distance_matches_explicit_loops():
    rng = np.random.default_rng(2)
    shapes = [(3, 4, 5, 2), (3, 2, 2, 3)]
    teacher = [rng.normal(size=s).astype("float32") for s in shapes]
    student = [rng.normal(size=s).astype("float32") for s in shapes]
    weights = [rng.uniform(size=s[-1]) for s in shapes]
    weights = [w / w.sum() for w in weights]
    actual = np.asarray(losses.weighted_feature_distance(teacher, student, weights))
    np.testing.assert_allclose(actual, _distance_with_loops(teacher, student, weights), rtol=1e-5)
    uniform = [np.full(s[-1], 1.0 / s[-1]) for s in shapes]
    np.testing.assert_allclose(
        np.asarray(losses.weighted_feature_distance(teacher, student)),
        _distance_with_loops(teacher, student, uniform),
        rtol=1e-5,
    )
    with pytest.raises(ValueError, match=r"`channel_weights\[1\]` must have one weight per channel"):
        losses.weighted_feature_distance(teacher, student, [weights[0], weights[0]])
    with pytest.raises(ValueError, match="one vector per feature map"):
        losses.weighted_feature_distance(teacher, student, weights[:1])


def _attention_reference(increases, temperature=5.0):
    z = (increases - increases.mean()) / increases.std() / temperature
    return np.exp(z) / np.exp(z).sum()


def test_channel_attention_is_the_softmax_of_standardised_increases():
    increases = np.array([0.5, -0.1, 2.0, 0.0])
    np.testing.assert_allclose(
        losses.channel_attention(increases), _attention_reference(increases), rtol=1e-12
    )
    # A larger increase gets a larger weight; equal increases, equal weights.
    assert np.argmax(losses.channel_attention(increases)) == 2
    np.testing.assert_allclose(losses.channel_attention(np.full(3, 0.2)), np.full(3, 1 / 3))
    with pytest.raises(ValueError, match=r"`temperature` must be > 0. Received: temperature=0"):
        losses.channel_attention(increases, temperature=0)
    with pytest.raises(ValueError, match="non-empty finite vector"):
        losses.channel_attention(np.array([np.nan, 1.0]))


def _tiny_classifier():
    """Images [4, 4, 1] -> 1x1 conv (3 channels, ReLU) "maps" -> mean over
    positions -> softmax head, with assigned weights."""
    inputs = keras.Input((4, 4, 1))
    maps = keras.layers.Conv2D(3, 1, use_bias=False, activation="relu", name="maps")(inputs)
    pooled = keras.layers.GlobalAveragePooling2D(name="features")(maps)
    outputs = keras.layers.Dense(2, activation="softmax", name="target_head")(pooled)
    model = keras.Model(inputs, outputs)
    conv = np.array([1.0, -0.5, 2.0], "float32").reshape(1, 1, 1, 3)
    kernel = np.array([[1.5, -1.0], [0.3, 0.8], [-2.0, 1.0]], "float32")
    bias = np.array([0.1, -0.1], "float32")
    model.get_layer("maps").set_weights([conv])
    model.get_layer("target_head").set_weights([kernel, bias])
    return model, conv.reshape(3), kernel, bias


def _mean_crossentropy(pooled, labels, kernel, bias):
    logits = pooled @ kernel + bias
    logits = logits - logits.max(axis=1, keepdims=True)
    log_p = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    return -log_p[np.arange(len(labels)), labels].mean()


@pytest.mark.parametrize("batch_size", [5, 64])
def test_channel_loss_increases_and_attention_match_a_hand_ablation(batch_size):
    model, conv, kernel, bias = _tiny_classifier()
    rng = np.random.default_rng(3)
    images = rng.uniform(-1, 1, size=(7, 4, 4, 1)).astype("float32")
    labels = rng.integers(0, 2, size=7)
    # The map of channel c is relu(w_c * x); its pooled value the mean over positions.
    pooled = np.maximum(images[..., 0:1] * conv, 0).mean(axis=(1, 2))
    base = _mean_crossentropy(pooled, labels, kernel, bias)
    expected = []
    for c in range(3):
        removed = pooled.copy()
        removed[:, c] = 0.0
        expected.append(_mean_crossentropy(removed, labels, kernel, bias) - base)
    expected = np.array(expected)
    (increases,) = models.channel_loss_increases(
        model, images, labels, ["maps"], batch_size=batch_size
    )
    np.testing.assert_allclose(increases, expected, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(
        losses.channel_attention(increases), _attention_reference(expected), rtol=1e-3
    )


def test_channel_loss_increases_rejects_unknown_layers():
    model = _tiny_classifier()[0]
    with pytest.raises(ValueError, match="has no layer 'nope'"):
        models.channel_loss_increases(model, np.zeros((2, 4, 4, 1)), [0, 1], ["nope"])


# -- the training models ------------------------------------------------------


def _perturbed_copy(classifier, seed):
    copy = keras.models.clone_model(classifier)
    rng = np.random.default_rng(seed)
    copy.set_weights([w + 0.1 * rng.normal(size=w.shape) for w in classifier.get_weights()])
    return copy


def test_delta_model_adds_and_logs_its_weighted_terms():
    backbone = models.small_cnn((16, 16, 1), widths=(4, 8))
    classifier = _perturbed_copy(models.build_classifier(backbone, 2), seed=4)
    names = ["block1_relu", "block2_relu"]
    weights = [np.array([0.1, 0.2, 0.3, 0.4]), np.full(8, 1 / 8)]
    model = models.DeltaModel(classifier, backbone, names, weights, alpha=2.0, beta=0.5)
    images, labels = helpers.easy_images(8)
    images = images.astype("float32")
    model.compile("sgd", "sparse_categorical_crossentropy", metrics=["accuracy"])
    logs = model.evaluate(images, labels, batch_size=16, return_dict=True, verbose=0)
    student = keras.Model(classifier.inputs, [classifier.get_layer(n).output for n in names])
    teacher = keras.Model(backbone.inputs, [backbone.get_layer(n).output for n in names])
    expected = _distance_with_loops(
        [np.asarray(t) for t in teacher(images)], [np.asarray(s) for s in student(images)], weights
    ).mean()
    head = sum(0.5 * np.sum(w**2) for w in classifier.get_layer("target_head").get_weights())
    probabilities = np.asarray(classifier(images))
    crossentropy = -np.mean(np.log(probabilities[np.arange(len(labels)), labels]))
    assert expected > 0
    np.testing.assert_allclose(logs["delta_loss"], expected, rtol=1e-4)
    np.testing.assert_allclose(logs["head_l2"], head, rtol=1e-5)
    np.testing.assert_allclose(
        logs["loss"], crossentropy + 2.0 * expected + 0.5 * head, rtol=1e-4
    )
    with pytest.raises(ValueError, match=r"`alpha` must be a number >= 0. Received: alpha=-1"):
        models.DeltaModel(classifier, backbone, names, alpha=-1)


def test_bss_model_adds_and_logs_the_smallest_singular_value():
    backbone = models.small_cnn((16, 16, 1), widths=(4, 8))
    classifier = models.build_classifier(backbone, 2, dropout=0.5)
    assert head_features_layer(classifier) == "features"
    model = models.BatchSpectralShrinkageModel(classifier, eta=3.0, k=2)
    images, labels = helpers.easy_images(8)
    images = images.astype("float32")
    model.compile("sgd", "sparse_categorical_crossentropy")
    logs = model.evaluate(images, labels, batch_size=16, return_dict=True, verbose=0)
    features = np.asarray(backbone(images)).astype("float64")
    expected = np.sum(np.sort(np.linalg.svd(features, compute_uv=False))[:2] ** 2)
    probabilities = np.asarray(classifier(images))
    crossentropy = -np.mean(np.log(probabilities[np.arange(len(labels)), labels]))
    np.testing.assert_allclose(logs["bss_loss"], expected, rtol=1e-3)
    np.testing.assert_allclose(logs["loss"], crossentropy + 3.0 * expected, rtol=1e-4)
    # predict serves the classifier alone.
    np.testing.assert_allclose(model.predict(images, verbose=0), probabilities, rtol=1e-6)


# -- the methods, end to end ----------------------------------------------------


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return helpers.method_world(
        tmp_path_factory.mktemp("delta_bss_world"), num_per_class=30, with_source=False
    )


def _run(world, run_dir, **fields):
    config = helpers.small_run_config(
        **{
            "target": world["target"],
            "backbone": world["backbone"],
            "output_dir": str(run_dir),
            "epochs": 2,
            "patience": 2,
            **fields,
        }
    )
    return training.finetune(config)


def _serves_like_the_keras_file(run_dir):
    images = helpers.easy_images(3, seed=7)[0]
    reloaded = tf.saved_model.load(str(run_dir / "saved_model"))
    served = reloaded.serve(tf.constant(images))
    loaded = keras.saving.load_model(str(run_dir / "model.keras"), safe_mode=True)
    np.testing.assert_allclose(
        served["probabilities"].numpy(),
        np.asarray(loaded(images.astype("float32"))),
        rtol=1e-5,
        atol=1e-6,
    )
    # The saved model is the plain classifier: one output, no teacher inside.
    assert len(loaded.outputs) == 1 and not any(isinstance(l, keras.Model) for l in loaded.layers)
    return loaded


def test_delta_trains_with_attention_saves_and_serves_the_classifier(world, tmp_path):
    out = _run(world, tmp_path / "run", method="delta", delta_alpha=1.0)
    report = out["report"]
    delta = report["delta"]
    assert delta["layers"] == ["block1_relu", "block2_relu"] and delta["attention"]
    assert [len(w) for w in delta["channel_weights"]] == [4, 8]
    for weights, increases in zip(delta["channel_weights"], delta["loss_increases"]):
        np.testing.assert_allclose(sum(weights), 1.0, rtol=1e-5)
        assert np.argmax(weights) == np.argmax(increases)
    for key in ("delta_loss", "head_l2", "val_delta_loss", "crossentropy"):
        assert len(report["history"][key]) == report["epochs_run"], key
    assert report["history"]["delta_loss"][-1] > 0
    _serves_like_the_keras_file(tmp_path / "run")


def test_delta_without_attention_weights_channels_uniformly(world, tmp_path):
    out = _run(
        world, tmp_path / "run", method="delta", delta_attention=False, delta_layers="block2_relu",
        epochs=1, export=False,
    )
    delta = out["report"]["delta"]
    assert delta == {"layers": ["block2_relu"], "alpha": 0.64, "beta": 0.01, "attention": False}


def test_bss_trains_saves_and_serves_the_classifier(world, tmp_path):
    out = _run(world, tmp_path / "run", method="bss", bss_eta=0.01, bss_k=2)
    report = out["report"]
    assert report["bss"] == {"eta": 0.01, "k": 2, "features_layer": "features"}
    assert len(report["history"]["bss_loss"]) == report["epochs_run"]
    assert report["history"]["bss_loss"][0] > 0
    _serves_like_the_keras_file(tmp_path / "run")


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"method": "bss", "bss_k": 0}, r"`bss_k` must be a positive int. Received: bss_k=0"),
        ({"method": "bss", "bss_eta": -0.1}, r"`bss_eta` must be a number >= 0"),
        ({"method": "delta", "delta_alpha": -1.0}, r"`delta_alpha` must be a number >= 0"),
        ({"method": "delta", "delta_layers": " , "}, r"`delta_layers` must be a comma-separated"),
        (
            {"method": "delta", "delta_attention_images": 0},
            r"`delta_attention_images` must be a positive int",
        ),
    ],
)
def test_bad_options_are_rejected(fields, message):
    with pytest.raises(ValueError, match=message):
        training.FinetuneConfig(**fields)


def test_interrupted_delta_run_resumes_to_the_same_result(world, tmp_path, monkeypatch):
    from keras_seltransfer.training import loop

    settings = dict(method="delta", epochs=3, patience=3, export=False, delta_layers="block2_relu")
    reference = _run(world, tmp_path / "a", **settings)["report"]

    class Interrupted(loop.TrainingCheckpoint):
        def on_epoch_end(self, epoch, logs=None):
            super().on_epoch_end(epoch, logs)
            if epoch == 0:
                raise KeyboardInterrupt

    monkeypatch.setattr(loop, "TrainingCheckpoint", Interrupted)
    with pytest.raises(KeyboardInterrupt):
        _run(world, tmp_path / "b", **settings)
    monkeypatch.undo()
    keras.backend.clear_session()
    report = _run(world, tmp_path / "b", **settings)["report"]
    assert report["resumed_from_epoch"] == 1
    for key in ("delta_loss", "val_delta_loss", "val_crossentropy"):
        np.testing.assert_allclose(
            report["history"][key], reference["history"][key][1:], rtol=1e-4, err_msg=key
        )
