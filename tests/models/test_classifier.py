import keras
import numpy as np
import pytest

from keras_seltransfer.models import build_classifier
from keras_seltransfer.models import set_batchnorm_mode
from keras_seltransfer.models import small_cnn


def test_classifier_outputs_probabilities_in_float32():
    model = build_classifier(small_cnn((16, 16, 1), widths=(4, 8)), 3, dropout=0.2)
    x = np.random.default_rng(0).uniform(0, 255, (5, 16, 16, 1)).astype("float32")
    p = np.asarray(model(x))
    assert p.shape == (5, 3) and p.dtype == np.float32
    np.testing.assert_allclose(p.sum(axis=1), 1.0, rtol=1e-5)
    assert model.get_layer("target_head").compute_dtype == "float32"


def test_classifier_shares_backbone_weights():
    backbone = small_cnn((16, 16, 1), widths=(4, 8))
    model = build_classifier(backbone, 2)
    assert model.get_layer("block1_conv") is backbone.get_layer("block1_conv")


def test_classifier_argument_errors():
    backbone = small_cnn((16, 16, 1), widths=(4,))
    with pytest.raises(ValueError, match="num_classes"):
        build_classifier(backbone, 1)
    with pytest.raises(ValueError, match="dropout"):
        build_classifier(backbone, 2, dropout=1.0)
    inputs = keras.Input((4, 4, 1))
    fmap = keras.Model(inputs, keras.layers.Conv2D(2, 1)(inputs))
    with pytest.raises(ValueError, match="pooled features"):
        build_classifier(fmap, 2)


def _bn_model():
    model = build_classifier(small_cnn((8, 8, 1), widths=(4,)), 2)
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="sparse_categorical_crossentropy")
    return model


def test_frozen_batchnorm_keeps_statistics_and_affine():
    model = _bn_model()
    assert set_batchnorm_mode(model, "frozen") == 1
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="sparse_categorical_crossentropy")
    bn = model.get_layer("block1_bn")
    before = [w.copy() for w in bn.get_weights()]
    conv_before = model.get_layer("block1_conv").get_weights()[0].copy()
    x = np.random.default_rng(0).uniform(0, 255, (16, 8, 8, 1)).astype("float32")
    y = np.arange(16) % 2
    model.fit(x, y, epochs=2, batch_size=8, verbose=0)
    for a, b in zip(before, bn.get_weights()):
        np.testing.assert_array_equal(a, b)
    assert not np.allclose(conv_before, model.get_layer("block1_conv").get_weights()[0])
    # Frozen BN runs in inference mode: training-mode output equals inference output.
    np.testing.assert_allclose(model(x, training=True), model(x, training=False), rtol=1e-5)


def test_trained_batchnorm_updates_statistics():
    model = _bn_model()
    set_batchnorm_mode(model, "train")
    bn = model.get_layer("block1_bn")
    mean_before = bn.moving_mean.numpy().copy()
    x = np.random.default_rng(0).uniform(0, 255, (16, 8, 8, 1)).astype("float32")
    model.fit(x, np.arange(16) % 2, epochs=1, batch_size=8, verbose=0)
    assert not np.allclose(mean_before, bn.moving_mean.numpy())


def test_bad_batchnorm_mode():
    with pytest.raises(ValueError, match="`mode` must be one of"):
        set_batchnorm_mode(_bn_model(), "moving")
