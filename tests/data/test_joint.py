"""The joint source/target pipeline: batch composition, sampling rule, state."""

import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from keras_seltransfer import data as data_lib
from keras_seltransfer.data.joint import joint_steps_per_epoch
from keras_seltransfer.data.joint import make_joint_dataset
from keras_seltransfer.data.joint_sampler import capped_shares
from keras_seltransfer.data.joint_sampler import JointSampler
from keras_seltransfer.data.joint_variants import make_sampler
from keras_seltransfer.data.joint_variants import random_lists
from keras_seltransfer.data.joint_variants import random_pool

NUM_TARGETS = 12
NUM_SOURCE = 200
SIZE = 4


def _constant_images(values, size=SIZE):
    """Images whose every pixel holds their id, so a batch tells what it holds."""
    values = np.asarray(values)
    return np.broadcast_to(values[:, None, None, None], (len(values), size, size, 1)).astype(np.uint8)


def _target():
    # Ids 200..211: never confused with source ids 0..199.
    ids = 200 + np.arange(NUM_TARGETS)
    return data_lib.from_numpy(_constant_images(ids), np.arange(NUM_TARGETS) % 2)


def _source():
    return data_lib.from_numpy(_constant_images(np.arange(NUM_SOURCE)), np.arange(NUM_SOURCE) % 7)


def _neighbours(k=10, seed=0):
    rng = np.random.default_rng(seed)
    # Each target's neighbours come from its own part of the source set.
    return np.stack([rng.permutation(np.arange(16 * i, 16 * i + 16))[:k] for i in range(NUM_TARGETS)])


def _batches(dataset):
    out = []
    for images, labels, weights in dataset:
        out.append(
            (
                images.numpy()[:, 0, 0, 0].round().astype(int),
                {k: v.numpy() for k, v in labels.items()},
                {k: v.numpy() for k, v in weights.items()},
            )
        )
    return out


def test_batch_composition_is_exact():
    target, source = _target(), _source()
    ids = _neighbours()
    sampler = JointSampler.from_neighbours(ids, source.labels, k0=3)
    ds = make_joint_dataset(target, source, sampler, SIZE, 8, augment="none")
    batches = _batches(ds)
    assert len(batches) == joint_steps_per_epoch(NUM_TARGETS, 8) == 3
    compact = {c: i for i, c in enumerate(sampler.source_classes)}
    for values, labels, weights in batches:
        targets, sources = values[:4] - 200, values[4:]
        assert np.all((targets >= 0) & (targets < NUM_TARGETS))
        for t, s in zip(targets, sources):
            # Each source image is one of the first K_i = 3 neighbours of its target.
            assert s in ids[t, :3], (t, s)
        np.testing.assert_array_equal(labels["target"][:4], target.labels[targets])
        np.testing.assert_array_equal(
            labels["source"][4:], [compact[int(c)] for c in source.labels[sources]]
        )
        np.testing.assert_array_equal(weights["target"], [2, 2, 2, 2, 0, 0, 0, 0])
        np.testing.assert_array_equal(weights["source"], [0, 0, 0, 0, 2, 2, 2, 2])
    # Equal weights: one shuffled pass over the targets (12 draws, 12 targets).
    drawn = np.concatenate([b[0][:4] for b in batches]) - 200
    np.testing.assert_array_equal(np.sort(drawn), np.arange(NUM_TARGETS))


def test_source_labels_are_reindexed_over_selected_classes():
    source = _source()
    ids = np.array([[7, 14], [21, 0]])  # labels 0, 0, 0, 0 -> one class
    sampler = JointSampler.from_neighbours(ids, source.labels, k0=1)
    assert sampler.num_source_classes == 1
    np.testing.assert_array_equal(sampler.source_classes, [0])
    ids = np.array([[3, 5], [6, 3]])  # labels 3, 5, 6
    sampler = JointSampler.from_neighbours(ids, source.labels, k0=1)
    np.testing.assert_array_equal(sampler.source_classes, [3, 5, 6])
    np.testing.assert_array_equal(sampler.candidate_ids, [3, 5, 6])
    np.testing.assert_array_equal(sampler.candidate_labels, [0, 1, 2])


def test_draw_follows_counts_and_never_leaves_the_lists():
    ids = _neighbours(k=10)
    sampler = JointSampler.from_neighbours(ids, _source().labels, k0=2)
    counts = np.array([2, 10, 2, 4, 2, 2, 6, 2, 2, 2, 8, 2])
    sampler.set_neighbour_counts(counts)
    num_draws = 1000
    targets, positions = sampler.draw(num_draws, tf.constant(3, tf.int64))
    targets, positions = targets.numpy(), positions.numpy()
    # Systematic allocation: each target gets floor or ceil of its share.
    expected = num_draws * counts / counts.sum()
    drawn = np.bincount(targets, minlength=NUM_TARGETS)
    assert np.all(np.abs(drawn - expected) < 1.0), (drawn, expected)
    sources = sampler.candidate_ids[positions]
    for t in range(NUM_TARGETS):
        chosen = sources[targets == t]
        assert set(chosen) <= set(ids[t, : counts[t]])
        # Every one of the first K_i neighbours is used (about 40+ draws each).
        assert set(chosen) == set(ids[t, : counts[t]])


def test_draws_are_deterministic_per_epoch():
    sampler = JointSampler.from_neighbours(_neighbours(), _source().labels, k0=5, seed=3)
    a = [x.numpy() for x in sampler.draw(24, tf.constant(0, tf.int64))]
    b = [x.numpy() for x in sampler.draw(24, tf.constant(0, tf.int64))]
    c = [x.numpy() for x in sampler.draw(24, tf.constant(1, tf.int64))]
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])
    other = JointSampler.from_neighbours(_neighbours(), _source().labels, k0=5, seed=4)
    d = [x.numpy() for x in other.draw(24, tf.constant(0, tf.int64))]
    assert not np.array_equal(a[0], d[0])


def test_epochs_differ_and_the_callback_sets_the_epoch():
    target, source = _target(), _source()
    sampler = JointSampler.from_neighbours(_neighbours(), source.labels, k0=5)
    ds = make_joint_dataset(target, source, sampler, SIZE, 8)
    sampler.on_epoch_begin(4)
    first = _batches(ds)
    sampler.on_epoch_begin(4)
    again = _batches(ds)
    sampler.on_epoch_begin(5)
    other = _batches(ds)
    for (x, _, _), (y, _, _) in zip(first, again):
        np.testing.assert_array_equal(x, y)
    assert any(not np.array_equal(x, y) for (x, _, _), (y, _, _) in zip(first, other))


def test_without_the_callback_each_iteration_is_a_new_epoch():
    target, source = _target(), _source()
    sampler = JointSampler.from_neighbours(_neighbours(), source.labels, k0=5)
    ds = make_joint_dataset(target, source, sampler, SIZE, 8, augment="none")
    one, two = _batches(ds), _batches(ds)
    assert any(not np.array_equal(x, y) for (x, _, _), (y, _, _) in zip(one, two))


def test_augmentation_flips_both_halves_reproducibly():
    rng = np.random.default_rng(0)
    target = data_lib.from_numpy(rng.integers(0, 255, (8, 6, 6, 1), dtype=np.uint8), np.arange(8) % 2)
    source = data_lib.from_numpy(rng.integers(0, 255, (30, 6, 6, 1), dtype=np.uint8), np.arange(30) % 3)
    ids = np.stack([rng.permutation(30)[:5] for _ in range(8)])
    sampler = JointSampler.from_neighbours(ids, source.labels, k0=5)
    plain = make_joint_dataset(target, source, sampler, 6, 8, augment="none")
    flipped = make_joint_dataset(target, source, sampler, 6, 8, augment="flip")
    sampler.on_epoch_begin(0)
    a = [x.numpy() for x, _, _ in plain]
    sampler.on_epoch_begin(0)
    b = [x.numpy() for x, _, _ in flipped]
    n_flipped = 0
    for x, y in zip(a, b):
        for image, out in zip(x, y):
            is_same = np.array_equal(image, out)
            assert is_same or np.array_equal(image[:, ::-1], out)
            n_flipped += not is_same
    assert 0 < n_flipped < 16


def test_growth_changes_what_the_pipeline_samples_without_retracing():
    """A callback grows the lists after epoch 1; `fit` then trains on the longer
    lists, with the same traced training step."""
    target, source = _target(), _source()
    ids = _neighbours(k=16)
    sampler = JointSampler.from_neighbours(ids, source.labels, k0=2)
    ds = make_joint_dataset(target, source, sampler, SIZE, 8, augment="none")
    seen = []

    class Recorder(keras.Model):
        traces = 0

        def train_step(self, data):
            type(self).traces += 1  # Python side effect: runs once per trace.
            x = data[0]
            tf.py_function(lambda v: seen.append(v.numpy()[:, 0, 0, 0].round()), [x], [])
            return super().train_step(data)

    from keras_seltransfer.models import build_multitask_model

    inputs = keras.Input((SIZE, SIZE, 1))
    features = keras.layers.GlobalAveragePooling2D()(keras.layers.Rescaling(1 / 255)(inputs))
    base = keras.Model(inputs, keras.layers.Dense(4)(features))
    multi = build_multitask_model(base, sampler.num_source_classes, 2)
    model = Recorder(
        multi.inputs,
        {name: multi.get_layer(f"{name}_head").output for name in ("target", "source")},
    )
    from keras_seltransfer.models import joint_compile_args

    model.compile("sgd", **joint_compile_args())

    traces_after = []

    class GrowAfterFirstEpoch(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            traces_after.append(Recorder.traces)
            if epoch == 0:
                sampler.set_neighbour_counts(np.full(NUM_TARGETS, 16))

    model.fit(ds, epochs=2, callbacks=[sampler, GrowAfterFirstEpoch()], shuffle=False, verbose=0)
    steps = joint_steps_per_epoch(NUM_TARGETS, 8)
    assert len(seen) == 2 * steps
    # Keras traces the step when it first runs (and may trace it once more
    # while building); the second epoch, on grown lists, traces nothing new.
    assert traces_after[0] >= 1 and traces_after[1] == traces_after[0]
    position = {int(s): i for t in range(NUM_TARGETS) for i, s in enumerate(ids[t])}
    epoch0 = np.concatenate([b[4:] for b in seen[:steps]]).astype(int)
    epoch1 = np.concatenate([b[4:] for b in seen[steps:]]).astype(int)
    assert max(position[s] for s in epoch0) < 2
    assert max(position[s] for s in epoch1) >= 2


def test_mirrored_replicas_get_half_and_half_batches_of_the_same_draws():
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    target, source = _target(), _source()
    sampler = JointSampler.from_neighbours(_neighbours(), source.labels, k0=4)
    plain = make_joint_dataset(target, source, sampler, SIZE, 8, augment="none")
    sampler.on_epoch_begin(0)
    plain_batches = _batches(plain)
    distributed = make_joint_dataset(target, source, sampler, SIZE, 8, strategy=strategy, augment="none")
    sampler.on_epoch_begin(0)
    steps = 0
    for (x, labels, _), (values, _, _) in zip(distributed, plain_batches):
        replicas = [r.numpy()[:, 0, 0, 0].round().astype(int) for r in strategy.experimental_local_results(x)]
        assert [len(r) for r in replicas] == [4, 4]
        for r, local in enumerate(replicas):
            assert np.all(local[:2] >= 200) and np.all(local[2:] < 200)
            # The global batch's draws are split between the replicas in order.
            np.testing.assert_array_equal(local[:2], values[2 * r : 2 * r + 2])
            np.testing.assert_array_equal(local[2:], values[4 + 2 * r : 6 + 2 * r])
        steps += 1
    assert steps == 3


def test_fit_under_mirrored_strategy():
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    target, source = _target(), _source()
    sampler = JointSampler.from_neighbours(_neighbours(), source.labels, k0=4)
    from keras_seltransfer.models import build_multitask_model
    from keras_seltransfer.models import joint_compile_args
    from keras_seltransfer.models import small_cnn

    with strategy.scope():
        model = build_multitask_model(small_cnn((8, 8, 1), widths=(4, 4)), sampler.num_source_classes, 2)
        model.compile(keras.optimizers.Adam(1e-2), **joint_compile_args())
    ds = make_joint_dataset(target, source, sampler, 8, 8, strategy=strategy)
    val = data_lib.joint_validation_dataset(target, 8, 8)
    batches = []

    class Count(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            batches.append(0)

        def on_train_batch_end(self, batch, logs=None):
            batches[-1] += 1

    with warnings.catch_warnings():
        # Keras learns a distributed dataset's length when its first epoch
        # ends, and says so with this warning (see make_joint_dataset).
        warnings.filterwarnings("ignore", message="Your input ran out of data")
        history = model.fit(
            ds, epochs=2, validation_data=val, callbacks=[sampler, Count()], shuffle=False, verbose=0
        )
    assert batches == [3, 3]
    assert np.all(np.isfinite(history.history["loss"]))
    assert "val_target_crossentropy" in history.history


def test_on_disk_source_reads_only_the_candidates(tmp_path):
    target = _target()
    paths, labels = [], []
    candidates = {3, 20, 41, 77}
    for i in range(100):
        path = tmp_path / f"{i}.png"
        if i in candidates:
            Image.fromarray(np.full((9, 9), i, np.uint8)).save(path)
        else:
            path.write_bytes(b"not an image")  # would fail if ever read
        paths.append(str(path))
        labels.append(i % 3)
    source = data_lib.ImageSource(
        labels=np.array(labels), class_names=("a", "b", "c"), channels=1, paths=np.array(paths)
    )
    ids = np.array([sorted(candidates)] * NUM_TARGETS)
    sampler = JointSampler.from_neighbours(ids, source.labels, k0=4)
    ds = make_joint_dataset(target, source, sampler, SIZE, 8, augment="none")
    seen = set()
    for values, _, _ in _batches(ds):
        seen.update(int(v) for v in values[4:])
    assert seen <= candidates and len(seen) > 1


def test_pool_variants():
    source = _source()
    ids = _neighbours(k=10)
    everything = make_sampler("all", ids, source.labels, k0=2)
    np.testing.assert_array_equal(everything.candidate_ids, np.arange(NUM_SOURCE))
    assert not everything.uses_neighbours
    random = make_sampler("random", ids, source.labels, k0=2, k_max=6, seed=1)
    assert len(random.candidate_ids) == len(np.unique(ids[:, :6]))
    assert not np.array_equal(random.candidate_ids, np.unique(ids[:, :6]))
    selected = make_sampler("selected_nogrowth", ids, source.labels, k0=2, k_max=6)
    assert selected.k_max == 6 and selected.k0 == 2
    ds = make_joint_dataset(_target(), source, random, SIZE, 8, augment="none")
    drawn = np.concatenate([b[0][4:] for b in _batches(ds)])
    assert set(drawn) <= set(random.candidate_ids)
    np.testing.assert_array_equal(random_pool(10, 10), np.arange(10))


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: JointSampler.from_neighbours(np.array([[0, 500]]), np.zeros(10, int), k0=1), "positions in the source set"),
        (lambda: JointSampler.from_neighbours(np.array([[0, 1]]), np.zeros(10, int), k0=3), "exceeds the neighbours"),
        (lambda: JointSampler.from_neighbours(np.array([0, 1]), np.zeros(10, int), k0=1), "2-D integer array"),
        (lambda: make_sampler("nearest", np.array([[0, 1]]), np.zeros(10, int), k0=1), "variant"),
        (lambda: random_pool(5, 6), "Cannot choose 6 of 5"),
        (lambda: random_lists(np.arange(3), 2, 4), "pool of 3"),
        (
            lambda: JointSampler.from_neighbours(
                np.array([[0, 1]]), np.zeros(10, int), k0=1, target_draws="proportional"
            ),
            "target_draws",
        ),
    ],
)
def test_sampler_errors(build, message):
    with pytest.raises(ValueError, match=message):
        build()


def test_dataset_errors():
    target, source = _target(), _source()
    sampler = JointSampler.from_neighbours(_neighbours(), source.labels, k0=2)
    with pytest.raises(ValueError, match="multiple of 2 x replicas"):
        make_joint_dataset(target, source, sampler, SIZE, 7)
    with pytest.raises(ValueError, match="12 target rows but the target set has 5"):
        make_joint_dataset(target.subset(np.arange(5)), source, sampler, SIZE, 8)
    with pytest.raises(ValueError, match="source set has 10 images"):
        make_joint_dataset(target, source.subset(np.arange(10)), sampler, SIZE, 8)
    with pytest.raises(ValueError, match=r"values in \[1, 10\]"):
        sampler.set_neighbour_counts(np.full(NUM_TARGETS, 11))
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    with pytest.raises(ValueError, match="multiple of 2 x replicas"):
        make_joint_dataset(target, source, sampler, SIZE, 6, strategy=strategy)
    with strategy.scope(), pytest.raises(ValueError, match="outside `strategy.scope"):
        JointSampler.from_neighbours(_neighbours(), source.labels, k0=2)
    with strategy.scope(), pytest.raises(ValueError, match="outside `strategy.scope"):
        make_joint_dataset(target, source, sampler, SIZE, 8, strategy=strategy)
    pool = make_sampler("all", _neighbours(), source.labels, k0=2)
    with pytest.raises(ValueError, match="no neighbour lists"):
        pool.get_neighbour_counts()


def test_resize_and_channels_match_the_plain_pipeline():
    rng = np.random.default_rng(0)
    target = data_lib.from_numpy(rng.integers(0, 255, (4, 10, 10, 1), dtype=np.uint8), np.arange(4) % 2)
    source = data_lib.from_numpy(rng.integers(0, 255, (6, 7, 7, 3), dtype=np.uint8), np.arange(6) % 2)
    ids = np.array([[0, 1], [2, 3], [4, 5], [1, 0]])
    sampler = JointSampler.from_neighbours(ids, source.labels, k0=2)
    ds = make_joint_dataset(target, source, sampler, 12, 4, augment="none", channels=1)
    plain_source = np.concatenate(
        [x.numpy() for x, _ in data_lib.make_dataset(source, 12, 6, channels=1)]
    )
    plain_target = np.concatenate(
        [x.numpy() for x, _ in data_lib.make_dataset(target, 12, 4, channels=1)]
    )
    for images, _, _ in ds:
        images = images.numpy()
        assert images.shape == (4, 12, 12, 1)
        for image in images[:2]:
            assert min(np.abs(plain_target - image).max(axis=(1, 2, 3))) < 1e-4
        for image in images[2:]:
            assert min(np.abs(plain_source - image).max(axis=(1, 2, 3))) < 1e-3


def _water_filling(weights, total, cap):
    """NumPy reference of `capped_shares`: saturate, re-share, repeat."""
    weights = np.asarray(weights, np.float64)
    saturated = np.zeros(len(weights), bool)
    while True:
        free = np.where(saturated, 0.0, weights)
        shares = np.where(saturated, cap, (total - cap * saturated.sum()) * free / free.sum())
        grown = saturated | (shares > cap)
        if (grown == saturated).all():
            return np.minimum(shares, cap)
        saturated = grown


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_capped_shares_match_a_numpy_reference(seed):
    rng = np.random.default_rng(seed)
    weights = rng.choice([1.0, 1.0, 1.0, 3.0, 10.0, 20.0], size=50)
    total, cap = 120, 4
    shares = capped_shares(weights, total, cap).numpy()
    np.testing.assert_allclose(shares, _water_filling(weights, total, cap), rtol=1e-12)
    assert shares.sum() == pytest.approx(total) and shares.max() <= cap
    # Below the cap, shares stay proportional to the weights.
    free = shares < cap
    np.testing.assert_allclose(shares[free] / weights[free], (shares[free] / weights[free])[0])
    # Nothing to cap: plain proportional shares.
    np.testing.assert_allclose(capped_shares(weights, 10, cap).numpy(), 10 * weights / weights.sum())


def _elpv_sized_sampler(max_level):
    """A sampler shaped like the app's defaults on ELPV at 15%: 236 targets,
    k0 10, an index of 200 neighbours, batch 32 (240 draws per epoch)."""
    rng = np.random.default_rng(0)
    ids = np.stack([rng.permutation(3000)[:200] for _ in range(236)])
    return make_sampler(
        "selected", ids, rng.integers(0, 10, 3000), k0=10, k_max=200, max_level=max_level
    )


def test_capped_sampler_never_draws_a_target_more_than_max_level_times():
    sampler = _elpv_sized_sampler(max_level=10)
    assert sampler.k_max == 100  # lists stop at max_level * k0, as in the authors' code
    num_draws = joint_steps_per_epoch(236, 32) * 16
    # One image grown to the top (the growth rule's worst case), a few half-way.
    counts = np.full(236, 10)
    counts[0], counts[1:4] = sampler.k_max, 50
    sampler.set_neighbour_counts(counts)
    for epoch in range(5):
        draws = sampler.repetition_counts(num_draws, epoch)
        assert draws.sum() == num_draws
        assert draws.max() <= 10, draws.max()
    # Without the cap (the behaviour before max_level) that image's list
    # reaches all 200 neighbours and it takes 18 of the epoch's 240 draws.
    uncapped = _elpv_sized_sampler(max_level=None)
    assert uncapped.k_max == 200
    counts[0] = 200
    uncapped.set_neighbour_counts(counts)
    assert uncapped.repetition_counts(num_draws, 0).max() > 10


def test_capped_sampler_candidates_and_growth_stop_at_the_cap():
    source = _source()
    ids = _neighbours(k=10)
    sampler = JointSampler.from_neighbours(ids, source.labels, k0=2, max_level=3)
    assert sampler.k_max == 6
    # Only the neighbours a capped list can reach are candidates.
    np.testing.assert_array_equal(sampler.candidate_ids, np.unique(ids[:, :6]))
    with pytest.raises(ValueError, match=r"values in \[1, 6\]"):
        sampler.set_neighbour_counts(np.full(NUM_TARGETS, 7))
    # An epoch that needs more draws than targets x max_level is refused.
    small = JointSampler.from_neighbours(ids, source.labels, k0=1, max_level=1)
    with pytest.raises(ValueError, match="raise `max_level`"):
        make_joint_dataset(_target(), source, small, SIZE, 32)
    with pytest.raises(ValueError, match="pool sampler has no levels"):
        JointSampler(np.arange(5), np.zeros(5, int), 3, max_level=2)


def test_uniform_target_draws_grow_lists_without_repeating_hard_targets():
    # The control separating growth from repetition: with the same grown
    # lists, "neighbours" draws a grown target in proportion to K_i,
    # "uniform" draws every target once per pass.
    ids = _neighbours(k=16)
    labels = _source().labels
    counts = np.full(NUM_TARGETS, 2)
    counts[0] = 16
    num_draws = 4 * NUM_TARGETS
    draws = {}
    for mode in ("neighbours", "uniform"):
        sampler = make_sampler("selected", ids, labels, k0=2, seed=3, target_draws=mode)
        sampler.set_neighbour_counts(counts)
        draws[mode] = sampler.repetition_counts(num_draws)
        assert draws[mode].sum() == num_draws
    expected = num_draws * counts / counts.sum()
    assert np.all(np.abs(draws["neighbours"] - expected) < 1)
    np.testing.assert_array_equal(draws["uniform"], np.full(NUM_TARGETS, 4))
    # The grown list still reaches all 16 neighbours under uniform draws.
    sampler = make_sampler("selected", ids, labels, k0=2, seed=3, target_draws="uniform")
    sampler.set_neighbour_counts(counts)
    reached = set()
    for epoch in range(40):
        targets, positions = sampler.draw(num_draws, np.int64(epoch))
        reached.update(
            int(sampler.candidate_ids[p]) for t, p in zip(targets.numpy(), positions.numpy()) if t == 0
        )
    assert reached == set(ids[0].tolist())


def test_random_neighbour_lists_match_the_selected_ones_in_shape_and_pool_size():
    ids = _neighbours(k=10)
    labels = _source().labels
    selected = make_sampler("selected", ids, labels, k0=2, k_max=8, seed=1)
    control = make_sampler("random_neighbours", ids, labels, k0=2, k_max=8, seed=1)
    pool = make_sampler("random", ids, labels, k0=2, k_max=8, seed=1)
    assert control.uses_neighbours and control.k0 == 2 and control.k_max == selected.k_max == 8
    # Drawn from the random pool of the "random" ablation, not from the selected lists.
    assert set(control.candidate_ids) <= set(pool.candidate_ids)
    assert not set(control.candidate_ids) <= set(np.unique(ids[:, :8]))
    # Every list holds distinct images; growth works as for the selected lists.
    lists = control.candidate_ids[control.neighbours]
    assert all(len(set(row)) == 8 for row in lists)
    control.set_neighbour_counts(np.full(NUM_TARGETS, 8))
    np.testing.assert_array_equal(control.get_neighbour_counts(), np.full(NUM_TARGETS, 8))
    np.testing.assert_array_equal(
        random_lists(np.array([7, 3, 5]), 4, 3, seed=0).tolist(),
        random_lists(np.array([3, 5, 7]), 4, 3, seed=0).tolist(),
    )
