"""One worker of the two-process `MultiWorkerMirroredStrategy` test.

Run by `tests/test_distribute.py` as

    TF_CONFIG='{"cluster": {...}, "task": {...}}' \
        python tests/multiworker_worker.py WEIGHTS.npz

with the repository root on `PYTHONPATH`. It builds
`get_strategy("multi_worker")`, trains the tiny model of `train` on this
worker's shard of the synthetic data and writes the final weights, with the
number of replicas, `is_chief()`, `describe_strategy()` and what
`worker_values` gathers, to `WEIGHTS.npz`.

The test also imports this module for the same recipe (data, model, input
pipeline, training) so the single-process reference cannot drift from what
the workers run; importing it only sets TensorFlow's log-level defaults
(which must precede the TensorFlow import when run as a script).
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from keras_seltransfer import distribute  # noqa: E402

FEATURES = 8
GLOBAL_BATCH = 16
STEPS_PER_EPOCH = 3
EPOCHS = 2
SEED = 7


def make_data(num_examples=GLOBAL_BATCH * STEPS_PER_EPOCH):
    """Returns the synthetic regression data `(x, y)` as float32 arrays."""
    rng = np.random.default_rng(SEED)
    x = rng.normal(size=(num_examples, FEATURES)).astype("float32")
    y = (x @ rng.normal(size=(FEATURES, 1)) + 0.1).astype("float32")
    return x, y


def make_dataset_fn(x, y, global_batch=GLOBAL_BATCH, repeat=True):
    """Returns a `dataset_fn(input_context)` for the given arrays.

    Each input pipeline keeps every `num_input_pipelines`-th example before
    batching, so at every step the per-replica batches together hold exactly
    the examples of one global batch of the unsharded data: the mean gradient,
    and hence the training run, is the same for any number of replicas.
    With `repeat=False` the dataset is one pass over the data.
    """

    def dataset_fn(input_context):
        batch_size = input_context.get_per_replica_batch_size(global_batch)
        dataset = tf.data.Dataset.from_tensor_slices((x, y))
        dataset = dataset.shard(
            input_context.num_input_pipelines, input_context.input_pipeline_id
        )
        if repeat:
            dataset = dataset.repeat()
        return dataset.batch(batch_size).prefetch(tf.data.AUTOTUNE)

    return dataset_fn


def build_model():
    """Returns the compiled tiny model; call it inside `strategy.scope()`."""
    model = keras.Sequential(
        [
            keras.Input((FEATURES,)),
            keras.layers.Dense(
                4,
                activation="tanh",
                kernel_initializer=keras.initializers.GlorotUniform(seed=SEED),
            ),
            keras.layers.Dense(
                1,
                kernel_initializer=keras.initializers.GlorotUniform(seed=SEED + 1),
            ),
        ]
    )
    model.compile(optimizer=keras.optimizers.SGD(learning_rate=0.05), loss="mse")
    return model


def initial_weights():
    """Returns the weights of `build_model()` before any training."""
    return build_model().get_weights()


def train(strategy, distributed=True, repeat=True):
    """Trains and evaluates the tiny model under `strategy`.

    Args:
        strategy: the `tf.distribute.Strategy` to train under.
        distributed: when True, the input comes from
            `strategy.distribute_datasets_from_function`; when False, from the
            plain global-batch dataset (for the default strategy).
        repeat: when True, the dataset repeats and `fit` is given
            `steps_per_epoch`; when False, it is one pass over the data per
            epoch and `fit` is not given `steps_per_epoch`. Both train on the
            same batches.

    Returns:
        Tuple `(weights, loss)`: `model.get_weights()` after training, and
        the loss of `model.evaluate` on `STEPS_PER_EPOCH` batches afterwards.
    """
    x, y = make_data()
    dataset_fn = make_dataset_fn(x, y, repeat=repeat)
    with strategy.scope():
        model = build_model()
    if distributed:
        dataset = strategy.distribute_datasets_from_function(dataset_fn)
    else:
        # A default InputContext is one pipeline feeding one replica, so the
        # per-replica batch is the global batch.
        dataset = dataset_fn(tf.distribute.InputContext())
    # A repeating dataset needs `steps_per_epoch`. `shuffle=False` because
    # fit never shuffles tf.data input, and Keras warns when asked to.
    steps = STEPS_PER_EPOCH if repeat else None
    model.fit(
        dataset, epochs=EPOCHS, steps_per_epoch=steps, shuffle=False, verbose=0
    )
    loss = model.evaluate(dataset, steps=steps, verbose=0)
    return model.get_weights(), loss


def main(argv):
    if len(argv) != 2:
        raise SystemExit(f"usage: {argv[0]} WEIGHTS.npz  (with TF_CONFIG set)")
    # First TensorFlow work in the process: collective ops are configured
    # when the runtime starts.
    strategy = distribute.get_strategy("multi_worker")
    weights, loss = train(strategy)
    np.savez(
        argv[1],
        loss=loss,
        num_replicas=strategy.num_replicas_in_sync,
        is_chief=distribute.is_chief(),
        description=distribute.describe_strategy(strategy),
        # 10 on the chief, 11 on the other worker.
        worker_values=distribute.worker_values(strategy, 10 + int(not distribute.is_chief())),
        **{f"weight_{i}": weight for i, weight in enumerate(weights)},
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
