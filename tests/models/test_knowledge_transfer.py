import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_seltransfer import distribute
from keras_seltransfer.models import backbones
from keras_seltransfer.models import build_classifier
from keras_seltransfer.models import set_batchnorm_mode
from keras_seltransfer.models.antialiasing import antialias
from keras_seltransfer.models.knowledge_transfer import KnowledgeTransferModel
from keras_seltransfer.models.knowledge_transfer import stage_outputs
from tests import helpers


def _teacher(seed=0):
    keras.utils.set_random_seed(seed)
    teacher = build_classifier(backbones.small_cnn((16, 16, 1), widths=(4, 8)), 2)
    rng = np.random.default_rng(seed)
    for layer in teacher.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            gamma, beta, mean, var = layer.get_weights()
            layer.set_weights(
                [
                    rng.uniform(0.5, 1.5, gamma.shape).astype("float32"),
                    rng.normal(0, 0.2, beta.shape).astype("float32"),
                    rng.normal(0, 0.05, mean.shape).astype("float32"),
                    rng.uniform(0.5, 1.5, var.shape).astype("float32"),
                ]
            )
    return teacher


def _pair(seed=0, **kwargs):
    teacher = _teacher(seed)
    student = antialias(teacher, filt_size=3)
    # The student starts from the teacher but not at it (as after some
    # fine-tuning), so every transfer term is non-zero.
    rng = np.random.default_rng(seed + 1)
    for name in ("block2_conv", "target_head"):
        layer = student.get_layer(name)
        layer.set_weights(
            [w + rng.normal(0, 0.5, w.shape).astype("float32") for w in layer.get_weights()]
        )
    return teacher, student, KnowledgeTransferModel(student, teacher, **kwargs)


def _data(n=16):
    images, labels = helpers.easy_images(n // 2, size=16, seed=3)
    return images.astype("float32"), labels


def _numpy_terms(teacher, student, pairs, x):
    t_maps = keras.Model(teacher.inputs[0], [teacher.get_layer(t).output for t, _ in pairs])(x)
    s_maps = keras.Model(student.inputs[0], [student.get_layer(s).output for _, s in pairs])(x)
    t_maps = [np.asarray(m, np.float64) for m in t_maps]
    s_maps = [np.asarray(m, np.float64) for m in s_maps]
    pixel = np.mean([((s - t) ** 2).reshape(len(x), -1).mean(1) for t, s in zip(t_maps, s_maps)], 0)
    cosines = []
    for t, s in zip(t_maps, s_maps):
        a, b = t.mean(axis=(1, 2)), s.mean(axis=(1, 2))
        cosines.append((a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)))
    global_ = np.mean([1 - c for c in cosines], 0)
    p_t = np.clip(np.asarray(teacher(x), np.float64), 1e-7, 1)
    p_s = np.clip(np.asarray(student(x), np.float64), 1e-7, 1)
    logit = (p_t * np.log(p_t / p_s)).sum(1)
    return {
        "pixel": pixel,
        "global": global_,
        "logit": logit,
        "p_s": np.asarray(student(x), np.float64),
    }


def test_stage_outputs_are_the_last_map_of_every_resolution():
    teacher = _teacher()
    assert stage_outputs(teacher) == ["block1_relu", "block2_relu"]
    inputs = keras.Input((16, 16, 3))
    x = keras.layers.ZeroPadding2D(1, name="pad")(inputs)
    x = keras.layers.Conv2D(4, 3, strides=2, name="c1")(x)
    x = keras.layers.ReLU(name="r1")(x)
    x = keras.layers.Conv2D(4, 3, padding="same", name="c2")(x)
    x = keras.layers.MaxPooling2D(name="p")(x)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    assert stage_outputs(keras.Model(inputs, x)) == ["c2", "p"]
    dynamic = build_classifier(backbones.small_cnn((None, None, 1), widths=(4,)), 2)
    with pytest.raises(ValueError, match="static spatial sizes"):
        stage_outputs(dynamic)


def test_loss_is_cross_entropy_plus_weighted_terms_against_numpy():
    weights = {"pixel_weight": 0.7, "global_weight": 2.0, "logit_weight": 0.3}
    teacher, student, model = _pair(**weights)
    assert model.layer_names == [
        ("block1_relu", "block1_relu_blurpool"),
        ("block2_relu", "block2_relu"),
    ]
    model.compile(keras.optimizers.SGD(0.0), "sparse_categorical_crossentropy")
    x, y = _data()
    ref = _numpy_terms(teacher, student, model.layer_names, x)
    assert min(ref["pixel"].min(), ref["global"].min(), ref["logit"].min()) > 1e-6
    ce = -np.log(ref["p_s"][np.arange(len(y)), y]).mean()
    results = model.evaluate(x, y, batch_size=len(x), verbose=0, return_dict=True)
    expected = (
        ce + 0.7 * ref["pixel"].mean() + 2.0 * ref["global"].mean() + 0.3 * ref["logit"].mean()
    )
    np.testing.assert_allclose(results["loss"], expected, rtol=1e-4)
    for term in ("pixel", "global", "logit"):
        np.testing.assert_allclose(results[f"{term}_loss"], ref[term].mean(), rtol=1e-4)
    # predict gives the student's probabilities.
    np.testing.assert_allclose(model.predict(x, verbose=0), ref["p_s"], rtol=1e-5)


@pytest.mark.parametrize("off", ["pixel_weight", "global_weight", "logit_weight"])
def test_each_term_switches_off_but_is_still_logged(off):
    weights = {"pixel_weight": 1.0, "global_weight": 1.0, "logit_weight": 1.0, off: 0.0}
    teacher, student, model = _pair(**weights)
    model.compile(keras.optimizers.SGD(0.0), "sparse_categorical_crossentropy")
    x, y = _data()
    ref = _numpy_terms(teacher, student, model.layer_names, x)
    ce = -np.log(ref["p_s"][np.arange(len(y)), y]).mean()
    results = model.evaluate(x, y, batch_size=len(x), verbose=0, return_dict=True)
    expected = ce + sum(ref[t].mean() for t in ("pixel", "global", "logit") if t + "_weight" != off)
    np.testing.assert_allclose(results["loss"], expected, rtol=1e-4)
    term = off.replace("_weight", "")
    np.testing.assert_allclose(results[f"{term}_loss"], ref[term].mean(), rtol=1e-4)


def test_fit_reduces_the_loss_and_keeps_the_teacher_frozen():
    teacher, student, model = _pair(pixel_weight=1.0, global_weight=1.0, logit_weight=0.5)
    # The student's BatchNorm trains; the teacher's must still not move.
    set_batchnorm_mode(student, "train")
    teacher_before = [w.copy() for w in teacher.get_weights()]
    student_before = [w.copy() for w in student.get_weights()]
    model.compile(
        keras.optimizers.Adam(1e-2), "sparse_categorical_crossentropy", metrics=["accuracy"]
    )
    x, y = _data(32)
    first = model.evaluate(x, y, verbose=0, return_dict=True)["loss"]
    history = model.fit(x, y, epochs=3, batch_size=8, verbose=0, validation_data=(x, y))
    for key in (
        "pixel_loss",
        "global_loss",
        "logit_loss",
        "val_pixel_loss",
        "val_global_loss",
        "accuracy",
    ):
        assert key in history.history, key
    assert model.evaluate(x, y, verbose=0, return_dict=True)["loss"] < first
    for a, b in zip(teacher.get_weights(), teacher_before):
        np.testing.assert_array_equal(a, b)
    assert any(np.abs(a - b).max() > 0 for a, b in zip(student.get_weights(), student_before))
    assert not teacher.trainable
    assert not any(w is v for w in model.trainable_weights for v in teacher.weights)


@pytest.mark.parametrize("train", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_mirrored_strategy_matches_one_device(train):
    x, y = _data(16)
    teacher, student, single = _pair(pixel_weight=0.5, global_weight=1.5, logit_weight=0.2)
    # Frozen BatchNorm: per-replica batch statistics would differ legitimately.
    set_batchnorm_mode(student, "frozen")
    single.compile(keras.optimizers.SGD(0.05), "sparse_categorical_crossentropy")
    strategy = distribute.get_strategy("mirrored")
    assert strategy.num_replicas_in_sync == 2
    with strategy.scope():
        d_teacher = keras.models.clone_model(teacher)
        d_student = keras.models.clone_model(student)
        d_teacher.set_weights(teacher.get_weights())
        d_student.set_weights(student.get_weights())
        set_batchnorm_mode(d_student, "frozen")
        mirrored = KnowledgeTransferModel(
            d_student, d_teacher, pixel_weight=0.5, global_weight=1.5, logit_weight=0.2
        )
        mirrored.compile(keras.optimizers.SGD(0.05), "sparse_categorical_crossentropy")
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(8)
    # The terms are scaled for the replicas like Keras' own losses: the same
    # loss and the same update on one device and on two.
    a = single.evaluate(ds, verbose=0, return_dict=True)
    b = mirrored.evaluate(ds, verbose=0, return_dict=True)
    for key in ("loss", "pixel_loss", "global_loss", "logit_loss"):
        np.testing.assert_allclose(b[key], a[key], rtol=1e-4, err_msg=key)
    history = mirrored.fit(ds, epochs=1, shuffle=False, verbose=0).history
    assert {"pixel_loss", "global_loss", "logit_loss"} <= set(history)
    if train:
        single.fit(ds, epochs=1, shuffle=False, verbose=0)
        for u, v in zip(single.student.get_weights(), mirrored.student.get_weights()):
            np.testing.assert_allclose(v, u, rtol=1e-4, atol=1e-6)


def test_explicit_layers_config_round_trip_and_keras_file(tmp_path):
    teacher, student, model = _pair(
        layer_names=[("block1_relu", "block1_relu_blurpool"), "block2_relu"],
        pixel_weight=0.25,
        global_weight=0.0,
        logit_weight=1.0,
    )
    config = model.get_config()
    restored = KnowledgeTransferModel.from_config(config)
    assert restored.layer_names == model.layer_names
    assert (restored.pixel_weight, restored.global_weight, restored.logit_weight) == (
        0.25,
        0.0,
        1.0,
    )
    x, _ = _data(4)
    path = str(tmp_path / "kt.keras")
    model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    np.testing.assert_allclose(loaded.predict(x, verbose=0), model.predict(x, verbose=0), rtol=1e-6)
    assert not loaded.teacher.trainable


def test_errors():
    teacher, student, _ = _pair()
    with pytest.raises(
        ValueError, match="`pixel_weight` must be a number >= 0. Received: pixel_weight=-1"
    ):
        KnowledgeTransferModel(student, teacher, pixel_weight=-1)
    with pytest.raises(ValueError, match="has no layer 'nope'"):
        KnowledgeTransferModel(student, teacher, layer_names=["nope"])
    with pytest.raises(ValueError, match="compare maps of equal shape"):
        KnowledgeTransferModel(student, teacher, layer_names=[("block1_relu", "block1_relu")])
    with pytest.raises(ValueError, match="at least one layer"):
        KnowledgeTransferModel(student, teacher, layer_names=[])
    other = build_classifier(backbones.small_cnn((12, 12, 1), widths=(4,)), 2)
    with pytest.raises(ValueError, match="same input"):
        KnowledgeTransferModel(other, teacher)
    three = build_classifier(backbones.small_cnn((16, 16, 1), widths=(4, 8)), 3)
    with pytest.raises(ValueError, match="same classes"):
        KnowledgeTransferModel(three, teacher)


def test_stage_outputs_are_cuts_of_the_graph():
    # A residual branch summed by a plain operation (ConvNeXt's
    # `x + block(x)`): the branch's last layer is not a stage output, since
    # the rest of the network also needs the sum's other input.
    inputs = keras.Input((16, 16, 3))
    down = keras.layers.Conv2D(4, 3, strides=2, padding="same", name="down")(inputs)
    branch = keras.layers.Conv2D(4, 3, padding="same", name="branch")(down)
    summed = down + branch
    pooled = keras.layers.Conv2D(4, 3, strides=2, padding="same", name="down2")(summed)
    out = keras.layers.ReLU(name="last")(pooled)
    model = keras.Model(inputs, out)
    assert stage_outputs(model) == ["down", "last"]
    from keras_seltransfer.models import channel_attention

    # The attention of DELTA can cut the network at every stage output.
    classifier = build_classifier(
        keras.Model(inputs, keras.layers.GlobalAveragePooling2D()(out)), 2
    )
    images = np.random.default_rng(0).uniform(0, 1, (4, 16, 16, 3)).astype("float32")
    increases = channel_attention.channel_loss_increases(
        classifier, images, np.array([0, 1, 0, 1]), stage_outputs(model)
    )
    assert [len(d) for d in increases] == [4, 4]
