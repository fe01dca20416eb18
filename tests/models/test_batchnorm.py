import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_seltransfer import data as data_lib
from keras_seltransfer.models import backbones
from keras_seltransfer.models import batchnorm_layers
from keras_seltransfer.models import build_classifier
from keras_seltransfer.models import recalibrate_batchnorm
from keras_seltransfer.models import set_batchnorm_mode


def _model(channels=2):
    inputs = keras.Input((8, 8, channels))
    x = keras.layers.Conv2D(3, 3, padding="same", name="conv1")(inputs)
    x = keras.layers.BatchNormalization(name="bn1")(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.Conv2D(4, 3, strides=2, padding="same", name="conv2")(x)
    x = keras.layers.BatchNormalization(name="bn2")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(2, activation="softmax")(x)
    return keras.Model(inputs, outputs)


def _images(n, seed=0):
    return np.random.default_rng(seed).normal(3.0, 2.0, (n, 8, 8, 2)).astype("float32")


def _stats(features):
    features = np.asarray(features, np.float64)
    return features.mean(axis=(0, 1, 2)), features.var(axis=(0, 1, 2))


def test_first_layer_statistics_are_those_of_all_images_whatever_the_batches():
    model = _model()
    images = _images(23)
    set_batchnorm_mode(model, "frozen")
    assert recalibrate_batchnorm(model, images, batch_size=5) == 2  # 5 batches, the last of 3
    conv1 = keras.Model(model.inputs, model.get_layer("conv1").output)
    mean, var = _stats(conv1.predict(images, verbose=0))
    bn1 = model.get_layer("bn1")
    np.testing.assert_allclose(bn1.moving_mean.numpy(), mean, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(bn1.moving_variance.numpy(), var, rtol=1e-4, atol=1e-5)


def test_one_batch_gives_the_statistics_of_the_recalibrated_network():
    model = _model()
    images = _images(16, seed=1)
    recalibrate_batchnorm(model, images, batch_size=16)
    # bn2's input, computed in inference mode with the recalibrated bn1.
    conv2 = keras.Model(model.inputs, model.get_layer("conv2").output)
    mean, var = _stats(conv2.predict(images, verbose=0))
    bn2 = model.get_layer("bn2")
    np.testing.assert_allclose(bn2.moving_mean.numpy(), mean, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(bn2.moving_variance.numpy(), var, rtol=1e-4, atol=1e-5)


def test_weights_flags_and_momentum_are_kept():
    model = _model()
    set_batchnorm_mode(model, "frozen")
    model.get_layer("bn2").momentum = 0.9
    trainable = [w.numpy().copy() for w in model.weights if "moving" not in w.path]
    recalibrate_batchnorm(model, _images(10))
    after = [w.numpy() for w in model.weights if "moving" not in w.path]
    for a, b in zip(trainable, after):
        np.testing.assert_array_equal(a, b)
    assert [layer.trainable for layer in batchnorm_layers(model)] == [False, False]
    assert model.get_layer("bn1").momentum == 0.99
    assert model.get_layer("bn2").momentum == 0.9


def test_dataset_of_tuples_and_max_images_and_nested_models():
    backbone = backbones.small_cnn((16, 16, 1), widths=(4, 8))
    inputs = keras.Input((16, 16, 1))
    nested = keras.Model(inputs, keras.layers.Dense(2)(backbone(inputs)))
    images = np.random.default_rng(2).uniform(0, 255, (12, 16, 16, 1)).astype("float32")
    ds = tf.data.Dataset.from_tensor_slices((images, np.zeros(12, "int32"))).batch(4)
    assert recalibrate_batchnorm(nested, ds, max_images=6) == len(batchnorm_layers(backbone))
    first = batchnorm_layers(backbone)[0]
    # Only the first 6 images count (a batch of 4 and 2 of the next).
    conv = backbone.layers[[layer.name for layer in backbone.layers].index(first.name) - 1]
    probe = keras.Model(backbone.inputs, conv.output)
    mean, _ = _stats(probe.predict(images[:6], verbose=0))
    np.testing.assert_allclose(first.moving_mean.numpy(), mean, rtol=1e-4, atol=1e-4)


def test_restores_old_statistics_when_the_pass_fails():
    model = _model()
    before = model.get_layer("bn1").moving_mean.numpy().copy()

    def broken():
        yield _images(4)
        raise RuntimeError("disk gone")

    ds = tf.data.Dataset.from_generator(
        broken, output_signature=tf.TensorSpec((None, 8, 8, 2), tf.float32)
    )
    with pytest.raises(Exception, match="disk gone"):
        recalibrate_batchnorm(model, ds)
    np.testing.assert_array_equal(model.get_layer("bn1").moving_mean.numpy(), before)
    assert model.get_layer("bn1").momentum == 0.99


def test_under_mirrored_strategy_matches_one_device():
    images = _images(12, seed=3)
    model = _model()
    weights = model.get_weights()
    recalibrate_batchnorm(model, images, batch_size=12)
    expected = model.get_layer("bn2").moving_variance.numpy()
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    with strategy.scope():
        mirrored = _model()
        mirrored.set_weights(weights)
        recalibrate_batchnorm(mirrored, images, batch_size=12)
    np.testing.assert_allclose(
        mirrored.get_layer("bn2").moving_variance.numpy(), expected, rtol=1e-5, atol=1e-6
    )


def test_errors():
    model = _model()
    with pytest.raises(ValueError, match="batch_size"):
        recalibrate_batchnorm(model, _images(2), batch_size=0)
    with pytest.raises(ValueError, match="max_images"):
        recalibrate_batchnorm(model, _images(2), max_images=0)
    with pytest.raises(ValueError, match=r"shape \(8, 8\)"):
        recalibrate_batchnorm(model, np.zeros((8, 8)))
    with pytest.raises(ValueError, match="type list"):
        recalibrate_batchnorm(model, [1, 2])
    with pytest.raises(ValueError, match="no images"):
        recalibrate_batchnorm(model, np.zeros((0, 8, 8, 2), "float32"))
    plain = build_classifier(
        keras.Sequential([keras.Input((4, 4, 1)), keras.layers.Flatten()]), 2
    )
    with pytest.warns(UserWarning, match="no BatchNormalization"):
        assert recalibrate_batchnorm(plain, np.zeros((2, 4, 4, 1), "float32")) == 0


def test_make_dataset_pipeline_is_accepted():
    source = data_lib.from_numpy(
        np.random.default_rng(4).integers(0, 255, (6, 8, 8, 1), dtype=np.uint8),
        np.array([0, 1, 0, 1, 0, 1]),
    )
    model = _model(channels=1)
    ds = data_lib.make_dataset(source, 8, 4)
    assert recalibrate_batchnorm(model, ds) == 2
