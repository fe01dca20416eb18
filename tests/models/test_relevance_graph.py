"""Relevance on the graphs Keras 3 builds: operation nodes, nested models, one pass."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_seltransfer import distribute
from keras_seltransfer import relevance
from keras_seltransfer.models import surgery
from keras_seltransfer.models.relevance import EAGER_BATCHES
from keras_seltransfer.models.response_points import response_tensors


def _hard_swish_model():
    """1x1 convs joined by operation nodes (`+`, `*`, `/`, `keras.ops.relu6`),
    as MobileNetV3 builds its hard-swish: none of them is a layer."""
    inputs = keras.Input((5, 5, 2), name="image")
    a = keras.layers.Conv2D(3, 1, name="conv_a")(inputs)
    a = keras.layers.BatchNormalization(epsilon=1e-3, name="bn_a")(a)
    a = a * keras.ops.relu6(a + 3.0) / 6.0
    b = keras.layers.Conv2D(2, 1, name="conv_b")(a)
    b = keras.layers.ReLU(name="relu_b")(b)
    c = keras.layers.Conv2D(2, 1, name="conv_c")(b + 1.0)
    outputs = keras.layers.GlobalAveragePooling2D(name="pool")(c * 2.0)
    return keras.Model(inputs, outputs, name="hard_swish")


def _hard_swish_weights(seed=0):
    rng = np.random.default_rng(seed)
    return {
        "conv_a": [rng.normal(0, 0.8, (1, 1, 2, 3)), rng.normal(0, 0.3, 3)],
        "bn_a": [
            rng.uniform(0.5, 1.5, 3),
            rng.normal(0, 0.3, 3),
            rng.normal(0, 0.3, 3),
            rng.uniform(0.5, 2.0, 3),
        ],
        "conv_b": [rng.normal(0, 0.8, (1, 1, 3, 2)), rng.normal(0, 0.3, 2)],
        "conv_c": [rng.normal(0, 0.8, (1, 1, 2, 2)), rng.normal(0, 0.3, 2)],
    }


def _assign(model, weights):
    for name, values in weights.items():
        model.get_layer(name).set_weights([np.asarray(v, np.float32) for v in values])
    return model


def _reference(x, w):
    """NumPy float64 forward pass of `_hard_swish_model`: each conv's response."""

    def conv(v, name):
        kernel, bias = w[name]
        return np.einsum("bhwc,co->bhwo", v, kernel[0, 0]) + bias

    gamma, beta, mean, var = w["bn_a"]
    a = gamma * (conv(x.astype(np.float64), "conv_a") - mean) / np.sqrt(var + 1e-3) + beta
    swish = a * np.clip(a + 3.0, 0.0, 6.0) / 6.0
    b = np.maximum(conv(swish, "conv_b"), 0.0)
    c = conv(b + 1.0, "conv_c")
    return {"conv_a": a, "conv_b": b, "conv_c": c}


def _images(n, shape=(5, 5, 2), seed=1):
    return np.random.default_rng(seed).normal(0, 1.5, (n, *shape)).astype(np.float32)


def _unknown_length(images, batch):
    """A data set of `images` whose cardinality tf.data does not know."""
    return tf.data.Dataset.from_tensor_slices(images).filter(lambda x: True).batch(batch)


def test_operation_nodes_end_chains_and_statistics_match_numpy():
    model = _assign(_hard_swish_model(), _hard_swish_weights())
    # The BN feeds `a + 3` and `a * ...`, operations that are not layers.
    assert relevance.response_chains(model) == {
        "conv_a": ["conv_a", "bn_a"],
        "conv_b": ["conv_b", "relu_b"],
        "conv_c": ["conv_c"],
    }
    with pytest.raises(ValueError, match="not a Conv2D"):
        relevance.conv_layer_names(model, ["add"])
    images = _images(9)
    expected = _reference(images, _hard_swish_weights())
    responses = relevance.FilterResponses(model)
    for name, computed in zip(responses.layers, responses(images)):
        np.testing.assert_allclose(computed, expected[name], rtol=1e-5, atol=1e-5)
    data = tf.data.Dataset.from_tensor_slices(images).batch(4)
    means = relevance.filter_statistics(responses, data, "mean")
    frequencies = relevance.filter_statistics(responses, data, "frequency")
    for name, r in expected.items():
        np.testing.assert_allclose(means[name], r.mean(axis=(0, 1, 2)), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(frequencies[name], (r > 0).mean(axis=(0, 1, 2)), atol=1e-12)


def test_eager_and_traced_passes_agree_with_numpy_and_across_replicas():
    weights = _hard_swish_weights(2)
    images = _images(11, seed=3)
    expected = _reference(images, weights)
    single = relevance.FilterResponses(_assign(_hard_swish_model(), weights))
    strategy = distribute.get_strategy("mirrored")
    with strategy.scope():
        mirrored = relevance.FilterResponses(_assign(_hard_swish_model(), weights))
    assert strategy.num_replicas_in_sync == 2
    short = tf.data.Dataset.from_tensor_slices(images).batch(3)  # 4 batches: eager
    assert int(short.cardinality()) <= EAGER_BATCHES
    for statistic, reference in (("mean", np.mean), ("frequency", lambda r, axis: np.mean(r > 0, axis))):
        eager = relevance.filter_statistics(single, short, statistic)
        traced = relevance.filter_statistics(single, _unknown_length(images, 3), statistic)
        distributed = relevance.filter_statistics(mirrored, _unknown_length(images, 4), statistic)
        for name, r in expected.items():
            value = reference(r, axis=(0, 1, 2))
            for computed in (eager[name], traced[name], distributed[name]):
                np.testing.assert_allclose(computed, value, rtol=1e-5, atol=1e-6)
    # The traced pass is kept: a second call does not trace again.
    functions = dict(single._functions)
    relevance.filter_statistics(single, _unknown_length(images, 3), "mean")
    assert single._functions == functions


def test_each_statistic_reads_the_data_a_fixed_number_of_times():
    model = _assign(_hard_swish_model(), _hard_swish_weights(4))
    images = _images(12, seed=5)
    reads = {"data": 0, "source_data": 0}

    def counted(which, x):
        def generator():
            reads[which] += 1
            for start in range(0, len(x), 4):
                yield x[start : start + 4]

        spec = tf.TensorSpec((None, *x.shape[1:]), tf.float32)
        return tf.data.Dataset.from_generator(generator, output_signature=spec)

    responses = relevance.FilterResponses(model)
    relevance.filter_statistics(responses, counted("data", images), "mean")
    assert reads == {"data": 1, "source_data": 0}
    reads["data"] = 0
    relevance.filter_statistics(
        responses,
        counted("data", images),
        "kl",
        source_data=counted("source_data", images[::-1] * 2.0),
        num_bins=4,
    )
    assert reads == {"data": 3, "source_data": 1}


def _small_stack(name):
    inputs = keras.Input((6, 6, 1), name=f"{name}_input")
    x = keras.layers.Conv2D(3, 3, padding="same", name=f"{name}_conv")(inputs)
    x = keras.layers.BatchNormalization(name=f"{name}_bn")(x)
    x = keras.layers.ReLU(name=f"{name}_relu")(x)
    x = keras.layers.Conv2D(2, 1, activation="relu", name=f"{name}_head")(x)
    return keras.Model(inputs, x, name=name)


def test_nested_functional_model_is_read_inside():
    inner = _small_stack("inner")
    rng = np.random.default_rng(6)
    for layer in inner.layers:
        layer.set_weights([rng.normal(0, 0.5, w.shape).astype(np.float32) ** 2 for w in layer.get_weights()])
    inputs = keras.Input((6, 6, 1), name="image")
    outer = keras.Model(inputs, keras.layers.GlobalAveragePooling2D()(inner(inputs)), name="outer")
    images = _images(5, (6, 6, 1), seed=7)
    nested = relevance.FilterResponses(outer)
    direct = relevance.FilterResponses(inner)
    assert nested.layers == direct.layers == ["inner_conv", "inner_head"]
    assert nested.points == {"inner_conv": "inner_relu", "inner_head": "inner_head"}
    for a, b in zip(nested(images), direct(images)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
        # Per layer, from the inner model's own graph: an independent reader.
    reader = keras.Model(inner.input, inner.get_layer("inner_relu").output)
    np.testing.assert_allclose(nested(images)[0], reader(images), rtol=1e-6, atol=1e-6)


def test_nested_sequential_block_is_read_inside():
    block = keras.Sequential(
        [
            keras.layers.Conv2D(3, 3, padding="same", name="block_conv"),
            keras.layers.BatchNormalization(name="block_bn"),
            keras.layers.ReLU(name="block_relu"),
        ],
        name="block",
    )
    inputs = keras.Input((6, 6, 1), name="image")
    x = block(inputs)
    x = keras.layers.Conv2D(2, 1, name="top_conv")(x)
    model = keras.Model(inputs, x, name="with_block")
    try:
        surgery.flatten(model)
    except ValueError as e:
        pytest.skip(f"surgery.flatten does not inline Sequential sub-models here: {e}")
    assert relevance.response_points(model) == {"block_conv": "block_relu", "top_conv": "top_conv"}
    images = _images(4, (6, 6, 1), seed=8)
    responses = relevance.FilterResponses(model)
    np.testing.assert_allclose(responses(images)[0], block(images), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(responses(images)[1], model(images), rtol=1e-6, atol=1e-6)


def test_mobilenet_v3_responses_match_per_layer_readers():
    model = keras.applications.MobileNetV3Small(
        weights=None, include_top=False, input_shape=(32, 32, 3)
    )
    inputs, tensors = response_tensors(model)
    points = relevance.response_points(model)
    assert list(tensors) == list(points) == relevance.conv_layer_names(model)
    # The squeeze-excite's second conv feeds `x + 3` (its hard sigmoid).
    assert points["expanded_conv_squeeze_excite_conv_1"] == "expanded_conv_squeeze_excite_conv_1"
    images = np.random.default_rng(9).uniform(0, 255, (2, 32, 32, 3)).astype(np.float32)
    responses = relevance.FilterResponses(model)
    computed = dict(zip(responses.layers, responses(images)))
    for conv in list(points)[:: max(1, len(points) // 6)]:
        reader = keras.Model(model.input, model.get_layer(points[conv]).output)
        np.testing.assert_allclose(computed[conv], reader(images), rtol=1e-4, atol=1e-4)
