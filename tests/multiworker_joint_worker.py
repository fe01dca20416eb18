"""One worker of the two-process joint-pipeline test under MultiWorkerMirroredStrategy.

Run by `tests/test_distribute.py` as

    TF_CONFIG='{"cluster": {...}, "task": {...}}' \
        python tests/multiworker_joint_worker.py OUTPUT.npz

with the repository root on `PYTHONPATH`. It builds the joint pipeline of
`make_data` under `get_strategy("multi_worker")`, records the image ids of
this worker's batches for epoch 0, trains a tiny two-head model for two
epochs and writes both to `OUTPUT.npz`. The test imports `make_data` and
`make_pipeline` for the single-process reference.
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

import keras  # noqa: E402
import numpy as np  # noqa: E402

GLOBAL_BATCH = 8
SIZE = 4


def make_data():
    """Target and source sets whose pixels hold each image's id (targets 200+)."""
    from keras_seltransfer import data as data_lib

    def images(ids):
        return np.broadcast_to(ids[:, None, None, None], (len(ids), SIZE, SIZE, 1)).astype(np.uint8)

    rng = np.random.default_rng(0)
    target = data_lib.from_numpy(images(200 + np.arange(12)), np.arange(12) % 2)
    source = data_lib.from_numpy(images(np.arange(150)), np.arange(150) % 4)
    neighbours = np.stack([rng.permutation(150)[:10] for _ in range(12)])
    return target, source, neighbours


def make_pipeline(strategy=None):
    from keras_seltransfer import data as data_lib

    target, source, neighbours = make_data()
    sampler = data_lib.JointSampler.from_neighbours(neighbours, source.labels, k0=3, seed=1)
    dataset = data_lib.make_joint_dataset(
        target, source, sampler, SIZE, GLOBAL_BATCH, strategy=strategy, augment="none"
    )
    return sampler, dataset


def main(argv):
    if len(argv) != 2:
        raise SystemExit(f"usage: {argv[0]} OUTPUT.npz  (with TF_CONFIG set)")
    from keras_seltransfer import distribute
    from keras_seltransfer.models import build_multitask_model
    from keras_seltransfer.models import joint_compile_args

    strategy = distribute.get_strategy("multi_worker")
    sampler, dataset = make_pipeline(strategy)
    sampler.on_epoch_begin(0)
    seen = []
    for images, _, _ in dataset:
        (local,) = strategy.experimental_local_results(images)
        seen.append(local.numpy()[:, 0, 0, 0].round().astype(np.int64))
    keras.utils.set_random_seed(3)
    with strategy.scope():
        inputs = keras.Input((SIZE, SIZE, 1))
        features = keras.layers.Flatten()(keras.layers.Rescaling(1 / 255)(inputs))
        backbone = keras.Model(inputs, keras.layers.Dense(3, activation="tanh")(features))
        model = build_multitask_model(backbone, sampler.num_source_classes, 2)
        model.compile(keras.optimizers.SGD(0.1), **joint_compile_args())
    model.fit(dataset, epochs=2, callbacks=[sampler], shuffle=False, verbose=0)
    np.savez(
        argv[1],
        seen=np.stack(seen),
        **{f"weight_{i}": w for i, w in enumerate(model.get_weights())},
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
