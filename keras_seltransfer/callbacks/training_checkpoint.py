"""TrainingCheckpoint: atomic end-of-epoch checkpoints that a rerun resumes from."""

import contextlib
import json
import os
import shutil
import tempfile
import warnings

import keras
import numpy as np

from keras_seltransfer.utils.io import atomic_write_bytes
from keras_seltransfer.utils.io import atomic_write_text
from keras_seltransfer.utils.io import default_permissions
from keras_seltransfer.utils.io import load_json_object
from keras_seltransfer.utils.io import npz_bytes

_STATE = "state.json"


class TrainingCheckpoint(keras.callbacks.Callback):
    """Saves the training state after every epoch so an interrupted run resumes.

    Unlike `keras.callbacks.BackupAndRestore`, which overwrites its weights
    file in place (a process killed mid-write leaves a torn file and the
    run cannot resume), every checkpoint here is written to a new file and
    committed by atomically replacing a small `state.json` that names it.
    A crash at any moment leaves the previous complete checkpoint in force.

    The state holds the model and optimizer variables (so the learning-rate
    schedule continues), the states of the model's random seed generators
    (dropout masks and other in-model noise continue where they were; Keras'
    weight files leave them out), the number of finished epochs and, when an
    `EarlyStopping` callback is given, its counters and best weights, so a
    resumed run stops at the same epoch and restores the same weights as an
    uninterrupted one.

    Use `restore()` before `fit` and pass its result as `initial_epoch`;
    put this callback *after* the `EarlyStopping` callback in the list, so
    its `on_train_begin` re-applies the saved early-stopping state after
    Keras resets it.

    Args:
        directory: where checkpoints are kept.
        early_stopping: an optional `keras.callbacks.EarlyStopping` whose
            state is saved and restored with the model.
        delete_on_success: remove `directory` when training ends normally.
        state_variables: optional dict of name to `tf.Variable` holding
            training state outside the model (for example the neighbour
            counts of a `JointSampler`), saved and restored with it.

    Example:

    ```python
    stop = keras.callbacks.EarlyStopping(patience=5, restore_best_weights=True)
    ckpt = TrainingCheckpoint("runs/x/backup", early_stopping=stop)
    initial_epoch = ckpt.restore(model)
    model.fit(ds, epochs=30, initial_epoch=initial_epoch, callbacks=[stop, ckpt])
    ```
    """

    def __init__(self, directory, early_stopping=None, delete_on_success=True, state_variables=None):
        super().__init__()
        if not directory:
            raise ValueError(f"`directory` must be a path. Received: directory={directory!r}")
        if early_stopping is not None and not isinstance(
            early_stopping, keras.callbacks.EarlyStopping
        ):
            raise ValueError(
                "`early_stopping` must be a keras.callbacks.EarlyStopping or None. "
                f"Received: early_stopping={early_stopping!r}"
            )
        state_variables = dict(state_variables or {})
        for key, variable in state_variables.items():
            if not isinstance(key, str) or not hasattr(variable, "assign"):
                raise ValueError(
                    "`state_variables` must map names to variables. "
                    f"Received: {key!r}: {type(variable).__name__}"
                )
        self.state_variables = state_variables
        self.directory = os.fspath(directory)
        self.early_stopping = early_stopping
        self.delete_on_success = delete_on_success
        self._pending_stop_state = None

    def read_state(self):
        """The committed state dict, or None when there is no checkpoint."""
        path = os.path.join(self.directory, _STATE)
        if not os.path.isfile(path):
            return None
        state = load_json_object(
            path,
            f"checkpoint state file {path}",
            "; delete the directory to start the run afresh",
        )
        weights = os.path.join(self.directory, state.get("weights", ""))
        if not os.path.isfile(weights):
            raise ValueError(
                f"The checkpoint in {self.directory} names a weights file that is "
                f"missing: {weights}. Delete the directory to start afresh."
            )
        return state

    def restore(self, model):
        """Loads the last checkpoint into a compiled `model`.

        Returns:
            The number of epochs already finished (0 without a checkpoint),
            to pass to `fit` as `initial_epoch`.
        """
        state = self.read_state()
        if state is None:
            return 0
        if model.optimizer is not None and not model.optimizer.built:
            # Optimizer variables must exist before their values can load,
            # and under a distribution strategy (TensorFlow backend) they
            # must be the strategy's, as `fit` would build them.
            strategy = getattr(model, "distribute_strategy", None)
            with strategy.scope() if strategy is not None else contextlib.nullcontext():
                model.optimizer.build(model.trainable_variables)
        model.load_weights(os.path.join(self.directory, state["weights"]))
        if self.state_variables:
            saved = state.get("state_variables")
            path = os.path.join(self.directory, saved or "")
            if not saved or not os.path.isfile(path):
                raise ValueError(
                    f"The checkpoint in {self.directory} has no saved state for "
                    f"{sorted(self.state_variables)}; it was written by another kind of run. "
                    "Delete the directory to start afresh."
                )
            with np.load(path) as data:
                missing = sorted(set(self.state_variables) - set(data.files))
                if missing:
                    raise ValueError(f"The checkpoint state file {path} lacks {missing}.")
                for key, variable in self.state_variables.items():
                    variable.assign(data[key])
        random_state = state.get("random_state")
        if random_state:
            with np.load(os.path.join(self.directory, random_state)) as data:
                saved = [data[f"r{i}"] for i in range(len(data.files))]
            variables = _random_state_variables(model)
            shapes = [tuple(v.shape) for v in variables]
            if [tuple(a.shape) for a in saved] != shapes:
                raise ValueError(
                    f"The checkpoint in {self.directory} holds {len(saved)} random-state "
                    f"variables that do not match this model's {len(variables)}; it was "
                    "written by another model. Delete the directory to start afresh."
                )
            for variable, value in zip(variables, saved):
                variable.assign(value)
        self._pending_stop_state = state.get("early_stopping")
        return int(state["epoch"])

    def on_train_begin(self, logs=None):
        stop = self.early_stopping
        saved = self._pending_stop_state
        self._pending_stop_state = None
        if stop is None or saved is None:
            return
        stop.wait = int(saved["wait"])
        stop.best = saved["best"]
        stop.best_epoch = int(saved["best_epoch"])
        if saved.get("best_weights"):
            with np.load(os.path.join(self.directory, saved["best_weights"])) as data:
                stop.best_weights = [data[f"w{i}"] for i in range(len(data.files))]

    def on_epoch_end(self, epoch, logs=None):
        os.makedirs(self.directory, exist_ok=True)
        fd, weights_path = tempfile.mkstemp(
            prefix=f"epoch{epoch + 1:04d}-", suffix=".weights.h5", dir=self.directory
        )
        os.close(fd)
        self.model.save_weights(weights_path, overwrite=True)
        default_permissions(weights_path)
        state = {"epoch": epoch + 1, "weights": os.path.basename(weights_path)}
        random_variables = _random_state_variables(self.model)
        if random_variables:
            name = f"random-epoch{epoch + 1:04d}.npz"
            atomic_write_bytes(
                os.path.join(self.directory, name),
                npz_bytes({f"r{i}": np.asarray(v.numpy()) for i, v in enumerate(random_variables)}),
            )
            state["random_state"] = name
        if self.state_variables:
            name = f"state-epoch{epoch + 1:04d}.npz"
            atomic_write_bytes(
                os.path.join(self.directory, name),
                npz_bytes({k: np.asarray(v.numpy()) for k, v in self.state_variables.items()}),
            )
            state["state_variables"] = name
        stop = self.early_stopping
        if stop is not None:
            stop_state = {
                "wait": int(stop.wait),
                "best": None if stop.best is None else float(stop.best),
                "best_epoch": int(stop.best_epoch),
                "best_weights": None,
            }
            if stop.best_weights is not None:
                name = f"best-epoch{stop.best_epoch + 1:04d}.npz"
                path = os.path.join(self.directory, name)
                if not os.path.isfile(path):
                    buffer = npz_bytes({f"w{i}": w for i, w in enumerate(stop.best_weights)})
                    atomic_write_bytes(path, buffer)
                stop_state["best_weights"] = name
            state["early_stopping"] = stop_state
        # The commit point: until this rename the previous state stays in force.
        atomic_write_text(os.path.join(self.directory, _STATE), json.dumps(state))
        keep = {
            _STATE,
            state["weights"],
            state.get("state_variables"),
            state.get("random_state"),
            (state.get("early_stopping") or {}).get("best_weights"),
        }
        for name in os.listdir(self.directory):
            if name not in keep:
                try:
                    os.remove(os.path.join(self.directory, name))
                except OSError as e:
                    warnings.warn(f"Could not remove old checkpoint file {name}: {e}", stacklevel=2)

    def on_train_end(self, logs=None):
        if self.delete_on_success:
            shutil.rmtree(self.directory, ignore_errors=True)


def _random_state_variables(model):
    """The model's variables that weight files leave out: the states of its
    seed generators (dropout and other random layers), in a stable order."""
    weights = {id(w) for w in model.weights}
    return [v for v in model.variables if id(v) not in weights]


__all__ = [
    "TrainingCheckpoint",
]
