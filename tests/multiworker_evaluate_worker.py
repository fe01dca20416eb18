"""One worker of the two-process `evaluate`/`predict` test.

Run by `tests/test_distribute.py` as

    TF_CONFIG='{"cluster": {...}, "task": {...}}' \
        python tests/multiworker_evaluate_worker.py RESULTS.npz

with the repository root on `PYTHONPATH`. It builds
`get_strategy("multi_worker")` and writes what `evaluate` (one pass over
sets of several sizes: a single batch that does not split evenly over the
replicas, a single example, and batches with a remainder) and `predict`
return. The test imports `evaluate_all` for the single-process reference.
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from keras_seltransfer import distribute  # noqa: E402

# (examples, global batch): 5 in one batch splits 3 + 2 over two replicas,
# 1 leaves a replica empty, 37 in batches of 8 ends with a batch of 5.
CASES = ((5, 8), (1, 4), (37, 8))


def make_case(num_examples):
    """A labelled set of `num_examples` examples with 3 features, 2 classes."""
    rng = np.random.default_rng(num_examples)
    x = rng.normal(size=(num_examples, 3)).astype("float32")
    return x, (x[:, 0] > 0).astype("int64")


def _first_output(labels, probabilities):
    return probabilities[:, 0]


def evaluate_all(strategy):
    """`{name: value}`: per case, `evaluate`'s loss and metrics and
    `predict`'s outputs, under `strategy`."""
    with strategy.scope():
        model = keras.Sequential(
            [
                keras.Input((3,)),
                keras.layers.Dense(
                    2, activation="softmax", kernel_initializer=keras.initializers.GlorotUniform(seed=3)
                ),
            ]
        )
        model.compile(
            loss="sparse_categorical_crossentropy",
            # The mean of a per-example value: an example counted twice or
            # dropped changes it.
            metrics=["accuracy", keras.metrics.MeanMetricWrapper(_first_output, name="mean_p0")],
        )
    results = {}
    for size, batch in CASES:
        x, y = make_case(size)
        dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(batch)
        logs = model.evaluate(dataset, verbose=0, return_dict=True)
        for key, value in logs.items():
            results[f"{size}_{key}"] = value
        results[f"{size}_predict"] = model.predict(dataset, verbose=0)
    return results


def main(argv):
    if len(argv) != 2:
        raise SystemExit(f"usage: {argv[0]} RESULTS.npz  (with TF_CONFIG set)")
    strategy = distribute.get_strategy("multi_worker")  # first: see multiworker_worker.py
    np.savez(argv[1], **evaluate_all(strategy))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
