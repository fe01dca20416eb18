import json
import os

import keras
import numpy as np
import pytest

from keras_seltransfer.callbacks import TrainingCheckpoint


def _model():
    inputs = keras.Input((4,))
    model = keras.Model(inputs, keras.layers.Dense(2, activation="softmax")(inputs))
    model.compile(keras.optimizers.Adam(0.05), "sparse_categorical_crossentropy")
    return model


def _data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 4)).astype("float32")
    y = (x[:, 0] > 0).astype("int64")
    return x, y


class _Interrupt(keras.callbacks.Callback):
    def __init__(self, at_epoch):
        super().__init__()
        self.at_epoch = at_epoch

    def on_epoch_end(self, epoch, logs=None):
        if epoch + 1 == self.at_epoch:
            raise KeyboardInterrupt


def _fit(model, directory, epochs, interrupt_at=None, patience=100):
    x, y = _data()
    stop = keras.callbacks.EarlyStopping(
        monitor="loss", patience=patience, restore_best_weights=True
    )
    ckpt = TrainingCheckpoint(directory, early_stopping=stop)
    initial = ckpt.restore(model)
    callbacks = [stop, ckpt] + ([_Interrupt(interrupt_at)] if interrupt_at else [])
    model.fit(x, y, batch_size=64, epochs=epochs, initial_epoch=initial, shuffle=False,
              callbacks=callbacks, verbose=0)
    return initial, stop


def test_interrupted_run_resumes_to_identical_weights(tmp_path):
    keras.utils.set_random_seed(0)
    reference = _model()
    start = reference.get_weights()
    _fit(reference, str(tmp_path / "ref"), epochs=6)

    resumed = _model()
    resumed.set_weights(start)
    with pytest.raises(KeyboardInterrupt):
        _fit(resumed, str(tmp_path / "ckpt"), epochs=6, interrupt_at=3)
    state = json.load(open(tmp_path / "ckpt" / "state.json"))
    assert state["epoch"] == 3

    fresh = _model()  # a new process would start from new variables
    initial, _ = _fit(fresh, str(tmp_path / "ckpt"), epochs=6)
    assert initial == 3
    for a, b in zip(reference.get_weights(), fresh.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    assert not (tmp_path / "ckpt").exists()  # deleted after success


def test_early_stopping_state_survives_resume(tmp_path):
    model = _model()
    with pytest.raises(KeyboardInterrupt):
        _fit(model, str(tmp_path / "c"), epochs=10, interrupt_at=2)
    saved = json.load(open(tmp_path / "c" / "state.json"))["early_stopping"]
    assert saved["best"] is not None and saved["best_weights"]
    ckpt_stop = keras.callbacks.EarlyStopping(monitor="loss", restore_best_weights=True)
    ckpt = TrainingCheckpoint(str(tmp_path / "c"), early_stopping=ckpt_stop)
    ckpt.restore(_model())
    ckpt_stop.on_train_begin()  # Keras resets early stopping first...
    ckpt.on_train_begin()  # ...then the checkpoint re-applies the saved state
    assert ckpt_stop.best == pytest.approx(saved["best"])
    assert ckpt_stop.best_epoch == saved["best_epoch"]
    assert ckpt_stop.best_weights is not None


def test_only_the_latest_checkpoint_files_are_kept(tmp_path):
    model = _model()
    with pytest.raises(KeyboardInterrupt):
        _fit(model, str(tmp_path / "c"), epochs=10, interrupt_at=4)
    names = sorted(os.listdir(tmp_path / "c"))
    weights = [n for n in names if n.endswith(".weights.h5")]
    assert len(weights) == 1 and weights[0].startswith("epoch0004-")
    assert "state.json" in names and len(names) <= 3


def test_torn_weights_file_never_becomes_the_checkpoint(tmp_path):
    model = _model()
    with pytest.raises(KeyboardInterrupt):
        _fit(model, str(tmp_path / "c"), epochs=10, interrupt_at=2)
    # A crash mid-save leaves a partial file beside the committed one.
    (tmp_path / "c" / "epoch0003-partial.weights.h5").write_bytes(b"\x89HDF\r\n half")
    initial, _ = _fit(_model(), str(tmp_path / "c"), epochs=3)
    assert initial == 2


def test_corrupt_state_is_a_clear_error(tmp_path):
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "state.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        TrainingCheckpoint(str(tmp_path / "c")).restore(_model())
    (tmp_path / "c" / "state.json").write_text('{"epoch": 2, "weights": "gone.weights.h5"}')
    with pytest.raises(ValueError, match="missing"):
        TrainingCheckpoint(str(tmp_path / "c")).restore(_model())
    # Bytes that are not UTF-8, and JSON that is not an object, name the file too.
    (tmp_path / "c" / "state.json").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ValueError, match=r"checkpoint state file .*state\.json is not valid JSON"):
        TrainingCheckpoint(str(tmp_path / "c")).restore(_model())
    (tmp_path / "c" / "state.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"state\.json to be a JSON object\. Received: a JSON list; delete"):
        TrainingCheckpoint(str(tmp_path / "c")).restore(_model())


def test_argument_errors():
    with pytest.raises(ValueError, match="directory"):
        TrainingCheckpoint("")
    with pytest.raises(ValueError, match="early_stopping"):
        TrainingCheckpoint("x", early_stopping=object())


def test_state_variables_are_saved_and_restored(tmp_path):
    import tensorflow as tf

    counter = tf.Variable(np.zeros(3, np.int32))

    class Bump(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            counter.assign_add(np.array([1, 2, 3], np.int32))

    x, y = _data()
    model = _model()
    ckpt = TrainingCheckpoint(tmp_path / "ckpt", state_variables={"counter": counter})
    # The checkpoint comes after the callback that changes the state.
    with pytest.raises(KeyboardInterrupt):
        model.fit(x, y, epochs=5, callbacks=[Bump(), ckpt, _Interrupt(3)], verbose=0)
    np.testing.assert_array_equal(counter.numpy(), [3, 6, 9])
    counter.assign(np.zeros(3, np.int32))
    fresh = TrainingCheckpoint(tmp_path / "ckpt", state_variables={"counter": counter})
    assert fresh.restore(_model()) == 3
    np.testing.assert_array_equal(counter.numpy(), [3, 6, 9])
    # A checkpoint written without that state cannot resume a run that needs it.
    plain = TrainingCheckpoint(tmp_path / "plain")
    with pytest.raises(KeyboardInterrupt):
        _model().fit(x, y, epochs=2, callbacks=[plain, _Interrupt(1)], verbose=0)
    needs_state = TrainingCheckpoint(tmp_path / "plain", state_variables={"counter": counter})
    with pytest.raises(ValueError, match="no saved state"):
        needs_state.restore(_model())
    with pytest.raises(ValueError, match="map names to variables"):
        TrainingCheckpoint(tmp_path / "x", state_variables={"counter": 3})


def test_joint_run_resumes_to_identical_weights(tmp_path):
    """Interrupted and resumed joint training (sampler epochs, grown lists and
    all) ends with the weights of an uninterrupted run."""
    import tensorflow as tf

    from keras_seltransfer import data as data_lib
    from keras_seltransfer.models import build_multitask_model
    from keras_seltransfer.models import joint_compile_args

    rng = np.random.default_rng(0)
    target = data_lib.from_numpy(rng.integers(0, 255, (16, 6, 6, 1), dtype=np.uint8), np.arange(16) % 2)
    source = data_lib.from_numpy(rng.integers(0, 255, (60, 6, 6, 1), dtype=np.uint8), np.arange(60) % 3)
    ids = np.stack([rng.permutation(60)[:12] for _ in range(16)])

    class Grow(keras.callbacks.Callback):
        def __init__(self, sampler):
            super().__init__()
            self.sampler = sampler

        def on_epoch_end(self, epoch, logs=None):
            counts = self.sampler.get_neighbour_counts()
            self.sampler.set_neighbour_counts(np.minimum(counts + np.arange(16) % 3, 12))

    def run(directory, interrupt_at=None):
        keras.utils.set_random_seed(0)
        sampler = data_lib.JointSampler.from_neighbours(ids, source.labels, k0=2, seed=5)
        inputs = keras.Input((6, 6, 1))
        x = keras.layers.Flatten()(keras.layers.Rescaling(1 / 255)(inputs))
        backbone = keras.Model(inputs, keras.layers.Dense(4, activation="relu")(x))
        model = build_multitask_model(backbone, sampler.num_source_classes, 2)
        model.compile(keras.optimizers.Adam(0.01), **joint_compile_args())
        ds = data_lib.make_joint_dataset(target, source, sampler, 6, 8)
        ckpt = TrainingCheckpoint(directory, state_variables=sampler.state_variables())
        initial = ckpt.restore(model)
        callbacks = [sampler, Grow(sampler), ckpt]
        if interrupt_at:
            callbacks.append(_Interrupt(interrupt_at))
        model.fit(ds, epochs=5, initial_epoch=initial, callbacks=callbacks, shuffle=False, verbose=0)
        return model, sampler

    reference, ref_sampler = run(tmp_path / "a")
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "b", interrupt_at=2)
    resumed, sampler = run(tmp_path / "b")
    np.testing.assert_array_equal(sampler.get_neighbour_counts(), ref_sampler.get_neighbour_counts())
    for a, b in zip(reference.get_weights(), resumed.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    assert isinstance(sampler.epoch, tf.Variable) and int(sampler.epoch.numpy()) == 4


def test_resume_under_a_distribution_strategy(tmp_path):
    # A resumed run restores before `fit`, so the optimizer's variables are
    # built by `restore`: outside the strategy's scope that failed ("Need to
    # be inside `with strategy.scope()`"), so no mirrored or multi-worker
    # run could resume.
    from keras_seltransfer import distribute

    strategy = distribute.get_strategy("mirrored")
    keras.utils.set_random_seed(0)
    with strategy.scope():
        reference = _model()
    start = reference.get_weights()
    _fit(reference, str(tmp_path / "ref"), epochs=4)

    with strategy.scope():
        resumed = _model()
    resumed.set_weights(start)
    with pytest.raises(KeyboardInterrupt):
        _fit(resumed, str(tmp_path / "ckpt"), epochs=4, interrupt_at=2)
    with strategy.scope():
        fresh = _model()
    initial, _ = _fit(fresh, str(tmp_path / "ckpt"), epochs=4)
    assert initial == 2
    for a, b in zip(reference.get_weights(), fresh.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
