import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_seltransfer import distribute
from keras_seltransfer.export import export_saved_model
from keras_seltransfer.models import backbones
from keras_seltransfer.models import build_classifier
from keras_seltransfer.models import set_batchnorm_mode
from keras_seltransfer.models.gating import adafilter
from keras_seltransfer.models.gating import gate_controller
from keras_seltransfer.models.gating import gate_usage
from keras_seltransfer.models.gating import gated_layers
from keras_seltransfer.models.gated_conversion import gated_conv_config


def _classifier(widths=(4, 8), size=16, channels=1):
    return build_classifier(backbones.small_cnn((size, size, channels), widths=widths), 3)


def _images(n=6, size=16, channels=1, seed=0):
    # Brightness varies per image, so the pooled inputs of the gate network do.
    rng = np.random.default_rng(seed)
    brightness = rng.uniform(0.2, 1.0, (n, 1, 1, 1))
    return (brightness * rng.uniform(0, 255, (n, size, size, channels))).astype("float32")


def _randomise_batchnorm(model, seed=0):
    """Pretrained-looking BatchNorm statistics, so dropping or misplacing a
    batch norm changes the outputs."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            shape = layer.moving_mean.shape
            layer.gamma.assign(rng.uniform(0.5, 1.5, shape))
            layer.beta.assign(rng.normal(0, 0.2, shape))
            layer.moving_mean.assign(rng.normal(0, 0.2, shape))
            layer.moving_variance.assign(rng.uniform(0.5, 1.5, shape))


def _scramble_gates(model, seed=1):
    """Controller weights that open and close gates per example and filter."""
    rng = np.random.default_rng(seed)
    controller = gate_controller(model)
    for w in controller.trainable_weights:
        w.assign(rng.normal(0, 1.0, w.shape))


def _probe(model):
    return keras.Model(model.input, [layer.input[1] for layer in gated_layers(model)])


def _perturb_finetuned(model, seed=2, scale=0.3):
    rng = np.random.default_rng(seed)
    for layer in gated_layers(model):
        layer.kernel.assign(layer.kernel.numpy() + rng.normal(0, scale, layer.kernel.shape))


def test_small_cnn_output_preserved_at_initialisation_with_any_gates():
    classifier = _classifier()
    _randomise_batchnorm(classifier)
    x = _images()
    expected = np.asarray(classifier(x))
    model = adafilter(classifier)
    assert [layer.name for layer in gated_layers(model)] == ["block1_conv", "block2_conv"]
    assert not any(isinstance(layer, keras.layers.BatchNormalization) for layer in model.layers)
    assert all(layer.batchnorm for layer in gated_layers(model))
    head = model.get_layer("target_head")
    assert type(head) is keras.layers.Dense
    for a, b in zip(head.get_weights(), classifier.get_layer("target_head").get_weights()):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(model(x), expected)

    _scramble_gates(model)
    gates = [np.asarray(g) for g in _probe(model)(x)]
    assert all(0 < g.mean() < 1 for g in gates)
    gates = np.concatenate(gates, axis=1)
    assert np.abs(gates - gates[:1]).sum() > 0  # gates differ per example
    np.testing.assert_array_equal(model(x), expected)
    # Once the fine-tuned kernels move, the gates matter.
    _perturb_finetuned(model)
    assert np.abs(np.asarray(model(x)) - expected).max() > 1e-3


def _mobilenet_check(pattern, expected_gated, expected_depthwise):
    classifier = build_classifier(backbones.load_backbone("MobileNetV2", (32, 32, 3)), 2)
    _randomise_batchnorm(classifier)
    x = _images(2, 32, 3)
    expected = np.asarray(classifier(x))
    model = adafilter(classifier, layers=pattern)
    layers = gated_layers(model)
    assert len(layers) == expected_gated
    assert sum(layer.depthwise for layer in layers) == expected_depthwise
    assert all(layer.batchnorm for layer in layers)
    # Every gated convolution took its batch norm along.
    left = {l.name for l in model.layers if isinstance(l, keras.layers.BatchNormalization)}
    bns = {l.name for l in classifier.layers if isinstance(l, keras.layers.BatchNormalization)}
    assert len(bns) - len(left) == expected_gated
    _scramble_gates(model)
    np.testing.assert_allclose(model(x), expected, rtol=1e-6, atol=1e-6)
    gates = np.concatenate([np.asarray(g) for g in _probe(model)(x)], axis=1)
    assert 0 < gates.mean() < 1


def test_mobilenetv2_stem_and_strided_inverted_residual_block():
    # The stem, the first block's depthwise and projection convolutions and
    # block 1 (expansion, stride-2 depthwise, projection).
    _mobilenet_check(r"^(Conv1|expanded_conv_|block_1_)", 6, 2)


@pytest.mark.slow
def test_mobilenetv2_every_convolution():
    _mobilenet_check(None, 52, 17)


def _resnet_check(pattern, expected_gated):
    classifier = build_classifier(backbones.load_backbone("ResNet50", (32, 32, 3)), 2)
    _randomise_batchnorm(classifier)
    x = _images(2, 32, 3)
    expected = np.asarray(classifier(x))
    model = adafilter(classifier, layers=pattern)
    names = [layer.name for layer in gated_layers(model)]
    assert len(names) == expected_gated
    controller = gate_controller(model)
    assert controller.step_names == [n for n in controller.step_names if n in names]
    _scramble_gates(model)
    np.testing.assert_allclose(model(x), expected, rtol=1e-5, atol=1e-6)
    return model, names


def test_resnet50_block_with_a_shortcut_convolution():
    model, names = _resnet_check(r"^conv2_block1_", 4)
    # The shortcut (0) and the main branch (1-3) are all gated, with their
    # batch norms absorbed; other blocks are untouched.
    assert sorted(names) == [f"conv2_block1_{i}_conv" for i in range(4)]
    assert isinstance(model.get_layer("conv2_block2_1_bn"), keras.layers.BatchNormalization)
    assert "conv2_block1_0_bn" not in [layer.name for layer in model.layers]


@pytest.mark.slow
def test_resnet50_every_convolution():
    _resnet_check(None, 53)


def _branchy_model():
    inputs = keras.Input((8, 8, 2), name="x")
    a = keras.layers.Conv2D(3, 3, padding="same", activation="relu", name="act_conv")(inputs)
    a = keras.layers.BatchNormalization(name="after_act")(a)
    b = keras.layers.Conv2D(3, 1, name="two_consumers")(a)
    c = keras.layers.BatchNormalization(name="bn_of_two")(b)
    d = keras.layers.Add(name="add")([b, c])
    e = keras.layers.Conv2D(3, 1, name="pinned_conv")(d)
    e = keras.layers.BatchNormalization(name="pinned_bn")(e, training=False)
    e = keras.layers.Conv2D(3, 1, name="plain_conv")(e)
    e = keras.layers.BatchNormalization(name="plain_bn")(e)
    sep = keras.layers.Conv2DTranspose(3, 3, name="transposed")(e)
    out = keras.layers.GlobalAveragePooling2D()(sep)
    return keras.Model(inputs, keras.layers.Dense(2, name="head")(out))


def test_batch_norms_are_absorbed_only_after_a_plain_sole_producer():
    model = _branchy_model()
    _randomise_batchnorm(model)
    x = np.random.default_rng(0).normal(0, 1, (3, 8, 8, 2)).astype("float32")
    expected = np.asarray(model(x))
    with pytest.warns(UserWarning, match=r"ungated .*transposed \(Conv2DTranspose\)"):
        gated = adafilter(model)
    # Only the last batch norm moves into its convolution: the first follows
    # an activation, the second's convolution also feeds the Add and the
    # third is pinned to inference mode by its call.
    layers = gated_layers(gated)
    assert [l.name for l in layers] == ["act_conv", "two_consumers", "pinned_conv", "plain_conv"]
    assert [l.batchnorm for l in layers] == [False, False, False, True]
    for name in ("after_act", "bn_of_two", "pinned_bn"):
        assert isinstance(gated.get_layer(name), keras.layers.BatchNormalization)
    assert "plain_bn" not in [layer.name for layer in gated.layers]
    assert type(gated.get_layer("transposed")) is keras.layers.Conv2DTranspose
    _scramble_gates(gated)
    np.testing.assert_allclose(gated(x), expected, rtol=1e-6, atol=1e-6)


def test_layer_selection_errors():
    model = _branchy_model()
    with pytest.raises(ValueError, match=r"cannot gate: transposed \(Conv2DTranspose\)\. "
                       "Supported layer types: Conv2D, DepthwiseConv2D, SeparableConv2D"):
        adafilter(model, layers="trans|act")
    with pytest.raises(ValueError, match="matched no Conv2D, DepthwiseConv2D, SeparableConv2D layer"):
        adafilter(model, layers="^nothing$")
    with pytest.raises(ValueError, match="`layers` is not a regular expression"):
        adafilter(model, layers="(")
    with pytest.raises(ValueError, match="`layers` must be a regular expression"):
        adafilter(model, layers=["act_conv"])
    with pytest.raises(ValueError, match="`estimator` must be one of"):
        adafilter(model, layers="act", estimator="hard")
    with pytest.raises(ValueError, match="`units` must be a positive int"):
        adafilter(model, layers="act", units=0)
    with pytest.raises(ValueError, match="`train_batchnorm` must be True, False or None"):
        adafilter(model, layers="act", train_batchnorm="yes")
    inputs = keras.Input((8, 8, 2))
    shared = keras.layers.Conv2D(2, 1, name="shared")
    twice = keras.Model(inputs, shared(shared(inputs)))
    with pytest.raises(
        ValueError, match=r"applied more than once .*: shared \(Conv2D\)\. .*layers='\^\(\?!\^shared\$\)'"
    ):
        adafilter(twice)
    with pytest.raises(ValueError, match="must be a functional model"):
        adafilter(keras.Sequential([keras.layers.Conv2D(2, 1)]))
    with pytest.raises(ValueError, match="`conv` must be a Conv2D, DepthwiseConv2D or SeparableConv2D"):
        gated_conv_config(model.get_layer("transposed"))
    with pytest.raises(ValueError, match="Expected one GateController"):
        gate_controller(model)


def test_finetuned_batchnorm_trains_by_default_whatever_the_batchnorm_mode():
    for mode in ("frozen", "train"):
        classifier = _classifier()
        set_batchnorm_mode(classifier, mode)
        layers = gated_layers(adafilter(classifier))
        assert all(layer.train_batchnorm for layer in layers)
        names = {w.name for layer in layers for w in layer.trainable_weights}
        assert names == {"kernel", "gamma", "beta"}
    # train_batchnorm=None follows the mode; False freezes.
    for mode, trains in (("frozen", False), ("train", True)):
        classifier = _classifier()
        set_batchnorm_mode(classifier, mode)
        layers = gated_layers(adafilter(classifier, train_batchnorm=None))
        assert all(layer.train_batchnorm is trains for layer in layers)
    classifier = _classifier()
    set_batchnorm_mode(classifier, "train")
    layers = gated_layers(adafilter(classifier, train_batchnorm=False))
    assert not any(layer.train_batchnorm for layer in layers)
    assert {w.name for layer in layers for w in layer.trainable_weights} == {"kernel"}


def _gate_gradients_at_initialisation(**kwargs):
    classifier = _classifier()
    _randomise_batchnorm(classifier)
    set_batchnorm_mode(classifier, "frozen")  # the finetune app's default
    model = adafilter(classifier, **kwargs)
    x, y = _images(8), np.arange(8) % 3
    controller = gate_controller(model)
    with tf.GradientTape() as tape:
        loss = keras.losses.sparse_categorical_crossentropy(y, model(x, training=True))
    grads = tape.gradient(loss, controller.trainable_weights)
    return {w.path: np.abs(np.asarray(g)).max() for w, g in zip(controller.trainable_weights, grads)}


def test_gate_gradient_is_nonzero_at_initialisation_with_a_frozen_batchnorm_run():
    # Both paths start from the same weights: with the fine-tuned path's batch
    # norm frozen too they compute the same function and the gates get no
    # gradient at all; the trained (batch-statistics) batch norm separates them
    # from the first step.
    grads = _gate_gradients_at_initialisation()
    output_kernels = [g for path, g in grads.items() if "output_kernel" in path]
    assert all(g > 0 for g in output_kernels), grads
    frozen = _gate_gradients_at_initialisation(train_batchnorm=False)
    assert all(g == 0 for g in frozen.values()), frozen


def test_first_gate_reads_pretrained_features_not_the_pooled_image():
    classifier = _classifier()
    _randomise_batchnorm(classifier)
    # Images with the same mean brightness and different contrast: their
    # pooled inputs are equal, their pretrained features are not.
    rng = np.random.default_rng(0)
    pattern = rng.choice([-1.0, 1.0], (8, 16, 16, 1))
    pattern -= pattern.mean(axis=(1, 2, 3), keepdims=True)
    x = (128.0 + np.linspace(0, 120, 8)[:, None, None, None] * pattern).astype("float32")
    for first, distinct in (("input", False), ("features", True)):
        model = adafilter(classifier, first_gate_input=first)
        controller = gate_controller(model)
        assert controller.input_channels[0] == (4 if first == "features" else 1)
        differ = []
        for seed in range(5):
            _scramble_gates(model, seed=seed)
            gates = np.asarray(_probe(model)(x)[0])
            differ.append(np.abs(gates - gates[:1]).sum() > 0)
        assert any(differ) is distinct, differ
    probe_layers = [layer for layer in model.layers if layer.name.startswith("gate_controller_probe")]
    assert probe_layers and not any(layer.trainable_weights for layer in probe_layers)
    # The probe is the pretrained first layer: conv, batch norm (folded), ReLU.
    expected = keras.Model(classifier.input, classifier.get_layer("block1_relu").output)(x)
    probe = keras.Model(model.input, model.get_layer("gate_controller_probe_relu").output)
    np.testing.assert_allclose(probe(x), expected, rtol=1e-5, atol=1e-5)
    # Still the original function at initialisation.
    np.testing.assert_allclose(model(x), classifier(x), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="Received: first_gate_input='pixels'"):
        adafilter(classifier, first_gate_input="pixels")


def test_straight_through_gradients_reach_the_gate_network():
    classifier = _classifier()
    set_batchnorm_mode(classifier, "frozen")
    model = adafilter(classifier)
    _perturb_finetuned(model)
    x, y = _images(8), np.arange(8) % 3
    controller = gate_controller(model)
    frozen = {id(layer.pretrained_kernel) for layer in gated_layers(model)}
    assert not frozen & {id(w) for w in model.trainable_weights}
    with tf.GradientTape() as tape:
        loss = keras.losses.sparse_categorical_crossentropy(y, model(x, training=True))
    grads = tape.gradient(loss, controller.trainable_weights)
    for w, g in zip(controller.trainable_weights, grads):
        assert g is not None and np.all(np.isfinite(g)), w.path
        assert np.abs(g).max() > 0, w.path

    before = {w.path: w.numpy().copy() for w in model.weights}
    model.compile(keras.optimizers.Adam(1e-2), "sparse_categorical_crossentropy")
    model.fit(x, y, epochs=2, batch_size=8, verbose=0)
    moved = {w.path for w in model.weights if not np.array_equal(w.numpy(), before[w.path])}
    for layer in gated_layers(model):
        assert layer.kernel.path in moved
        assert not {w.path for w in layer.weights if w.name.startswith("pretrained_")} & moved
    assert {w.path for w in controller.trainable_weights} <= moved


def test_gumbel_model_is_stochastic_in_training_and_deterministic_at_inference():
    model = adafilter(_classifier(), estimator="gumbel", temperature=0.5, seed=1)
    probe = _probe(model)
    x = _images(16)
    a = np.concatenate([np.asarray(g) for g in probe(x, training=True)], axis=1)
    b = np.concatenate([np.asarray(g) for g in probe(x, training=True)], axis=1)
    assert np.abs(a - b).sum() > 0
    c = [np.asarray(g) for g in probe(x)]
    for g, h in zip(c, probe(x)):
        np.testing.assert_array_equal(g, h)


def test_config_keras_file_and_saved_model_round_trips(tmp_path):
    classifier = _classifier()
    _randomise_batchnorm(classifier)
    model = adafilter(classifier, estimator="gumbel", usage_target=0.3, seed=0)
    _scramble_gates(model)
    _perturb_finetuned(model)
    x = _images(4)
    expected = np.asarray(model(x))

    clone = keras.Model.from_config(model.get_config())
    clone.set_weights(model.get_weights())
    np.testing.assert_array_equal(clone(x), expected)

    path = str(tmp_path / "adafilter.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    np.testing.assert_array_equal(loaded(x), expected)
    assert gate_controller(loaded).get_config() == gate_controller(model).get_config()
    loaded.compile("adam", "sparse_categorical_crossentropy")
    logs = loaded.evaluate(x, np.zeros(4), return_dict=True, verbose=0)
    assert logs["gate_usage"] == pytest.approx(gate_usage(model, x)["overall"], abs=1e-6)

    export = export_saved_model(model, str(tmp_path / "saved"), class_names=["a", "b", "c"])
    served = tf.saved_model.load(export)
    images = x.astype("uint8")
    first = served.serve(tf.constant(images))["probabilities"].numpy()
    np.testing.assert_allclose(first, model(images.astype("float32")), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(served.serve(tf.constant(images))["probabilities"], first)


def test_fit_under_mirrored_strategy_logs_gate_usage():
    strategy = distribute.get_strategy("mirrored")
    assert strategy.num_replicas_in_sync == 2
    x, y = _images(32), np.arange(32) % 3
    with strategy.scope():
        classifier = _classifier()
        set_batchnorm_mode(classifier, "train")
        model = adafilter(classifier, usage_target=0.5)
        model.compile(keras.optimizers.Adam(1e-2), "sparse_categorical_crossentropy")
    mean = gated_layers(model)[0].moving_mean.numpy().copy()
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(16)
    history = model.fit(ds, validation_data=ds, epochs=1, shuffle=False, verbose=0)
    keys = {"gate_usage", "gate_usage_block1_conv", "gate_usage_block2_conv"}
    assert keys | {f"val_{k}" for k in keys} <= set(history.history)
    assert not np.array_equal(gated_layers(model)[0].moving_mean.numpy(), mean)
    # Validation usage, summed over both replicas, is that of all images.
    first, second = (np.asarray(g) for g in _probe(model)(x))
    overall = (first.sum() + second.sum()) / (first.size + second.size)
    assert history.history["val_gate_usage"][-1] == pytest.approx(overall, abs=1e-6)
    assert history.history["val_gate_usage_block2_conv"][-1] == pytest.approx(
        second.mean(), abs=1e-6
    )


def test_separable_convolutions_are_gated_per_output_channel():
    # Xception / NASNet style: strided separable convs with batch norms, a
    # separable conv first (the first gate's probe folds its batch norm).
    inputs = keras.Input((12, 12, 3), name="x")
    x = keras.layers.SeparableConv2D(4, 3, strides=2, padding="same", use_bias=False, name="sep1")(
        inputs
    )
    x = keras.layers.BatchNormalization(name="sep1_bn")(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.SeparableConv2D(
        6, 3, depth_multiplier=2, padding="same", activation="relu", name="sep2"
    )(x)
    x = keras.layers.Conv2D(5, 1, name="conv")(x)
    model = keras.Model(inputs, keras.layers.GlobalAveragePooling2D()(x))
    _randomise_batchnorm(model)
    images = _images(4, size=12, channels=3)
    expected = np.asarray(model(images))
    gated = adafilter(model)
    assert [(type(layer).__name__, layer.name) for layer in gated_layers(gated)] == [
        ("GatedSeparableConv", "sep1"),
        ("GatedSeparableConv", "sep2"),
        ("GatedConv", "conv"),
    ]
    assert "sep1_bn" not in [layer.name for layer in gated.layers]  # absorbed
    _scramble_gates(gated)
    gates = np.concatenate([np.ravel(g) for g in _probe(gated)(images)])
    assert 0 < gates.mean() < 1  # some gates open, some closed
    np.testing.assert_allclose(gated(images), expected, rtol=1e-4, atol=1e-4)
    # Moving the fine-tuned (depthwise and pointwise) filters changes exactly
    # the output channels whose gates are open.
    sep2 = gated.get_layer("sep2")
    sep2.pointwise_kernel.assign(sep2.pointwise_kernel.numpy() + 0.5)
    features = keras.Model(gated.input, sep2.input[0])(images)
    g = np.random.default_rng(3).integers(0, 2, (4, 6)).astype("float32")
    after = np.asarray(sep2(features, g))
    before = np.asarray(keras.Model(model.input, model.get_layer("sep2").output)(images))
    moved = np.abs(after - before).max(axis=(1, 2)) > 1e-6
    assert 0 < g.mean() < 1
    np.testing.assert_array_equal(moved, g > 0.5)
