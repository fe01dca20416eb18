"""Small real data sets and backbones the tests train on, and shared checks."""

import inspect
import json
import os
from pathlib import Path

import keras
import numpy as np

from keras_seltransfer.models import build_classifier
from keras_seltransfer.models import small_cnn

# The repository root, for tests that run its tools and apps as processes.
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def easy_images(num_per_class=24, size=16, seed=0, num_classes=2):
    """Images whose class is their brightness band: learnable in a few steps."""
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for c in range(num_classes):
        level = 40 + 180 * c / max(1, num_classes - 1)
        noise = rng.normal(0, 20, size=(num_per_class, size, size, 1))
        images.append(np.clip(level + noise, 0, 255).astype("uint8"))
        labels.append(np.full(num_per_class, c))
    return np.concatenate(images), np.concatenate(labels).astype("int64")


def write_npz(path, num_per_class=24, size=16, seed=0, num_classes=2):
    images, labels = easy_images(num_per_class, size, seed, num_classes)
    names = np.array([f"class{c}" for c in range(num_classes)])
    np.savez(path, images=images, labels=labels, class_names=names)
    return str(path)


# The small, quiet budget the end-to-end fine-tuning tests train with.
SMALL_RUN = dict(
    image_size=16,
    epochs=3,
    patience=3,
    batch_size=16,
    learning_rate=1e-2,
    verbose=0,
    tensorboard=False,
)


def run_tool(script, *args, timeout=600):
    """Runs `tools/<script>` in a subprocess from the repository root.

    Returns:
        The `subprocess.CompletedProcess` (text stdout and stderr captured).
    """
    import subprocess
    import sys

    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=REPO_ROOT)
    return subprocess.run(
        [sys.executable, os.path.join(REPO_ROOT, "tools", script), *args],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout,
    )


def free_ports(count):
    """`count` distinct free TCP ports on 127.0.0.1."""
    import socket

    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        # Held open until all are read, so the ports differ.
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def start_workers(argvs, log_dir, ports, name="worker", first_index=0):
    """Starts one process per command line of `argvs` as the workers
    `first_index, first_index + 1, ...` of a `MultiWorkerMirroredStrategy`
    cluster on `127.0.0.1:<port>` for each of `ports`.

    Each process gets its `TF_CONFIG`, the repository root on `PYTHONPATH`
    and the repository root as working directory; its stdout and stderr go
    to `<log_dir>/<name><index>.log` (files, not pipes: a full pipe would
    block a worker while the test waits on another). A log that exists is
    appended to, so a restarted worker keeps its earlier output.

    Returns:
        The `subprocess.Popen` of each worker, in index order.
    """
    import subprocess

    cluster = {"worker": [f"127.0.0.1:{port}" for port in ports]}
    processes = []
    for offset, argv in enumerate(argvs):
        index = first_index + offset
        env = dict(
            os.environ,
            TF_CPP_MIN_LOG_LEVEL="3",
            PYTHONPATH=os.pathsep.join([REPO_ROOT] + [p for p in [os.environ.get("PYTHONPATH")] if p]),
            TF_CONFIG=json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}}),
        )
        with open(Path(log_dir) / f"{name}{index}.log", "ab") as log:
            processes.append(
                subprocess.Popen(
                    argv, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT
                )
            )
    return processes


def wait_workers(processes, timeout, grace=0):
    """Waits for worker processes; returns their exit codes.

    Polls rather than waiting on each in turn, and stops at the first
    failure: when one worker fails the others may block in their
    collectives. After a failure the others get `grace` more seconds to
    end on their own (workers that all fail on the same error exit at
    slightly different times). Workers still running then, or after
    `timeout` seconds, are killed (exit code -9).
    """
    import time

    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            codes = [process.poll() for process in processes]
            if all(code == 0 for code in codes):
                break
            if any(codes):
                deadline = min(deadline, time.monotonic() + grace)
                if all(code is not None for code in codes) or not grace:
                    break
            time.sleep(0.2)
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
            process.wait()
    return [process.returncode for process in processes]


def small_run_config(**fields):
    """A `FinetuneConfig` of `SMALL_RUN` with `fields` on top."""
    from keras_seltransfer import training

    return training.FinetuneConfig(**{**SMALL_RUN, **fields})


def saved_backbone(path, size=16, widths=(4, 8), num_classes=3, pretrain_epochs=3):
    """A small classifier, briefly pretrained on a related source task and
    saved as .keras, as the pretrain app writes it (so its BatchNorm
    statistics and features are those of a trained network)."""
    model = build_classifier(
        small_cnn((size, size, 1), widths=widths), num_classes, head_name="source_head"
    )
    if pretrain_epochs:
        images, labels = easy_images(32, size, seed=123, num_classes=num_classes)
        model.compile(keras.optimizers.Adam(1e-2), "sparse_categorical_crossentropy")
        model.fit(images.astype("float32"), labels, epochs=pretrain_epochs, batch_size=16, verbose=0)
    model.save(str(path))
    return str(path)


def method_world(root, num_per_class, with_source=True):
    """The data of end-to-end method tests under `root`: a two-class target
    (`num_per_class` images each), a three-class source, a pretrained saved
    backbone and an index directory, as specs `FinetuneConfig` takes.

    Module fixtures run before the per-test seeding, so the backbone's
    pretraining is seeded here and does not depend on which tests ran first.
    """
    keras.utils.set_random_seed(0)
    world = {
        "target": "numpy:" + write_npz(root / "target.npz", num_per_class=num_per_class),
        "root": root,
    }
    if with_source:
        world["source"] = "numpy:" + write_npz(
            root / "source.npz", num_per_class=20 if num_per_class > 24 else 16,
            num_classes=3, seed=4,
        )
        world["index_dir"] = str(root / "index")
    world["backbone"] = saved_backbone(root / "backbone.keras")
    return world


def _plain(config):
    """`config` as it comes back from a `.keras` file's JSON (tuples -> lists)."""
    return json.loads(json.dumps(config))


def _arrays(outputs):
    if isinstance(outputs, dict):
        return [np.asarray(outputs[key]) for key in sorted(outputs)]
    if isinstance(outputs, (list, tuple)):
        return [np.asarray(x) for x in outputs]
    return [np.asarray(outputs)]


def _assert_same_outputs(actual, expected, what, rtol, atol):
    actual, expected = _arrays(actual), _arrays(expected)
    assert len(actual) == len(expected), f"{what}: {len(actual)} outputs, expected {len(expected)}"
    for a, b in zip(actual, expected):
        np.testing.assert_allclose(a, b, rtol=rtol, atol=atol, err_msg=what)


def _assert_same_weights(actual, expected, what):
    names = [w.path.split("/")[-1] for w in actual.weights]
    expected_names = [w.path.split("/")[-1] for w in expected.weights]
    assert names == expected_names, f"{what}: weights {names}, expected {expected_names}"
    for a, b in zip(actual.weights, expected.weights):
        np.testing.assert_array_equal(
            np.asarray(a.numpy()), np.asarray(b.numpy()), err_msg=f"{what}: weight {a.path}"
        )


def assert_layer_round_trip(layer, inputs, tmp_path, model=None, safe_mode=True, rtol=1e-6, atol=1e-6):
    """Checks that `layer` is rebuilt exactly by its config and by a `.keras` file.

    Four checks, each of which a layer that loses state fails:
    1. every named argument of the layer's `__init__` is a key of `get_config()`;
    2. the config is JSON-serialisable and `from_config(config).get_config()`
       gives it back;
    3. the model, with `layer` rebuilt by `from_config` and given the same
       weights, computes the same outputs on `inputs`;
    4. the model saved as `.keras` and loaded (with `safe_mode`) holds a layer of
       the same class and name, with the same config, the same weights (names
       and values) and the same outputs on `inputs`.

    Args:
        layer: the layer under test, with the state it should keep (assigned
            weights, moving statistics) already set.
        inputs: an array, or a list of arrays, for the model.
        tmp_path: a directory for the `.keras` file.
        model: a functional model that holds `layer`. Default: a tiny model
            `keras.Input -> layer` with one input per array in `inputs` (a list
            is passed to the layer as positional arguments).
        safe_mode: passed to `keras.saving.load_model`.
        rtol, atol: tolerances of the output comparisons.

    Returns:
        The layer of the loaded model, for further checks.

    Example:

    ```python
    layer = FilterMask(name="mask")
    layer.build((None, 4))
    layer.mask.assign([1.0, 0.0, 1.0, 0.0])
    assert_layer_round_trip(layer, np.ones((2, 4), "float32"), tmp_path)
    ```
    """
    cls = type(layer)
    config = layer.get_config()
    arguments = [
        name
        for name, parameter in inspect.signature(cls.__init__).parameters.items()
        if name != "self"
        and parameter.kind not in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD)
    ]
    missing = [name for name in arguments if name not in config]
    assert not missing, f"{cls.__name__}.get_config() drops constructor arguments {missing}"
    try:
        plain = _plain(config)
    except TypeError as error:
        raise AssertionError(f"{cls.__name__}.get_config() is not JSON-serialisable: {error}")
    rebuilt = cls.from_config(config)
    assert _plain(rebuilt.get_config()) == plain, (
        f"{cls.__name__}.from_config(config).get_config() differs from config"
    )

    if model is None:
        arrays = list(inputs) if isinstance(inputs, (list, tuple)) else [inputs]
        symbolic = [keras.Input(np.shape(x)[1:], dtype=str(np.asarray(x).dtype)) for x in arrays]
        outputs = layer(*symbolic)
        model = keras.Model(symbolic if isinstance(inputs, (list, tuple)) else symbolic[0], outputs)
    expected = model(inputs)

    clone = keras.models.clone_model(
        model,
        clone_function=lambda other: (
            other.__class__.from_config(other.get_config()) if other is layer else other
        ),
    )
    clone.set_weights(model.get_weights())
    _assert_same_outputs(clone(inputs), expected, f"{cls.__name__}.from_config", rtol, atol)

    path = str(Path(tmp_path) / f"{layer.name}_round_trip.keras")
    model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=safe_mode)
    restored = loaded.get_layer(layer.name)
    assert type(restored) is cls, f"loaded {type(restored).__name__}, expected {cls.__name__}"
    assert _plain(restored.get_config()) == plain, f"{cls.__name__} config changed in .keras"
    _assert_same_weights(restored, layer, f"{cls.__name__} in .keras")
    _assert_same_outputs(loaded(inputs), expected, f"{cls.__name__} in .keras", rtol, atol)
    return restored
