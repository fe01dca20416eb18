"""Selective filter transfer: re-initialisation, masks, folding and export."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_seltransfer import relevance as relevance_lib
from keras_seltransfer.export import export_saved_model
from keras_seltransfer.layers.filter_mask import FilterMask
from keras_seltransfer.layers.partially_frozen_batch_normalization import (
    PartiallyFrozenBatchNormalization,
)
from keras_seltransfer.models import build_classifier
from keras_seltransfer.models import filter_masking as fm
from keras_seltransfer.models import filter_reinit as fr
from keras_seltransfer.models import filter_transfer as ft
from keras_seltransfer.models import load_backbone
from keras_seltransfer.models import set_batchnorm_mode
from keras_seltransfer.models import small_cnn

# block1_conv keeps filters 0 and 2, block2_conv keeps 4..7 (ratio 0.5).
RELEVANCE = {"block1_conv": np.array([4.0, 1.0, 3.0, 2.0]), "block2_conv": np.arange(8.0)}
KEPT = {name: relevance_lib.select_top_fraction(s, 0.5) for name, s in RELEVANCE.items()}


def _pretrained(seed=0):
    """A small_cnn classifier whose BatchNorm layers hold non-trivial
    statistics, as a trained network's do."""
    model = build_classifier(small_cnn((16, 16, 1), widths=(4, 8)), 3)
    rng = np.random.default_rng(seed)
    for name, n in (("block1_bn", 4), ("block2_bn", 8)):
        gamma, beta = rng.uniform(0.5, 2, n), rng.normal(0, 0.5, n)
        mean, variance = rng.normal(0, 0.5, n), rng.uniform(0.5, 2, n)
        model.get_layer(name).set_weights([gamma, beta, mean, variance])
    return model


def _images(n=6, size=16, channels=1, seed=1):
    rng = np.random.default_rng(seed)
    return rng.uniform(0, 255, (n, size, size, channels)).astype(np.float32)


def _data(x, batch=4):
    return tf.data.Dataset.from_tensor_slices(x).batch(batch)


def _weights(model):
    return {w.path: np.asarray(w.numpy()) for w in model.weights}


def _moments(model, conv_name, x):
    """Float64 mean and population variance of a conv output channel."""
    y = keras.Model(model.inputs[0], model.get_layer(conv_name).output).predict(x, verbose=0)
    y = y.astype(np.float64).reshape(-1, y.shape[-1])
    return y.mean(axis=0), y.var(axis=0)


@pytest.mark.parametrize("reinit_next", [False, True])
def test_reinitialisation_touches_exactly_the_unselected_filters(reinit_next):
    pretrained = _pretrained()
    before = _weights(pretrained)
    x = _images()
    model = ft.selective_filter_transfer(
        pretrained, _data(x), ratio=0.5, relevance=RELEVANCE, reinit_next=reinit_next, seed=3
    )
    after = _weights(model)
    assert _weights(pretrained).keys() == before.keys()  # the original is not changed
    for path in before:
        np.testing.assert_array_equal(_weights(pretrained)[path], before[path])
    new_paths = {p for p in after if "filter_mask" in p}
    assert new_paths == {
        f"block{i}_conv_filter_mask/{w}" for i in (1, 2) for w in ("mask", "transferred")
    }
    expected_changed = {}
    r1, r2 = ~KEPT["block1_conv"], ~KEPT["block2_conv"]
    k1 = np.zeros((3, 3, 1, 4), bool)
    k1[..., r1] = True
    expected_changed["block1_conv/kernel"] = k1
    k2 = np.zeros((3, 3, 4, 8), bool)
    k2[..., r2] = True
    if reinit_next:
        k2[:, :, r1, :] = True
    expected_changed["block2_conv/kernel"] = k2
    head = np.zeros((8, 3), bool)
    if reinit_next:
        head[r2, :] = True
    expected_changed["target_head/kernel"] = head
    for i, r in ((1, r1), (2, r2)):
        for w in ("gamma", "beta", "moving_mean", "moving_variance"):
            expected_changed[f"block{i}_bn/{w}"] = r
    for path, value in before.items():
        changed = expected_changed.get(path, np.zeros(value.shape, bool))
        np.testing.assert_array_equal(after[path][~changed], value[~changed], err_msg=path)
        assert np.all(after[path][changed] != value[changed]), path

    # Fresh values come from the layers' own initializers.
    bound = np.sqrt(6.0 / (9 * 1 + 9 * 4))  # glorot_uniform of block1_conv
    assert np.abs(after["block1_conv/kernel"][..., r1]).max() <= bound
    for i, r in ((1, r1), (2, r2)):
        np.testing.assert_array_equal(after[f"block{i}_bn/gamma"][r], 1.0)
        np.testing.assert_array_equal(after[f"block{i}_bn/beta"][r], 0.0)
        # Moving statistics: the new conv outputs' moments on the target images.
        mean, variance = _moments(model, f"block{i}_conv", x)
        np.testing.assert_allclose(
            after[f"block{i}_bn/moving_mean"][r], mean[r], rtol=1e-4, atol=1e-5
        )
        np.testing.assert_allclose(
            after[f"block{i}_bn/moving_variance"][r], variance[r], rtol=1e-3, atol=1e-5
        )
    # The masks record what was transferred and prune nothing.
    masks = fm.filter_masks(model)
    for name, kept in KEPT.items():
        np.testing.assert_array_equal(masks[name].transferred.numpy(), kept)
        np.testing.assert_array_equal(masks[name].mask.numpy(), 1.0)
    assert ft.filter_transfer_summary(model) == {
        "block1_conv": {"filters": 4, "transferred": 2, "reinitialized": 2, "masked": 0},
        "block2_conv": {"filters": 8, "transferred": 4, "reinitialized": 4, "masked": 0},
    }


def test_relevance_chooses_what_is_transferred_and_seed_reproduces():
    pretrained = _pretrained()
    data = _data(_images())
    expected = relevance_lib.filter_relevance(pretrained, data, "frequency")
    models = [
        ft.selective_filter_transfer(
            pretrained, data, ratio=0.25, statistic="frequency", seed=7,
            bn_statistics="initializer",
        )
        for _ in range(2)
    ]
    for name, mask in fm.filter_masks(models[0]).items():
        np.testing.assert_array_equal(
            mask.transferred.numpy(), relevance_lib.select_top_fraction(expected[name], 0.25)
        )
        reinit = mask.transferred.numpy() == 0
        bn = models[0].get_layer(name.replace("conv", "bn"))
        np.testing.assert_array_equal(bn.moving_variance.numpy()[reinit], 1.0)
    for a, b in zip(models[0].weights, models[1].weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def _branched():
    """conv -> BN -> ReLU feeding a grouped conv and a depthwise conv that
    meet in an Add: grouped and depthwise slices, a walk stopped by a merge."""
    inputs = keras.Input((8, 8, 2), name="image")
    a = keras.layers.Conv2D(4, 3, padding="same", name="a")(inputs)
    a = keras.layers.BatchNormalization(name="a_bn")(a)
    a = keras.layers.ReLU(name="a_relu")(a)
    g = keras.layers.Conv2D(4, 3, padding="same", groups=2, name="g")(a)
    d = keras.layers.DepthwiseConv2D(3, padding="same", depth_multiplier=2, name="d")(a)
    d = keras.layers.Conv2D(4, 1, name="d_proj")(d)
    s = keras.layers.Add(name="add")([g, d])
    out = keras.layers.Dense(2, name="head")(keras.layers.GlobalAveragePooling2D()(s))
    return keras.Model(inputs, out)


def test_grouped_and_depthwise_slices_and_walk_stops_at_merges():
    original = _branched()
    rng = np.random.default_rng(0)
    for w in original.weights:
        # Pretrained-like values, none equal to what the initializers draw.
        w.assign(rng.uniform(0.5, 1.5, w.shape).astype(np.float32))
    model = fm.add_filter_masks(original)
    assert set(fm.filter_masks(model)) == {"a", "g", "d", "d_proj"}
    np.testing.assert_array_equal(model(_images(2, 8, 2)), original(_images(2, 8, 2)))
    following, stopped = fm.next_layers(model, "a")
    assert sorted(following) == ["d", "g"] and stopped == []
    assert fm.next_layers(model, "g") == ([], ["add"])
    before = _weights(model)
    chosen = {
        "a": np.array([False, True, False, True]),
        "d": np.array([True, False, False, False, False, False, False, True]),
    }
    summary = fr.reinitialize_filters(
        model, chosen, seed=0, reinit_next=True, bn_statistics="initializer"
    )
    assert summary["a"]["reinitialized"] == 2 and sorted(summary["a"]["next_layers"]) == ["d", "g"]
    assert summary["d"] == {"reinitialized": 2, "next_layers": ["d_proj"]}
    after = _weights(model)
    changed = {name: np.zeros(v.shape, bool) for name, v in before.items()}
    changed["a/kernel"][..., [1, 3]] = True
    changed["a/bias"][[1, 3]] = True
    for w in ("gamma", "beta", "moving_mean", "moving_variance"):
        changed[f"a_bn/{w}"][[1, 3]] = True
    # Grouped conv, 2 groups of 2 inputs: input 1 is entry 1 of group 0
    # (outputs 0-1), input 3 entry 1 of group 1 (outputs 2-3).
    changed["g/kernel"][:, :, 1, 0:2] = True
    changed["g/kernel"][:, :, 1, 2:4] = True
    # Depthwise, multiplier 2: inputs 1 and 3 (as next layer), outputs 0 = (0, 0)
    # and 7 = (3, 1) (its own filters), and their biases.
    changed["d/kernel"][:, :, [1, 3], :] = True
    changed["d/kernel"][:, :, 0, 0] = True
    changed["d/kernel"][:, :, 3, 1] = True
    changed["d/bias"][[0, 7]] = True
    changed["d_proj/kernel"][:, :, [0, 7], :] = True
    changed["a_filter_mask/transferred"][[1, 3]] = True
    changed["d_filter_mask/transferred"][[0, 7]] = True
    for path, value in before.items():
        np.testing.assert_array_equal(after[path][~changed[path]], value[~changed[path]], path)
        assert np.all(after[path][changed[path]] != value[changed[path]]), path


def test_folded_and_kept_masks_serve_identically(tmp_path):
    x = _images()
    model = ft.selective_filter_transfer(_pretrained(), _data(x), ratio=0.5, relevance=RELEVANCE)
    masks = fm.filter_masks(model)
    masks["block1_conv"].mask.assign([1.0, 0.0, 1.0, 1.0])
    masks["block2_conv"].mask.assign([0.0, 1.0, 1.0, 0.0, 1.0, 1.0, 1.0, 0.0])
    # The masked channels are exactly zero.
    mask_out = keras.Model(model.inputs[0], model.get_layer("block1_conv_filter_mask").output)(x)
    assert np.all(np.asarray(mask_out)[..., 1] == 0)
    assert isinstance(model.get_layer("block1_bn"), PartiallyFrozenBatchNormalization)
    ft.set_reinitialized_batchnorm(model, "channels")
    folded = fm.fold_filter_masks(model)
    assert not any(isinstance(layer, FilterMask) for layer in folded.layers)
    # Per-channel freezing only matters in training: the fold serves plain BN.
    assert type(folded.get_layer("block1_bn")) is keras.layers.BatchNormalization
    assert len(folded.layers) == len(model.layers) - 2
    np.testing.assert_array_equal(folded(x), model(x))
    np.testing.assert_array_equal(folded.get_layer("block1_bn").gamma.numpy()[1], 0.0)

    path = str(tmp_path / "model.keras")
    model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    np.testing.assert_array_equal(loaded(x), model(x))
    assert ft.filter_transfer_summary(loaded) == ft.filter_transfer_summary(model)
    assert ft.filter_transfer_summary(loaded)["block2_conv"]["masked"] == 3

    images = np.random.default_rng(5).integers(0, 256, (3, 16, 16, 1)).astype(np.uint8)
    expected = np.asarray(loaded(images.astype(np.float32)))
    for kind, exported in (("kept", model), ("folded", folded)):
        served = tf.saved_model.load(export_saved_model(exported, str(tmp_path / kind)))
        probabilities = served.serve(tf.constant(images))["probabilities"]
        np.testing.assert_allclose(probabilities, expected, rtol=1e-5, atol=1e-6, err_msg=kind)


def test_fold_refuses_what_it_cannot_fold_exactly():
    inputs = keras.Input((4, 4, 1))
    x = keras.layers.Conv2D(2, 1, activation="sigmoid", name="c")(inputs)
    model = fm.add_filter_masks(keras.Model(inputs, x))
    fm.filter_masks(model)["c"].mask.assign([1.0, 0.0])
    with pytest.raises(ValueError, match="value at 0"):
        fm.fold_filter_masks(model)
    fm.filter_masks(model)["c"].mask.assign([1.0, 0.5])
    with pytest.raises(ValueError, match="positively homogeneous"):
        fm.fold_filter_masks(model)
    fm.filter_masks(model)["c"].mask.assign([1.0, -1.0])
    with pytest.raises(ValueError, match="negative"):
        fm.fold_filter_masks(model)
    # Through a ReLU any non-negative mask folds.
    relu = keras.Model(inputs, keras.layers.ReLU()(keras.layers.Conv2D(2, 1, name="c")(inputs)))
    masked = fm.add_filter_masks(relu)
    fm.filter_masks(masked)["c"].mask.assign([0.5, 0.0])
    x = _images(2, 4, 1)
    np.testing.assert_allclose(fm.fold_filter_masks(masked)(x), masked(x), rtol=1e-6)


def test_errors_are_clear():
    model, data = _pretrained(), _data(_images())
    with pytest.raises(ValueError, match=r"`ratio` must be a number in \[0, 1\]"):
        ft.selective_filter_transfer(model, data, ratio=1.5)
    with pytest.raises(ValueError, match="`statistic` must be one of"):
        ft.selective_filter_transfer(model, data, statistic="median")
    with pytest.raises(ValueError, match="source_data=None"):
        ft.selective_filter_transfer(model, data, statistic="kl")
    with pytest.raises(ValueError, match="at least one image"):
        ft.selective_filter_transfer(model, _data(_images()[:0]))
    with pytest.raises(ValueError, match="must score exactly the layers"):
        ft.selective_filter_transfer(model, data, relevance={"block1_conv": np.ones(4)})
    with pytest.raises(ValueError, match=r"must have shape \(8,\)"):
        ft.selective_filter_transfer(
            model, data, relevance={"block1_conv": np.ones(4), "block2_conv": np.ones(3)}
        )
    with pytest.raises(ValueError, match="`bn_statistics` must be one of"):
        ft.selective_filter_transfer(model, data, bn_statistics="source")
    masked = fm.add_filter_masks(model)
    with pytest.raises(ValueError, match=r"`mode` must be one of .*Received: mode='train'"):
        ft.set_reinitialized_batchnorm(masked, "train")
    plain = _pretrained()
    inputs = keras.Input((4, 4, 1))
    x = keras.layers.BatchNormalization(name="bn")(keras.layers.Conv2D(2, 1, name="c")(inputs))
    plain = keras.Model(inputs, FilterMask(name="c_filter_mask")(keras.layers.ReLU()(x)))
    with pytest.raises(ValueError, match="cannot: rebuild the model with `add_filter_masks`"):
        ft.set_reinitialized_batchnorm(plain, "channels")
    with pytest.raises(ValueError, match="pass them as `data`"):
        fr.reinitialize_filters(masked, {"block1_conv": np.ones(4, bool)}, bn_statistics="target")
    with pytest.raises(ValueError, match=r"bool array of shape \(4,\)"):
        fr.reinitialize_filters(masked, {"block1_conv": np.ones(3, bool)})


def _fine_tune(mode, x, steps=6):
    """A small_cnn transferred on `x` / 255 * 4 (moving statistics of the
    re-initialised channels estimated on those images), fine-tuned on them
    for a few full-batch steps with frozen BatchNorm and `mode` for the
    re-initialised channels; BatchNorm momentum 0, so moving statistics are
    those of the last batch seen."""
    x = x / 255.0 * 4
    model = ft.selective_filter_transfer(
        _pretrained(), _data(x), ratio=0.5, relevance=RELEVANCE, seed=3
    )
    set_batchnorm_mode(model, "frozen")
    training = ft.set_reinitialized_batchnorm(model, mode)
    for name in ("block1_bn", "block2_bn"):
        model.get_layer(name).momentum = 0.0
    initial = _weights(model)
    model.compile(keras.optimizers.SGD(0.5), "sparse_categorical_crossentropy")
    labels = np.arange(len(x)) % 3
    model.fit(x, labels, epochs=steps, batch_size=len(x), verbose=0)
    # One more training-mode pass: the statistics of the final weights.
    model(x, training=True)
    return model, initial, training


@pytest.mark.parametrize("mode", ["channels", "layer"])
def test_reinitialized_batchnorm_trains_and_tracks_its_filters(mode):
    x = _images(8)
    model, initial, training = _fine_tune(mode, x)
    after = _weights(model)
    if mode == "channels":
        assert training == {"block1_bn": 2, "block2_bn": 4}
    else:
        assert training == {"block1_bn": 4, "block2_bn": 8}
    for i in (1, 2):
        reinit = ~KEPT[f"block{i}_conv"]
        moved = reinit if mode == "channels" else np.ones_like(reinit)
        # The kernels trained, so estimates made at initialisation are stale...
        assert np.all(after[f"block{i}_conv/kernel"][..., reinit] != initial[f"block{i}_conv/kernel"][..., reinit])
        # ...but the moving statistics are the final filters' batch statistics
        # (a float64 NumPy reduction of the conv outputs).
        mean, variance = _moments(model, f"block{i}_conv", x / 255.0 * 4)
        np.testing.assert_allclose(
            after[f"block{i}_bn/moving_mean"][moved], mean[moved], rtol=1e-3, atol=1e-4
        )
        np.testing.assert_allclose(
            after[f"block{i}_bn/moving_variance"][moved], variance[moved], rtol=1e-3, atol=1e-4
        )
        for w in ("gamma", "beta"):
            assert np.all(after[f"block{i}_bn/{w}"][moved] != initial[f"block{i}_bn/{w}"][moved])
        # Transferred channels keep every pretrained BatchNorm value ("channels").
        for w in ("gamma", "beta", "moving_mean", "moving_variance"):
            np.testing.assert_array_equal(
                after[f"block{i}_bn/{w}"][~moved], initial[f"block{i}_bn/{w}"][~moved]
            )


def test_frozen_reinitialized_batchnorm_goes_stale():
    """The behaviour before `reinit_batchnorm`: the statistics estimated at
    initialisation no longer describe the trained filters."""
    x = _images(8)
    model, initial, training = _fine_tune("frozen", x)
    assert training == {"block1_bn": 0, "block2_bn": 0}
    after = _weights(model)
    for i in (1, 2):
        for w in ("gamma", "beta", "moving_mean", "moving_variance"):
            np.testing.assert_array_equal(after[f"block{i}_bn/{w}"], initial[f"block{i}_bn/{w}"])
    # Six steps move block2's new kernels by about their own size: the
    # channels' actual means are then far off, in moving standard deviations.
    mean, _ = _moments(model, "block2_conv", x / 255.0 * 4)
    reinit = ~KEPT["block2_conv"]
    gap = np.abs(mean - after["block2_bn/moving_mean"]) / np.sqrt(
        after["block2_bn/moving_variance"] + 1e-3
    )
    assert gap[reinit].max() > 0.5


def test_batchnorm_statistics_gap_matches_numpy():
    x = _images(8)
    model, _, _ = _fine_tune("frozen", x)
    gaps = ft.batchnorm_statistics_gap(model, _data(x / 255.0 * 4, 3))
    assert sorted(gaps) == ["block1_conv", "block2_conv"]
    for i in (1, 2):
        bn = model.get_layer(f"block{i}_bn")
        mean, variance = _moments(model, f"block{i}_conv", x / 255.0 * 4)
        m, v = bn.moving_mean.numpy().astype(np.float64), bn.moving_variance.numpy()
        eps = bn.epsilon
        mean_gap = np.abs(mean - m) / np.sqrt(v + eps)
        ratio = np.abs(np.log((variance + eps) / (v + eps)))
        kept = KEPT[f"block{i}_conv"]
        entry = gaps[f"block{i}_conv"]
        assert entry["batchnorm"] == f"block{i}_bn"
        for key, chosen in (("transferred", kept), ("reinitialized", ~kept)):
            assert entry[key]["channels"] == int(chosen.sum())
            np.testing.assert_allclose(entry[key]["mean_gap"], np.median(mean_gap[chosen]), rtol=1e-4)
            np.testing.assert_allclose(
                entry[key]["log_variance_ratio"], np.median(ratio[chosen]), rtol=1e-3, atol=1e-6
            )
    # After a pass that makes every statistic current, the gap is ~0.
    current, _, _ = _fine_tune("layer", x)
    for entry in ft.batchnorm_statistics_gap(current, _data(x / 255.0 * 4)).values():
        assert entry["reinitialized"]["mean_gap"] < 1e-3
        assert entry["reinitialized"]["log_variance_ratio"] < 1e-3


@pytest.mark.slow
def test_keras_application_backbone():
    classifier = build_classifier(load_backbone("mobilenetv2", (32, 32, 3)), 2)
    x = _images(4, 32, 3)
    model = ft.selective_filter_transfer(
        classifier, _data(x, 2), ratio=0.5, statistic="frequency", reinit_next=True, seed=0
    )
    summary = ft.filter_transfer_summary(model)
    assert len(summary) == len(relevance_lib.conv_layer_names(classifier)) == 52
    assert all(v["transferred"] == -(-v["filters"] // 2) for v in summary.values())
    assert np.isfinite(np.asarray(model(x))).all()
    for name in ("block_1_project", "block_16_project"):
        fm.filter_masks(model)[name].mask.assign(
            np.arange(summary[name]["filters"]) % 3 != 0
        )
    np.testing.assert_allclose(fm.fold_filter_masks(model)(x), model(x), rtol=1e-5, atol=1e-6)
