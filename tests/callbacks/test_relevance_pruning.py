"""RelevancePruning and its schedule."""

import glob
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_seltransfer import relevance
from keras_seltransfer.callbacks.relevance_pruning import pruning_fraction
from keras_seltransfer.callbacks.relevance_pruning import RelevancePruning
from keras_seltransfer.models import build_classifier
from keras_seltransfer.models import filter_masking as fm
from keras_seltransfer.models import filter_transfer as ft
from keras_seltransfer.models import small_cnn
from tests import helpers


def test_schedule_is_linear_to_the_final_fraction_at_the_last_epoch():
    assert [pruning_fraction(e, epochs=5, final_fraction=0.4, period=2) for e in range(5)] == [
        None, None, 0.2, None, 0.4
    ]
    schedule = [pruning_fraction(e, epochs=3, final_fraction=0.5) for e in range(3)]
    assert schedule == [None, 0.25, 0.5]
    # The last epoch always gets a round, even off the period.
    assert [pruning_fraction(e, epochs=6, final_fraction=0.5, period=3) for e in range(6)] == [
        None, None, None, 0.3, None, 0.5
    ]
    assert pruning_fraction(0, epochs=1, final_fraction=0.5) is None
    assert pruning_fraction(7, epochs=5, final_fraction=0.5) is None
    with pytest.raises(ValueError, match="final_fraction"):
        pruning_fraction(1, epochs=3, final_fraction=1.0)
    with pytest.raises(ValueError, match="`period`"):
        pruning_fraction(1, epochs=3, final_fraction=0.5, period=0)
    with pytest.raises(ValueError, match="`epoch`"):
        pruning_fraction(-1, epochs=3, final_fraction=0.5)


class _TraceCounter(keras.layers.Layer):
    """Counts its Python calls: once per trace of a graph that contains it."""

    calls = 0

    def call(self, x):
        type(self).calls += 1
        return x


def _masked_model():
    backbone = small_cnn((16, 16, 1), widths=(4, 8))
    features = _TraceCounter(name="counter")(backbone.output)
    outputs = keras.layers.Dense(2, activation="softmax", name="head")(features)
    return fm.add_filter_masks(keras.Model(backbone.input, outputs))


class _Spy(keras.callbacks.Callback):
    """Records, at each epoch start, relevance or masks; at each end, traces."""

    def __init__(self, data=None):
        super().__init__()
        self.data = data
        self.seen = {}
        self.traces = []

    def on_epoch_begin(self, epoch, logs=None):
        if self.data is not None:
            self.seen[epoch] = relevance.filter_relevance(self.model, self.data, "mean")
        else:
            self.seen[epoch] = {
                name: m.mask.numpy().copy() for name, m in fm.filter_masks(self.model).items()
            }

    def on_epoch_end(self, epoch, logs=None):
        self.traces.append(_TraceCounter.calls)


def test_callback_masks_filters_mid_fit_without_retracing(tmp_path):
    images, labels = helpers.easy_images(16, size=16)
    data = tf.data.Dataset.from_tensor_slices(images.astype(np.float32)).batch(16)
    model = _masked_model()
    model.compile(keras.optimizers.Adam(1e-2), "sparse_categorical_crossentropy")
    pruning = RelevancePruning(data, period=1, final_fraction=0.5)
    before, after = _Spy(data), _Spy()
    log_dir = str(tmp_path / "logs")
    traced_before_fit = _TraceCounter.calls
    history = model.fit(
        images.astype(np.float32),
        labels,
        epochs=3,
        batch_size=16,
        verbose=0,
        callbacks=[before, pruning, after, keras.callbacks.TensorBoard(log_dir)],
    )
    # Epoch 1 prunes floor(0.25 n), epoch 2 floor(0.5 n) of each layer.
    assert history.history["pruned_fraction"] == [0.0, 3 / 12, 6 / 12]
    assert history.history["pruned_filters"] == [0.0, 3.0, 3.0]
    assert [r["pruned"] for r in pruning.rounds] == [
        {"block1_conv": 1, "block2_conv": 2},
        {"block1_conv": 1, "block2_conv": 2},
    ]
    for epoch, fraction in ((1, 0.25), (2, 0.5)):
        for name, mask in after.seen[epoch].items():
            previous = after.seen[epoch - 1][name] == 0
            expected = relevance.prune_lowest(before.seen[epoch][name], previous, fraction)
            np.testing.assert_array_equal(mask == 0, expected, err_msg=f"{name} @ {epoch}")
    assert ft.filter_transfer_summary(model)["block2_conv"]["masked"] == 4
    # Masked channels are exactly zero in the trained network.
    mask = fm.filter_masks(model)["block2_conv"]
    out = keras.Model(model.inputs[0], mask.output)(images[:4].astype(np.float32))
    assert np.all(np.asarray(out)[..., mask.mask.numpy() == 0] == 0)
    # The training step was traced in the first epoch only.
    assert before.traces[0] > traced_before_fit
    assert before.traces[0] == before.traces[1] == before.traces[2]
    # TensorBoard got the logged scalars.
    tags = set()
    for path in glob.glob(os.path.join(log_dir, "train", "events.out.tfevents*")):
        for event in tf.compat.v1.train.summary_iterator(path):
            tags.update(value.tag for value in event.summary.value)
    assert {"epoch_pruned_fraction", "epoch_pruned_filters"} <= tags


def test_reinit_action_state_resumes_and_resets():
    images = helpers.easy_images(8, size=16)[0].astype(np.float32)
    data = tf.data.Dataset.from_tensor_slices(images).batch(8)
    model = fm.add_filter_masks(build_classifier(small_cnn((16, 16, 1), widths=(4, 8)), 2))
    kernel = model.get_layer("block2_conv").kernel.numpy().copy()
    pruning = RelevancePruning(
        data, final_fraction=0.5, action="reinit", epochs=3, seed=0, bn_statistics="initializer"
    )
    pruning.set_model(model)
    assert sorted(pruning.state_variables) == [
        "relevance_pruning/block1_conv",
        "relevance_pruning/block2_conv",
    ]
    pruning.on_train_begin()
    pruning.on_epoch_begin(0)
    assert not pruning.rounds
    pruning.on_epoch_begin(1)
    flags = {k: v.numpy() > 0 for k, v in pruning.state_variables.items()}
    pruned = flags["relevance_pruning/block2_conv"]
    assert pruned.sum() == 2
    mask = fm.filter_masks(model)["block2_conv"]
    np.testing.assert_array_equal(mask.mask.numpy(), 1.0)  # re-initialised, not masked
    np.testing.assert_array_equal(mask.transferred.numpy() == 0, pruned)
    changed = np.any(model.get_layer("block2_conv").kernel.numpy() != kernel, axis=(0, 1, 2))
    np.testing.assert_array_equal(changed, pruned)

    # A resumed run restores the flags (as TrainingCheckpoint does) and
    # continues: the flagged filters are not re-initialised again.
    resumed = RelevancePruning(
        data, final_fraction=0.5, action="reinit", epochs=3, seed=0, bn_statistics="initializer"
    )
    resumed.set_model(model)
    for key, variable in resumed.state_variables.items():
        variable.assign(pruning.state_variables[key].numpy())
    resumed.on_train_begin()
    resumed.on_epoch_begin(2)
    assert resumed.rounds[0]["pruned"] == {"block1_conv": 1, "block2_conv": 2}
    now = resumed.pruned()["block2_conv"]
    assert now.sum() == 4 and np.all(now[pruned])
    resumed.reset_state()
    assert not any(p.any() for p in resumed.pruned().values())


def test_errors_are_clear():
    data = tf.data.Dataset.from_tensor_slices(np.zeros((2, 16, 16, 1), np.float32)).batch(2)
    plain = build_classifier(small_cnn((16, 16, 1), widths=(4,)), 2)
    with pytest.raises(ValueError, match="has none"):
        RelevancePruning(data).set_model(plain)
    with pytest.raises(ValueError, match=r"\['block9_conv'\] have none"):
        RelevancePruning(data, layers=["block9_conv"]).set_model(fm.add_filter_masks(plain))
    with pytest.raises(ValueError, match="`action` must be one of"):
        RelevancePruning(data, action="delete")
    with pytest.raises(ValueError, match="source_data=None"):
        RelevancePruning(data, statistic="kl")
    with pytest.raises(ValueError, match="`statistic` must be one of"):
        RelevancePruning(data, statistic="max")
    with pytest.raises(ValueError, match="final_fraction"):
        RelevancePruning(data, final_fraction=1.0)
    with pytest.raises(ValueError, match="tf.data.Dataset"):
        RelevancePruning(np.zeros((2, 16, 16, 1)))
    with pytest.raises(ValueError, match="set_model"):
        RelevancePruning(data).state_variables
