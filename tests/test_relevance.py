"""Filter relevance statistics and the pure selection rules."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_seltransfer import distribute
from keras_seltransfer import relevance
from keras_seltransfer.models import build_classifier
from keras_seltransfer.models import small_cnn
from keras_seltransfer.utils.histograms import fit_bin_edges

EPS = 2.2e-16


def _fixed_model():
    """conv -> BN -> ReLU, a conv with a fused ReLU, a depthwise conv without
    activation: the three kinds of response point."""
    inputs = keras.Input((6, 6, 2), name="image")
    x = keras.layers.Conv2D(3, 3, padding="same", name="conv_a")(inputs)
    x = keras.layers.BatchNormalization(epsilon=1e-3, name="bn_a")(x)
    x = keras.layers.ReLU(name="relu_a")(x)
    x = keras.layers.Conv2D(2, 1, activation="relu", name="conv_b")(x)
    x = keras.layers.DepthwiseConv2D(2, depth_multiplier=2, name="dw_c")(x)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    outputs = keras.layers.Dense(2, name="head")(x)
    return keras.Model(inputs, outputs, name="fixed")


def _weights(seed=0):
    rng = np.random.default_rng(seed)
    return {
        "conv_a": [rng.normal(0, 0.5, (3, 3, 2, 3)), rng.normal(0, 0.2, 3)],
        "bn_a": [
            rng.uniform(0.5, 1.5, 3),
            rng.normal(0, 0.3, 3),
            rng.normal(0, 0.3, 3),
            rng.uniform(0.5, 2.0, 3),
        ],
        # The second filter's bias kills it: a dead ReLU on every input.
        "conv_b": [rng.normal(0, 0.7, (1, 1, 3, 2)), np.array([0.1, -100.0])],
        "dw_c": [rng.normal(0, 0.5, (2, 2, 2, 2)), rng.normal(0, 0.1, 4)],
    }


def _assign(model, weights):
    for name, values in weights.items():
        model.get_layer(name).set_weights([np.asarray(v, np.float32) for v in values])
    return model


def _reference_responses(x, w):
    """NumPy float64 forward pass of `_fixed_model`, returning each conv's response."""
    x = x.astype(np.float64)
    kernel, bias = w["conv_a"]
    padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    a = np.zeros(x.shape[:3] + (3,))
    for di in range(3):
        for dj in range(3):
            a += np.einsum("bhwc,co->bhwo", padded[:, di : di + 6, dj : dj + 6], kernel[di, dj])
    a += bias
    gamma, beta, mean, var = w["bn_a"]
    a = np.maximum(gamma * (a - mean) / np.sqrt(var + 1e-3) + beta, 0.0)
    kernel, bias = w["conv_b"]
    b = np.maximum(np.einsum("bhwc,co->bhwo", a, kernel[0, 0]) + bias, 0.0)
    kernel, bias = w["dw_c"]
    c = np.zeros((x.shape[0], 5, 5, 4))
    for ch in range(2):
        for m in range(2):
            for di in range(2):
                for dj in range(2):
                    c[..., ch * 2 + m] += b[:, di : di + 5, dj : dj + 5, ch] * kernel[di, dj, ch, m]
    c += bias
    return {"conv_a": a, "conv_b": b, "dw_c": c}


def _images(n=10, seed=1, scale=1.0, shift=0.0):
    rng = np.random.default_rng(seed)
    return (rng.normal(0, 1, (n, 6, 6, 2)) * scale + shift).astype(np.float32)


def _dataset(x, batch):
    return tf.data.Dataset.from_tensor_slices(x).batch(batch)


def _numpy_kl(target_responses, source_responses, edges):
    """Per-filter symmetric KL of image-averaged histograms over `edges`."""

    def distribution(r, e):
        per_image = []
        for image in r:
            bins = np.searchsorted(e[1:-1], image.ravel(), side="right")
            per_image.append(np.bincount(bins, minlength=len(e) - 1) / image.size)
        return np.mean(per_image, axis=0)

    values = []
    for c in range(target_responses.shape[-1]):
        e = edges[c].astype(np.float32)
        p = distribution(target_responses[..., c], e)
        q = distribution(source_responses[..., c], e)
        if p.max() >= 1 - 1e-6:
            values.append(np.inf)
        else:
            values.append(0.5 * np.sum((p - q) * (np.log(p + EPS) - np.log(q + EPS))))
    return np.array(values)


def test_response_points_follow_bn_and_activation():
    model = _fixed_model()
    assert relevance.response_chains(model) == {
        "conv_a": ["conv_a", "bn_a", "relu_a"],
        "conv_b": ["conv_b"],
        "dw_c": ["dw_c"],
    }
    # A residual branch is read after its BN; a conv feeding a merge at the conv.
    inputs = keras.Input((4, 4, 2))
    a = keras.layers.Conv2D(2, 1, name="a")(inputs)
    a = keras.layers.BatchNormalization(name="a_bn")(a)
    added = keras.layers.Add(name="add")([a, inputs])
    b = keras.layers.Conv2D(2, 1, name="b")(added)
    joined = keras.layers.Concatenate(name="cat")([b, added])
    branched = keras.Model(inputs, joined)
    assert relevance.response_points(branched) == {"a": "a_bn", "b": "b"}
    assert relevance.conv_layer_names(branched, "^b$") == ["b"]
    assert relevance.conv_layer_names(branched, ["b", "a"]) == ["a", "b"]
    shared_conv = keras.layers.Conv2D(2, 1, name="shared")
    twice = keras.layers.Add()([shared_conv(inputs), shared_conv(keras.layers.ReLU()(inputs))])
    with pytest.raises(ValueError, match=r"\['shared'\] are called more than once"):
        relevance.response_chains(keras.Model(inputs, twice))


def test_statistics_match_numpy_on_a_fixed_network():
    model = _assign(_fixed_model(), _weights())
    target, source = _images(), _images(8, seed=2, scale=2.0, shift=0.5)
    expected = _reference_responses(target, _weights())
    responses = relevance.FilterResponses(model)
    computed = dict(zip(responses.layers, (np.asarray(r) for r in responses(target))))
    for name in expected:
        np.testing.assert_allclose(computed[name], expected[name], rtol=1e-5, atol=1e-5)

    data = _dataset(target, 4)
    means = relevance.filter_statistics(model, data, "mean")
    frequencies = relevance.filter_statistics(model, data, "frequency")
    for name, r in expected.items():
        np.testing.assert_allclose(means[name], r.mean(axis=(0, 1, 2)), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(frequencies[name], (r > 0).mean(axis=(0, 1, 2)), atol=1e-12)
    assert means["conv_b"][1] == 0 and frequencies["conv_b"][1] == 0

    kl = relevance.filter_statistics(
        responses, data, "kl", source_data=_dataset(source, 3), num_bins=4
    )
    edges = fit_bin_edges(responses, data, num_bins=4, progress=False)
    source_computed = [np.asarray(r) for r in responses(source)]
    start = 0
    for name, r_source in zip(responses.layers, source_computed):
        channels = r_source.shape[-1]
        reference = _numpy_kl(computed[name], r_source, edges[start : start + channels])
        np.testing.assert_allclose(kl[name], reference, rtol=1e-6, atol=1e-9)
        start += channels
    # The dead filter is constant on the target data: infinitely divergent.
    assert np.isinf(kl["conv_b"][1]) and np.isfinite(kl["conv_a"]).all()
    assert (kl["conv_a"] > 0).all()

    scores = relevance.filter_relevance(
        responses, data, "kl", source_data=_dataset(source, 3), num_bins=4
    )
    np.testing.assert_array_equal(scores["conv_a"], -kl["conv_a"])
    np.testing.assert_array_equal(
        relevance.filter_relevance(model, data, "frequency")["dw_c"], frequencies["dw_c"]
    )


def test_streaming_equals_one_shot_and_mirrored_equals_single_device():
    weights = _weights(3)
    target, source = _images(11, seed=4), _images(7, seed=5, scale=1.5)
    single = _assign(_fixed_model(), weights)
    strategy = distribute.get_strategy("mirrored")
    with strategy.scope():
        mirrored = _assign(_fixed_model(), weights)
    assert strategy.num_replicas_in_sync == 2
    single = relevance.FilterResponses(single)
    mirrored = relevance.FilterResponses(mirrored)
    for statistic in relevance.STATISTICS:
        kwargs = dict(source_data=_dataset(source, 7), num_bins=5)
        one_shot = relevance.filter_statistics(single, _dataset(target, 11), statistic, **kwargs)
        streamed = relevance.filter_statistics(single, _dataset(target, 3), statistic, **kwargs)
        # Batches of 4 over two replicas: 2 + 2, and a last batch of 3 split 2 + 1.
        distributed = relevance.filter_statistics(
            mirrored, _dataset(target, 4), statistic, source_data=_dataset(source, 2), num_bins=5
        )
        for name in one_shot:
            np.testing.assert_allclose(streamed[name], one_shot[name], rtol=1e-6, atol=1e-7)
            np.testing.assert_allclose(distributed[name], one_shot[name], rtol=1e-6, atol=1e-7)


def test_labelled_batches_and_a_small_cnn_classifier():
    model = build_classifier(small_cnn((16, 16, 1), widths=(4, 8)), 3)
    images = np.random.default_rng(0).uniform(0, 255, (6, 16, 16, 1)).astype(np.float32)
    labelled = tf.data.Dataset.from_tensor_slices((images, np.zeros(6, np.int32))).batch(4)
    means = relevance.filter_statistics(model, labelled, "mean")
    assert list(means) == ["block1_conv", "block2_conv"]
    assert means["block1_conv"].shape == (4,) and means["block2_conv"].shape == (8,)
    assert (means["block2_conv"] >= 0).all()  # post-ReLU


def test_select_top_fraction_ties_and_edges():
    np.testing.assert_array_equal(
        relevance.select_top_fraction([0.1, 0.5, 0.5, 0.2], 0.5), [False, True, True, False]
    )
    # Ties go to the lower index.
    np.testing.assert_array_equal(
        relevance.select_top_fraction([1.0, 1.0, 1.0, 0.0], 0.5), [True, True, False, False]
    )
    # ceil(ratio * n): 0.3 of 10 is exactly 3, 0.5 of 5 is 3, any positive ratio keeps one.
    assert relevance.select_top_fraction(np.arange(10.0), 0.3).sum() == 3
    np.testing.assert_array_equal(relevance.select_top_fraction(np.arange(10.0), 0.3)[7:], True)
    assert relevance.select_top_fraction(np.arange(5.0), 0.5).sum() == 3
    assert relevance.select_top_fraction(np.arange(5.0), 0.01).sum() == 1
    assert relevance.select_top_fraction(np.arange(5.0), 0).sum() == 0
    assert relevance.select_top_fraction(np.arange(5.0), 1).all()
    np.testing.assert_array_equal(
        relevance.select_top_fraction([-np.inf, 0.0, np.inf], 1 / 3), [False, False, True]
    )
    assert relevance.kept_count(7, 0.5) == 4
    np.testing.assert_array_equal(
        relevance.select_above_threshold([0.1, 0.5, 0.2], 0.2), [False, True, True]
    )
    assert not relevance.select_above_threshold([0.1, 0.2], 1.0).any()
    selected = relevance.select_filters({"a": [3.0, 1.0], "b": [0.0, 2.0, 1.0]}, ratio=0.5)
    np.testing.assert_array_equal(selected["a"], [True, False])
    np.testing.assert_array_equal(selected["b"], [False, True, True])  # ceil(1.5) = 2
    selected = relevance.select_filters({"a": [3.0, 1.0]}, threshold=2.0)
    np.testing.assert_array_equal(selected["a"], [True, False])


def test_prune_lowest_is_monotone():
    np.testing.assert_array_equal(
        relevance.prune_lowest([0.3, 0.1, 0.2, 0.4], [False, False, False, True], 0.5),
        [False, True, False, True],
    )
    # floor(fraction * n) pruned; ties prune the higher index first.
    np.testing.assert_array_equal(
        relevance.prune_lowest([1.0, 1.0, 1.0, 1.0], np.zeros(4, bool), 0.5),
        [False, False, True, True],
    )
    assert relevance.prune_lowest(np.arange(10.0), np.zeros(10, bool), 0.29).sum() == 2
    # Already pruned beyond the share: nothing changes; pruned stay pruned
    # even when the others score -inf.
    np.testing.assert_array_equal(
        relevance.prune_lowest([5.0, -np.inf, -np.inf, 9.0], [True, False, False, False], 0.25),
        [True, False, False, False],
    )
    np.testing.assert_array_equal(
        relevance.prune_lowest([5.0, 1.0, 2.0], [True, True, False], 0.0), [True, True, False]
    )
    # At least one filter survives any fraction below 1.
    assert not relevance.prune_lowest(np.arange(3.0), np.zeros(3, bool), 0.99).all()


def test_selection_errors():
    cases = [
        (lambda: relevance.select_top_fraction([1.0, np.nan], 0.5), "NaN"),
        (
            lambda: relevance.select_top_fraction([1.0, 2.0], 1.5),
            r"`ratio` must be a number in \[0, 1\]. Received: ratio=1.5",
        ),
        (lambda: relevance.select_top_fraction([[1.0]], 0.5), "1-D"),
        (lambda: relevance.select_above_threshold([1.0], float("nan")), "`threshold`"),
        (lambda: relevance.select_filters({"a": [1.0]}), "exactly one"),
        (lambda: relevance.prune_lowest([1.0, 2.0], [True], 0.5), "shape"),
        (lambda: relevance.prune_lowest([1.0, 2.0], [True, False], 1.0), r"\[0, 1\)"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message):
            call()


def test_statistic_errors_are_clear():
    model = _assign(_fixed_model(), _weights())
    data = _dataset(_images(), 5)
    with pytest.raises(ValueError, match="`statistic` must be one of"):
        relevance.filter_statistics(model, data, "variance")
    with pytest.raises(ValueError, match="source_data=None"):
        relevance.filter_statistics(model, data, "kl")
    empty = _dataset(_images()[:0], 5)
    with pytest.raises(ValueError, match="at least one image"):
        relevance.filter_statistics(model, empty, "mean")
    with pytest.raises(ValueError, match="at least one image"):
        relevance.filter_statistics(model, empty, "kl", source_data=data)
    with pytest.raises(ValueError, match="`source_data` must yield at least one image"):
        relevance.filter_statistics(model, data, "kl", source_data=empty)
    with pytest.raises(ValueError, match="tf.data.Dataset"):
        relevance.filter_statistics(model, _images(), "mean")
    with pytest.raises(ValueError, match="batch the dataset first"):
        relevance.filter_statistics(model, tf.data.Dataset.from_tensor_slices(_images()), "mean")
    with pytest.raises(ValueError, match="no layer named"):
        relevance.conv_layer_names(model, ["conv_z"])
    with pytest.raises(ValueError, match="not a Conv2D"):
        relevance.conv_layer_names(model, ["bn_a"])
    with pytest.raises(ValueError, match="no Conv2D or DepthwiseConv2D"):
        relevance.conv_layer_names(model, "nothing")
