"""Selective joint fine-tuning runs (`finetune` with the sjft methods), on
tiny real data sets with real training."""

import json
import os
import re

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_seltransfer import methods
from keras_seltransfer import training
from keras_seltransfer.methods import sjft
from keras_seltransfer.training import loop
from keras_seltransfer.models.classifier import iter_layers
from keras_seltransfer.retrieval import workflow
from tests import helpers

K0 = 2
K_MAX = 5


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Data sets, a pretrained backbone and a conv-bank index shared by the
    tests that only read them (each run writes to its own output_dir)."""
    root = tmp_path_factory.mktemp("joint")
    source = "numpy:" + helpers.write_npz(
        root / "source.npz", num_per_class=40, num_classes=3, seed=4
    )
    target = "numpy:" + helpers.write_npz(root / "target.npz", num_per_class=24, seed=1)
    backbone = helpers.saved_backbone(root / "backbone.keras")
    index_dir = str(root / "index")
    # Built the way apps.build_index builds it, not by finetune.
    workflow.build_neighbours(
        workflow.IndexConfig(
            source=source,
            target=target,
            target_fraction=1.0,
            bank="conv",
            backbone=backbone,
            k_max=K_MAX,
            image_size=16,
            output_dir=index_dir,
            progress=False,
        )
    )
    return {
        "root": root,
        "source": source,
        "target": target,
        "backbone": backbone,
        "index_dir": index_dir,
    }


def _config(world, output_dir, **overrides):
    kwargs = dict(
        target=world["target"],
        source=world["source"],
        backbone=world["backbone"],
        index_dir=world["index_dir"],
        method="sjft",
        output_dir=str(output_dir),
        image_size=16,
        epochs=1,
        patience=5,
        batch_size=8,
        learning_rate=3e-2,
        k0=K0,
        k_max=K_MAX,
        growth_period=1,
        verbose=0,
        tensorboard=False,
        export=False,
    )
    kwargs.update(overrides)
    return training.FinetuneConfig(**kwargs)


def _index(index_dir):
    with np.load(os.path.join(index_dir, "neighbours.npz")) as data:
        return {k: data[k] for k in data.files}


def _selected_ids(config):
    """Distinct source ids in the first k_max columns of the neighbour lists
    of the images `config` trains on (read straight from neighbours.npz)."""
    index = _index(config.index_dir)
    _, _, train_ids, _ = training.finetune_split(config)
    rows = {int(t): i for i, t in enumerate(index["target_ids"])}
    lists = index["neighbour_ids"][[rows[int(t)] for t in train_ids], : config.k_max]
    return np.unique(lists)


def test_sjft_builds_its_index_and_writes_every_output(world, tmp_path):
    index_dir = tmp_path / "own_index"
    run = tmp_path / "run"
    # BatchNorm frozen: with ~20 steps in all, moving statistics trained from
    # the mixed batches would lag the weights and the accuracy check below
    # would measure that lag rather than learning.
    config = _config(
        world, run, index_dir=str(index_dir), epochs=3, k_max=20, export=True,
        batchnorm="frozen",
    )
    out = training.finetune(config)

    # The index was built here with the conv bank of the saved backbone.
    index = _index(index_dir)
    stored = json.loads(str(index["config"]))
    assert stored["bank"] == "conv" and stored["backbone"] == world["backbone"]
    assert stored["target_fraction"] == 1.0 and stored["k_max"] == 20
    assert index["neighbour_ids"].shape == (36, 20)  # 75% of 48 target images

    for name in (
        "config.json", "model.keras", "multitask.keras", "report.json", "report.md", "saved_model"
    ):
        assert (run / name).exists(), name
    assert not (run / "backup").exists()
    assert json.load(open(run / "config.json"))["method"] == "sjft"

    report = json.load(open(run / "report.json"))
    report.pop("written_at", None)
    assert report == json.loads(json.dumps(out["report"]))
    assert report["method"] == "sjft" and report["sampling"] == "selected"
    assert report["epochs_run"] == 3
    # The source head covers exactly the classes of the selected source images.
    selected = _selected_ids(config)
    source = workflow.source_training_images(
        workflow.IndexConfig(**{k: v for k, v in stored.items() if k != "progress"})
    )
    classes = np.unique(source.labels[selected])
    assert report["source_classes"] == [f"class{c}" for c in classes]
    assert report["source_candidates"] == len(selected)
    history = report["history"]
    for key in ("target_accuracy", "val_target_crossentropy", "neighbours_mean", "neighbours_grown"):
        assert len(history[key]) == 3, key
    counts = report["neighbour_counts"]
    assert counts["k0"] == K0 and K0 <= counts["mean"] <= counts["max"] <= 20
    # The report's counts are the sampler's state after the last epoch.
    assert counts["mean"] == pytest.approx(history["neighbours_mean"][-1])
    assert report["best_val_target_crossentropy"] == pytest.approx(
        min(history["val_target_crossentropy"])
    )
    assert report["accuracy"] >= 0.75  # brightness bands: easy to learn

    # model.keras is the target classifier alone; multitask.keras has both heads.
    model = keras.saving.load_model(str(run / "model.keras"))
    assert len(model.outputs) == 1 and tuple(model.outputs[0].shape) == (None, 2)
    multitask = keras.saving.load_model(str(run / "multitask.keras"))
    images = helpers.easy_images(4, seed=9)[0]
    x = images.astype("float32")
    joint = multitask(x, training=False)
    assert joint["source"].shape == (8, len(classes)) and joint["target"].shape == (8, 2)
    expected = np.asarray(model(x, training=False))
    np.testing.assert_allclose(joint["target"], expected, rtol=1e-5, atol=1e-6)

    # The SavedModel serves raw uint8 images: the same probabilities as model.keras.
    served = tf.saved_model.load(str(run / "saved_model"))
    outputs = served.serve(tf.constant(images))
    np.testing.assert_allclose(outputs["probabilities"], expected, atol=1e-5)
    np.testing.assert_array_equal(outputs["class_id"], expected.argmax(axis=1))
    larger = helpers.easy_images(2, size=24, seed=10)[0]
    resized = tf.image.resize(larger.astype("float32"), (16, 16), antialias=True)
    np.testing.assert_allclose(
        served.serve(tf.constant(larger))["probabilities"],
        model(resized, training=False),
        atol=1e-5,
    )


def test_index_is_reused_across_fractions_and_seeds(world, tmp_path, monkeypatch):
    path = os.path.join(world["index_dir"], "neighbours.npz")
    before = os.stat(path).st_mtime_ns

    def no_rebuild(config, merge_only=False):
        raise AssertionError("the index was rebuilt")

    monkeypatch.setattr(workflow, "build_neighbours", no_rebuild)
    config = _config(world, tmp_path / "half", fraction=0.5, seed=1)
    report = training.finetune(config)["report"]
    assert os.stat(path).st_mtime_ns == before
    assert report["train_examples"] + report["val_examples"] == 18  # half of 36
    # The run used the rows of its own images: the candidates are theirs.
    assert report["source_candidates"] == len(_selected_ids(config))


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"split_seed": 1}, "split_seed=0"),
        ({"test_fraction": 0.5}, "test_fraction=0.25"),
        ({"target": "other"}, "target="),
    ],
)
def test_index_of_another_run_is_refused(world, tmp_path, overrides, message):
    if overrides.get("target") == "other":
        other = helpers.write_npz(tmp_path / "other.npz", num_per_class=24, seed=1)
        overrides = {"target": "numpy:" + other}
    config = _config(world, tmp_path / "run", **overrides)
    with pytest.raises(ValueError, match=re.escape(world["index_dir"])) as info:
        training.finetune(config)
    assert message in str(info.value)
    assert not (tmp_path / "run").exists()


def test_index_that_misses_training_images_is_refused(world, tmp_path):
    partial = str(tmp_path / "partial")
    workflow.build_neighbours(
        workflow.IndexConfig(
            source=world["source"], target=world["target"], target_fraction=0.5,
            bank="gabor", k_max=K_MAX, image_size=16, output_dir=partial, progress=False,
        )
    )
    config = _config(world, tmp_path / "run", index_dir=partial)
    _, _, train_ids, _ = training.finetune_split(config)
    with np.load(os.path.join(partial, "neighbours.npz")) as data:
        missing = len(set(train_ids.tolist()) - set(data["target_ids"].tolist()))
    assert 0 < missing < len(train_ids)
    with pytest.raises(
        ValueError, match=f"has no neighbours for {missing} of the {len(train_ids)} training images"
    ):
        training.finetune(config)


@pytest.mark.parametrize("method", ["sjft_nogrowth", "sjft_all", "sjft_random"])
def test_ablation_variants(world, tmp_path, method):
    # Two epochs with growth_period=1: sjft would have grown twice.
    config = _config(world, tmp_path / method, method=method, epochs=2)
    report = training.finetune(config)["report"]
    assert report["sampling"] == methods.get(method).sampling
    assert report["epochs_run"] == 2
    assert (tmp_path / method / "multitask.keras").is_file()
    assert "neighbours_mean" not in report["history"]  # no growth callback
    selected = len(_selected_ids(config))
    source_train, _ = training.load_train_test(world["source"])
    assert selected < len(source_train)  # so "all" and "random" differ
    if method == "sjft_nogrowth":
        assert report["source_candidates"] == selected
        assert report["neighbour_counts"] == {
            "k0": K0, "k_cap": K_MAX, "max_level": 10, "mean": float(K0), "max": K0, "grown": 0
        }
    elif method == "sjft_all":
        assert report["source_candidates"] == len(source_train) == 90
        assert "neighbour_counts" not in report
    else:
        assert report["source_candidates"] == selected
        assert "neighbour_counts" not in report


def test_sjft_from_scratch_trains_batchnorm_and_reinitialises(world, tmp_path):
    config = _config(
        world, tmp_path / "scratch", from_scratch=True, batchnorm="frozen", learning_rate=1e-3
    )
    assert config.batchnorm_mode == "train"
    assert training.FinetuneConfig().joint_bn_stats == "mixture_exact"
    out = training.finetune(config)
    model = keras.saving.load_model(out["model"])
    norms = [
        layer for layer in iter_layers(model) if isinstance(layer, keras.layers.BatchNormalization)
    ]
    assert norms and all(layer.trainable for layer in norms)
    pretrained = keras.saving.load_model(world["backbone"])
    start = pretrained.get_layer("block1_conv").get_weights()[0]
    tuned = model.get_layer("block1_conv").get_weights()[0]
    # One epoch at lr 1e-3 moves a weight by about 1e-3 a step; the
    # re-initialised kernel is nowhere near the pretrained one.
    assert np.abs(tuned - start).max() > 0.05
    assert np.isfinite(out["report"]["history"]["loss"]).all()


def test_gabor_index_with_builtin_backbone(world, tmp_path):
    index_dir = tmp_path / "gabor_index"
    config = _config(
        world, tmp_path / "run", backbone="small_cnn", index_bank="gabor", index_dir=str(index_dir)
    )
    out = training.finetune(config)
    stored = json.loads(str(_index(index_dir)["config"]))
    assert stored["bank"] == "gabor" and stored["backbone"] is None
    assert out["report"]["sampling"] == "selected" and out["report"]["epochs_run"] == 1
    assert not list(index_dir.rglob("*.keras"))
    model = keras.saving.load_model(out["model"])
    assert tuple(model.outputs[0].shape) == (None, 2)


@pytest.mark.slow
def test_interrupted_sjft_run_resumes_to_the_same_result(world, tmp_path, monkeypatch):
    epochs, interrupt_after = 4, 2
    # delta=0 counts every correct image as uncertain, and increments of
    # 0.5 * k0 = 1 grow every list by one per epoch: 2, 3, 4, 5 (the cap).
    growth = dict(epochs=epochs, patience=epochs, delta=0.0, sigma0=0.5, sigma1=0.5)
    reference = training.finetune(_config(world, tmp_path / "a", **growth))
    ref_history = reference["report"]["history"]
    # Growth happened at every epoch, so the counts carried across the
    # interruption matter.
    assert len(set(ref_history["neighbours_mean"])) > 1

    class Interrupted(loop.TrainingCheckpoint):
        def on_epoch_end(self, epoch, logs=None):
            super().on_epoch_end(epoch, logs)  # the checkpoint is committed...
            if epoch + 1 == interrupt_after:
                raise KeyboardInterrupt  # ...then the process dies

    monkeypatch.setattr(loop, "TrainingCheckpoint", Interrupted)
    config = _config(world, tmp_path / "b", **growth)
    with pytest.raises(KeyboardInterrupt):
        training.finetune(config)
    backup = tmp_path / "b" / "backup"
    state = json.load(open(backup / "state.json"))
    assert state["epoch"] == interrupt_after
    with np.load(backup / state["state_variables"]) as saved:
        counts = saved["neighbour_counts"]
    assert counts.mean() == pytest.approx(ref_history["neighbours_mean"][interrupt_after - 1])
    monkeypatch.undo()

    keras.backend.clear_session()
    resumed = training.finetune(config)
    report = resumed["report"]
    assert report["resumed_from_epoch"] == interrupt_after
    assert report["epochs_run"] == epochs
    assert not backup.exists()
    for key in ("neighbours_mean", "val_target_crossentropy", "target_accuracy"):
        np.testing.assert_allclose(
            report["history"][key], ref_history[key][interrupt_after:], rtol=1e-5, err_msg=key
        )
    assert report["neighbour_counts"] == reference["report"]["neighbour_counts"]
    a = keras.saving.load_model(reference["model"]).get_weights()
    b = keras.saving.load_model(resumed["model"]).get_weights()
    for wa, wb in zip(a, b):
        np.testing.assert_allclose(wa, wb, rtol=1e-5, atol=1e-6)
    assert report["accuracy"] == reference["report"]["accuracy"]


def test_sampler_counts_restored_by_the_checkpoint(tmp_path):
    from keras_seltransfer.data import make_sampler

    sampler = make_sampler(
        "selected", np.arange(12).reshape(4, 3) % 5, np.arange(5) % 2, k0=1, k_max=3
    )
    inputs = keras.Input((2,))
    model = keras.Model(inputs, keras.layers.Dense(2)(inputs))
    model.compile("adam", "mse")
    model.optimizer.build(model.trainable_variables)
    ckpt = loop.TrainingCheckpoint(str(tmp_path / "c"), state_variables=sampler.state_variables())
    ckpt.set_model(model)
    sampler.set_neighbour_counts([1, 3, 2, 3])
    ckpt.on_epoch_end(0)
    sampler.set_neighbour_counts([1, 1, 1, 1])
    assert ckpt.restore(model) == 1
    np.testing.assert_array_equal(sampler.get_neighbour_counts(), [1, 3, 2, 3])


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"batch_size": 7}, "need an even `batch_size`"),
        ({"k0": 6, "k_max": 5}, r"`k0` \(6\) must not exceed `k_max` \(5\)"),
        ({"k0": 0}, "`k0` must be a positive int"),
        ({"target_weight": 0.0}, "`target_weight` must be a number > 0"),
        ({"max_level": -1}, r"`max_level` must be an int >= 0.* Received: max_level=-1"),
        ({"growth_mode": "steps"}, "Received: growth_mode='steps'"),
        ({"joint_bn_stats": "domain"}, "Received: joint_bn_stats='domain'"),
    ],
)
def test_joint_config_errors(overrides, message):
    with pytest.raises(ValueError, match=message):
        training.FinetuneConfig(method="sjft", **overrides)


@pytest.mark.slow
def test_sjft_builds_a_conv_index_from_a_named_backbone(world, tmp_path, monkeypatch):
    # No saved backbone: the conv bank taps the network the run fine-tunes,
    # built from its name; the default index directory names that network.
    monkeypatch.chdir(tmp_path)
    config = _config(world, tmp_path / "run", backbone="small_cnn", index_dir=None)
    assert re.fullmatch(r"runs/index/.*-conv-smallcnn-[0-9a-f]{8}", config.index_dir)
    training.finetune(config)
    stored = json.loads(str(_index(config.index_dir)["config"]))
    assert stored["backbone"] == "small_cnn" and stored["backbone_weights"] is None
    # The target images have one channel, so the built-in backbone has one.
    assert stored["channels"] == 1 and stored["image_size"] == 16

    # An index whose conv bank tapped another network is used, with a warning.
    with pytest.warns(UserWarning, match=r"tapped backbone='.*backbone.keras'.*small_cnn"):
        training.finetune(
            _config(world, tmp_path / "other", backbone="small_cnn", epochs=1)
        )


def test_sjft_index_directory_differs_across_networks():
    def index_dir(**fields):
        return training.FinetuneConfig(method="sjft", **fields).index_dir

    base = index_dir(backbone="MobileNetV2")
    others = [
        index_dir(backbone="ResNet50"),
        index_dir(backbone="MobileNetV2", backbone_weights="imagenet"),
        index_dir(backbone="MobileNetV2", image_size=96),
        index_dir(backbone="runs/a/model.keras"),
        index_dir(backbone="runs/b/model.keras"),
    ]
    assert len({base, *others}) == 6
    assert base == index_dir(backbone="mobilenet_v2")
    # The Gabor bank depends on no network.
    assert index_dir(backbone="ResNet50", index_bank="gabor") == index_dir(
        backbone="MobileNetV2", index_bank="gabor"
    )
    assert index_dir(backbone="ResNet50", index_bank="gabor").endswith("-gabor")


def _first_batchnorm_input(model, images):
    """The first BatchNormalization layer of `model` and what it reads on `images`."""
    norm = next(
        layer for layer in iter_layers(model) if isinstance(layer, keras.layers.BatchNormalization)
    )
    probe = keras.Model(model.inputs, norm.input)
    return norm, np.asarray(probe(images, training=False), np.float64)


@pytest.mark.parametrize("bn_stats", ["target", "mixture_exact", "mixture"])
def test_sjft_serves_the_target_with_target_batchnorm_statistics(world, tmp_path, bn_stats):
    from keras_seltransfer import data as data_lib

    config = _config(world, tmp_path / bn_stats, epochs=2, joint_bn_stats=bn_stats)
    assert config.batchnorm_mode == "train"
    assert training.FinetuneConfig().joint_bn_stats == "mixture_exact"
    out = training.finetune(config)
    report = out["report"]
    assert report["batchnorm_statistics"] == bn_stats
    model = keras.saving.load_model(out["model"])
    train_full, _, train_ids, _ = training.finetune_split(config)
    images = data_lib.prepared_images(train_full.subset(train_ids), 16, 1)
    norm, x = _first_batchnorm_input(model, images)
    # The first BatchNorm layer's statistics are exactly those of its input
    # on the target training images (mean and biased variance per channel).
    axes = tuple(range(x.ndim - 1))
    target_mean, target_var = x.mean(axis=axes), x.var(axis=axes)
    moving_mean = np.asarray(norm.moving_mean)
    moving_var = np.asarray(norm.moving_variance)
    if bn_stats == "target":
        np.testing.assert_allclose(moving_mean, target_mean, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(moving_var, target_var, rtol=1e-3, atol=1e-5)
    elif bn_stats == "mixture":
        # Moving averages of mixed batches: not the target's statistics
        # (the behaviour before joint_bn_stats).
        assert np.abs(moving_mean - target_mean).max() > 1e-2


def test_sjft_capped_growth_and_repetition_report(world, tmp_path):
    # delta 0 and increments of k0 grow every list each epoch; max_level 2
    # stops them at 2 * k0 = 4 < k_max = 5.
    config = _config(
        world, tmp_path / "capped", epochs=3, delta=0.0, sigma0=1.0, sigma1=1.0, max_level=2
    )
    report = training.finetune(config)["report"]
    counts = report["neighbour_counts"]
    assert counts["k_cap"] == 4 and counts["max_level"] == 2 and counts["max"] == 4
    repetition = report["repetition"]
    assert repetition["max_draws_per_epoch"] <= 2 and repetition["final_max_draws"] <= 2
    assert sum(repetition["worst_histogram"]) == report["train_examples"]
    assert sum(repetition["final_histogram"]) == report["train_examples"]
    assert max(report["history"]["draws_max"]) == repetition["max_draws_per_epoch"]
    assert report["validation_collapse"]["detected"] in (True, False)
    assert len(report["history"]["validation_collapse"]) == 3
    uncapped = _config(world, tmp_path / "uncapped", epochs=1, max_level=0)
    report = training.finetune(uncapped)["report"]
    assert report["neighbour_counts"]["k_cap"] == K_MAX
    assert report["neighbour_counts"]["max_level"] is None


def test_rounds_restart_the_learning_rate_at_each_round():
    config = training.FinetuneConfig(
        method="sjft", epochs=6, growth_period=3, growth_mode="rounds", learning_rate=0.1
    )
    schedule = sjft.schedule_for(config)(config, 10)
    lr = [float(schedule(step)) for step in (0, 15, 29, 30, 45)]
    assert lr[0] == pytest.approx(0.1) and lr[3] == pytest.approx(0.1)
    assert lr[1] == pytest.approx(0.05, rel=1e-3) and lr[4] == pytest.approx(0.05, rel=1e-3)
    assert lr[2] < 0.001
    # Growth every period under one schedule (the default): no restart.
    config = training.FinetuneConfig(method="sjft", epochs=6, growth_period=3, learning_rate=0.1)
    assert sjft.schedule_for(config) is None  # the loop's cosine decay over the run
    schedule = loop.optimizer_for(config, 10)._learning_rate
    assert float(schedule(30)) == pytest.approx(0.05, rel=1e-3)  # half-way through one cycle


@pytest.mark.slow
def test_controls_that_isolate_selection(world, tmp_path):
    # Random neighbour lists, grown and sampled as sjft's; and sjft with
    # uniform target draws at single-task steps per epoch.
    config = _config(
        world, tmp_path / "random_neighbours", method="sjft_random_neighbours", epochs=2,
        delta=0.0, sigma0=1.0, sigma1=1.0,
    )
    report = training.finetune(config)["report"]
    assert report["sampling"] == "random_neighbours"
    assert report["neighbour_counts"]["grown"] > 0  # grows like sjft
    selected = _selected_ids(config)
    assert report["source_candidates"] <= len(selected)
    config = _config(
        world, tmp_path / "uniform", epochs=2, delta=0.0, sigma0=1.0, sigma1=1.0,
        target_draws="uniform", joint_steps="single_task",
    )
    report = training.finetune(config)["report"]
    n = report["train_examples"]
    assert report["steps_per_epoch"] == -(-n // config.batch_size)
    assert report["neighbour_counts"]["grown"] > 0
    # Every target drawn equally: at most one draw apart (the padding of the last batch).
    histogram = report["repetition"]["final_histogram"]
    drawn = [count for count, images in enumerate(histogram) if images]
    assert max(drawn) - min(drawn) <= 1
