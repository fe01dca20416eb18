"""Distribution strategies from a name, and helpers for multi-worker runs.

The apps take a `--strategy` flag and pass its value to `get_strategy`; they
build their models inside `strategy.scope()` and their input pipelines
through `strategy.distribute_datasets_from_function`, and only the process
for which `is_chief()` is True writes outputs.

Keras 3 `model.fit` accepts the distributed dataset that
`strategy.distribute_datasets_from_function` returns. Build the per-replica
dataset with `.repeat()` and pass `steps_per_epoch`: the distributed dataset
reports the batch count of one *input pipeline* as its cardinality, and under
`MirroredStrategy` (one pipeline feeding every replica) that is
`num_replicas` times the real number of steps. A finite dataset without
`steps_per_epoch` therefore still trains on every batch but warns that the
input ran out of data at each epoch end, and a finite dataset *with*
`steps_per_epoch` silently trains on nothing after the first epoch, because
Keras waits for the overstated batch count before it restarts the iterator.

No TensorFlow call happens at import: logical devices must be configured
before the runtime starts, and the strategies start it.
"""

import json
import os

import tensorflow as tf

# The strategies `get_strategy` builds: the one list of strategy choices
# (the apps' --strategy flag imports it).
STRATEGY_NAMES = ("auto", "default", "one_device", "mirrored", "multi_worker")

_TF_CONFIG = "TF_CONFIG"


def configure_logical_cpus(num_devices):
    """Splits the first physical CPU into `num_devices` logical devices.

    With two or more logical CPUs, `get_strategy("mirrored")` builds a real
    multi-replica `tf.distribute.MirroredStrategy` on a machine without GPUs,
    which is how distributed code is exercised in tests and on laptops. The
    replicas share the same cores, so this is for correctness, not speed.

    TensorFlow fixes its devices when its runtime starts (the first tensor,
    model or strategy), so call this first in the process. Calling it later
    is a no-op when the first CPU already has exactly `num_devices` logical
    devices, and an error otherwise.

    Args:
        num_devices: positive int, the number of logical CPU devices.

    Raises:
        ValueError: if `num_devices` is not a positive int.
        RuntimeError: if the runtime has already started with a different
            number of logical CPU devices.

    Example:

    ```python
    configure_logical_cpus(2)  # before anything else touches TensorFlow
    strategy = get_strategy("mirrored")
    strategy.num_replicas_in_sync  # 2
    ```
    """
    if (
        isinstance(num_devices, bool)
        or not isinstance(num_devices, int)
        or num_devices < 1
    ):
        raise ValueError(
            "Argument `num_devices` must be a positive int. "
            f"Received: num_devices={num_devices!r}"
        )
    cpu = tf.config.list_physical_devices("CPU")[0]
    # Reading the configuration does not start the runtime; without one,
    # TensorFlow gives each physical CPU a single logical device.
    configured = tf.config.get_logical_device_configuration(cpu)
    current = len(configured) if configured else 1
    if current == num_devices:
        return
    try:
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * num_devices
        )
    except RuntimeError as error:
        raise RuntimeError(
            f"Cannot split the CPU into {num_devices} logical devices: "
            "TensorFlow has already initialised its runtime with "
            f"{current} logical CPU device(s), and logical devices can only "
            "be configured before that. Call "
            f"`configure_logical_cpus({num_devices})` first in the process, "
            "before creating any tensor, model, dataset or strategy."
        ) from error


def get_strategy(name="auto", devices=None):
    """Returns a `tf.distribute.Strategy` chosen by name.

    - `"auto"`: `MirroredStrategy` over all GPUs when there is more than one,
      `OneDeviceStrategy` on the GPU when there is one, else the default
      strategy on the CPU.
    - `"default"`: `tf.distribute.get_strategy()`, the no-op strategy (or the
      strategy whose scope is currently entered).
    - `"one_device"`: `OneDeviceStrategy` on the first GPU, else on the
      first CPU.
    - `"mirrored"`: `MirroredStrategy` over all GPUs; without GPUs, over all
      logical CPUs (see `configure_logical_cpus`), which is a single replica
      unless the CPU was split.
    - `"multi_worker"`: `MultiWorkerMirroredStrategy` configured from the
      `TF_CONFIG` environment variable, a JSON object with a `"cluster"`
      (job name to list of `"host:port"`) and the `"task"` of this process
      (`{"type": ..., "index": ...}`). Every worker runs the same program.
      Create this strategy first in the process: TensorFlow configures its
      collective ops when the runtime starts. The strategy returned is a
      subclass whose `reduce` also accepts the nested and scalar values that
      Keras 3 `model.fit` and `model.evaluate` pass to it; with the plain
      TensorFlow class both fail (keras-team/keras#20585).

    Every `MirroredStrategy` and the `"multi_worker"` strategy returned are
    subclasses whose `reduce` also takes the first batch that Keras 3
    averages over the replicas before every `evaluate` (and so after every
    epoch of `fit` with validation data) only to read its shapes: when that
    batch does not split evenly over the replicas (a dataset smaller than the
    global batch, of a size not divisible by the replica count) the plain
    TensorFlow classes fail there with a shape mismatch.

    Looking up the devices starts the TensorFlow runtime, so call
    `configure_logical_cpus` before this function, not after.

    Args:
        name: one of `STRATEGY_NAMES`.
        devices: optional list of device names (e.g. `["/gpu:0", "/gpu:1"]`)
            that replaces the automatic choice. Only for `"mirrored"` (any
            number of devices) and `"one_device"` (exactly one device).

    Returns:
        A `tf.distribute.Strategy`.

    Raises:
        ValueError: if `name` is not one of `STRATEGY_NAMES`, if `devices`
            is malformed or given for another strategy, or, for
            `"multi_worker"`, if `TF_CONFIG` is missing or malformed.

    Example:

    ```python
    strategy = get_strategy("mirrored")
    with strategy.scope():
        model = build_model()
        model.compile(...)
    # dataset_fn(input_context) returns a repeating dataset batched with
    # input_context.get_per_replica_batch_size(global_batch_size).
    dataset = strategy.distribute_datasets_from_function(dataset_fn)
    model.fit(dataset, epochs=3, steps_per_epoch=100)
    if is_chief():
        model.save("model.keras")
    ```
    """
    if name not in STRATEGY_NAMES:
        raise ValueError(
            f"Argument `name` must be one of {STRATEGY_NAMES}. "
            f"Received: name={name!r}"
        )
    if devices is not None:
        devices = _check_devices(name, devices)

    if name == "multi_worker":
        # Validate before TensorFlow reads the variable itself: its own
        # resolver silently falls back to a local, single-worker cluster.
        _read_tf_config(required=True)
        return _KerasMultiWorkerMirroredStrategy()
    if name == "default":
        return tf.distribute.get_strategy()

    gpus = [device.name for device in tf.config.list_logical_devices("GPU")]
    if name == "auto":
        if len(gpus) > 1:
            return _KerasMirroredStrategy(gpus)
        if len(gpus) == 1:
            return tf.distribute.OneDeviceStrategy(gpus[0])
        return tf.distribute.get_strategy()
    if name == "one_device":
        if devices is not None:
            return tf.distribute.OneDeviceStrategy(devices[0])
        return tf.distribute.OneDeviceStrategy(gpus[0] if gpus else "/cpu:0")
    # name == "mirrored"
    if devices is None:
        devices = gpus or [
            device.name for device in tf.config.list_logical_devices("CPU")
        ]
    cross_device_ops = None
    if all("CPU" in device.upper() for device in devices):
        # On CPU devices TensorFlow picks collective all-reduce, whose instance
        # keys collide when a process builds several strategies over the same
        # devices ("Shape mismatch in the collective instance"). CPU replicas
        # share host memory, so reducing on one device is also the cheap way.
        cross_device_ops = tf.distribute.ReductionToOneDevice()
    return _KerasMirroredStrategy(devices, cross_device_ops=cross_device_ops)


def describe_strategy(strategy):
    """Returns a one-line description of `strategy` for logs.

    Args:
        strategy: a `tf.distribute.Strategy`.

    Returns:
        A string such as
        `"MirroredStrategy with 2 replicas on /cpu:0, /cpu:1"` or, for a
        multi-worker strategy,
        `"MultiWorkerMirroredStrategy with 2 replicas over 2 workers;
        this worker on /job:worker/task:0/cpu:0"`.

    Raises:
        ValueError: if `strategy` is not a `tf.distribute.Strategy`.

    Example:

    ```python
    describe_strategy(get_strategy("default"))
    # "default strategy with 1 replica on the default device"
    describe_strategy(get_strategy("mirrored"))
    # e.g. "MirroredStrategy with 2 replicas on /cpu:0, /cpu:1"
    ```
    """
    if not isinstance(strategy, tf.distribute.Strategy):
        raise ValueError(
            "Argument `strategy` must be a tf.distribute.Strategy. "
            f"Received: strategy={strategy!r}"
        )
    replicas = strategy.num_replicas_in_sync
    noun = "replica" if replicas == 1 else "replicas"
    try:
        worker_devices = strategy.extended.worker_devices
    except RuntimeError:
        # Only the default strategy refuses: it has no device list of its
        # own, and ops go wherever TensorFlow places them.
        return f"default strategy with {replicas} {noun} on the default device"
    devices = ", ".join(_short_device_name(device) for device in worker_devices)
    if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        # worker_devices lists only this worker's devices, so say how many
        # workers share the replicas. Name the public class, not the
        # Keras-compatibility subclass that get_strategy returns.
        jobs = strategy.cluster_resolver.cluster_spec().as_dict()
        workers = sum(len(jobs.get(job, ())) for job in ("chief", "worker"))
        return (
            f"MultiWorkerMirroredStrategy with {replicas} {noun} over "
            f"{workers} workers; this worker on {devices}"
        )
    # Name the public TensorFlow class, not the Keras-compatibility subclass.
    name = next(c.__name__ for c in type(strategy).__mro__ if not c.__name__.startswith("_"))
    return f"{name} with {replicas} {noun} on {devices}"


def is_chief():
    """Returns whether this process is the chief of its cluster.

    Only the chief should write checkpoints, logs and exported models: every
    worker of a `MultiWorkerMirroredStrategy` runs the same program, and
    concurrent writes to one path corrupt it. The answer comes from the
    `TF_CONFIG` environment variable:

    - no `TF_CONFIG` (or an empty one): a single process, the chief;
    - task type `"chief"`: the chief;
    - task type `"worker"` with index 0 when the cluster has no `"chief"`
      job: the chief, as in `MultiWorkerMirroredStrategy`;
    - anything else: not the chief.

    Returns:
        bool.

    Raises:
        ValueError: if `TF_CONFIG` is set but malformed.

    Example:

    ```python
    if is_chief():
        model.save("runs/model.keras")  # one writer per cluster
    ```
    """
    config = _read_tf_config(required=False)
    if config is None:
        return True
    task_type = config["task"]["type"]
    if task_type == "chief":
        return True
    return (
        task_type == "worker"
        and config["task"]["index"] == 0
        and "chief" not in config["cluster"]
    )


def worker_values(strategy, value):
    """Every worker's `value` (an int) under a multi-worker strategy.

    Under `MultiWorkerMirroredStrategy` every worker must call this at the
    same point of its program (it is a collective operation) and every
    worker gets the same list; under other strategies, one process being
    the whole run, it returns `[value]` and communicates nothing. Use it to
    check that the workers agree before they train together (for example
    on the epoch they resume from).

    Args:
        strategy: a `tf.distribute.Strategy`.
        value: this worker's int.

    Returns:
        A list of ints, one per worker, in worker order (the chief first
        when the cluster has no separate chief job).

    Example:

    ```python
    epochs = worker_values(strategy, initial_epoch)
    if len(set(epochs)) > 1:
        raise ValueError(f"The workers resumed from different epochs: {epochs}")
    ```
    """
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return [int(value)]
    value = tf.constant([int(value)], tf.int64)

    # In a function: `strategy.run` called eagerly warns of its overhead.
    @tf.function
    def gather():
        return strategy.gather(strategy.run(lambda: tf.identity(value)), axis=0)

    gathered = gather().numpy().tolist()
    # One entry per replica, the replicas of each worker together.
    return gathered[:: len(strategy.extended.worker_devices)]


def _first_local_values(strategy, value):
    """This worker's first replica's part of every per-replica value in `value`."""

    def first(one_value):
        if isinstance(one_value, tf.distribute.DistributedValues):
            return strategy.experimental_local_results(one_value)[0]
        return one_value

    return tf.nest.map_structure(first, value)


class _KerasMirroredStrategy(tf.distribute.MirroredStrategy):
    """`MirroredStrategy` whose `reduce` takes the batch Keras 3 builds from.

    Before every `fit` and `evaluate` (so after every epoch of `fit` with
    validation data) Keras 3 averages the first `(x, y)` batch over the
    replicas with `strategy.reduce("MEAN", batch, axis=None)`, only to read
    its shapes and dtypes for a symbolic build. When that batch does not
    split evenly (5 examples over 2 replicas: 3 and 2) the average is
    undefined and the plain class fails with a shape mismatch. Here a nest
    whose replicas hold different shapes gives the first replica's values
    (what Keras needs); every other call behaves as before.
    """

    def reduce(self, reduce_op, value, axis):
        if tf.nest.is_nested(value) and any(
            len({tuple(part.shape) for part in self.experimental_local_results(leaf)}) > 1
            for leaf in tf.nest.flatten(value)
            if isinstance(leaf, tf.distribute.DistributedValues)
        ):
            return _first_local_values(self, value)
        return super().reduce(reduce_op, value, axis)


class _KerasMultiWorkerMirroredStrategy(tf.distribute.MultiWorkerMirroredStrategy):
    """`MultiWorkerMirroredStrategy` whose `reduce` accepts what Keras 3 passes.

    Keras 3 `model.fit` calls `strategy.reduce` in two ways that TensorFlow's
    `MultiWorkerMirroredStrategy` rejects, so plain `fit` fails under it
    (keras-team/keras#20585, tensorflow/tensorflow#72388):

    - on a whole `(x, y)` batch, before every `fit` and `evaluate` (so after
      every epoch of `fit` with validation data), only to read its shapes
      and dtypes for a symbolic build: the multi-worker `reduce` takes a
      single value, not a nest;
    - on every scalar log (the loss) with `axis=0`, after each step: a
      scalar has no axis 0 to reduce.

    This subclass answers a nest with this worker's first replica's values,
    without communicating: averaging the batch over the workers, as the
    mirrored `reduce` would, fails with a shape mismatch whenever the batch
    does not split evenly (a dataset smaller than the global batch, of a
    size not divisible by the replica count), and no worker can tell
    without asking the others. It reduces scalars across replicas
    only, which is what Keras means by the second call; every call that the
    base class accepts behaves as before.
    """

    def reduce(self, reduce_op, value, axis):
        if tf.nest.is_nested(value):
            return _first_local_values(self, value)
        local = _first_local_values(self, value)
        if tf.TensorShape(getattr(local, "shape", ())).rank == 0:
            axis = None
        return super().reduce(reduce_op, value, axis=axis)


def _check_devices(name, devices):
    """Validates `devices` for strategy `name`; returns it as a list."""
    if name not in ("mirrored", "one_device"):
        raise ValueError(
            "Argument `devices` can only be given with name='mirrored' or "
            f"name='one_device', not name={name!r}. Received: devices={devices!r}"
        )
    # A bare string is a common slip for a one-element list; iterating it
    # would yield one "device" per character.
    if isinstance(devices, str) or not all(
        isinstance(device, str) and device for device in devices
    ):
        raise ValueError(
            "Argument `devices` must be a list of device name strings, such "
            f"as ['/gpu:0', '/gpu:1']. Received: devices={devices!r}"
        )
    devices = list(devices)
    if not devices or (name == "one_device" and len(devices) != 1):
        expected = "exactly one" if name == "one_device" else "at least one"
        raise ValueError(
            f"Argument `devices` must list {expected} device for "
            f"name={name!r}. Received: devices={devices!r}"
        )
    return devices


def _read_tf_config(required):
    """Parses and validates the `TF_CONFIG` environment variable.

    Args:
        required: when True, a missing or empty `TF_CONFIG` is an error;
            when False it returns None.

    Returns:
        The parsed dict, with `"cluster"` and `"task"` checked, or None.

    Raises:
        ValueError: if `TF_CONFIG` is malformed, or missing while required.
    """
    text = os.environ.get(_TF_CONFIG, "")
    expected = (
        "a JSON object such as "
        '{"cluster": {"worker": ["host0:port", "host1:port"]}, '
        '"task": {"type": "worker", "index": 0}}'
    )
    if not text.strip():
        if not required:
            return None
        raise ValueError(
            "name='multi_worker' needs the TF_CONFIG environment variable, "
            f"set on every worker to {expected}. "
            f"Received: TF_CONFIG={os.environ.get(_TF_CONFIG)!r}"
        )
    try:
        config = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(
            f"TF_CONFIG must be valid JSON, {expected}; it failed to parse "
            f"({error}). Received: TF_CONFIG={text!r}"
        ) from error
    if not isinstance(config, dict):
        raise ValueError(
            f"TF_CONFIG must be {expected}. Received: TF_CONFIG={text!r}"
        )
    cluster = config.get("cluster")
    if not isinstance(cluster, dict) or not cluster or not all(
        isinstance(job, str)
        and isinstance(addresses, list)
        and addresses
        and all(isinstance(address, str) for address in addresses)
        for job, addresses in cluster.items()
    ):
        raise ValueError(
            'TF_CONFIG must have a "cluster" mapping each job name to a '
            f'non-empty list of "host:port" strings, as in {expected}. '
            f"Received: TF_CONFIG={text!r}"
        )
    task = config.get("task")
    if (
        not isinstance(task, dict)
        or not isinstance(task.get("type"), str)
        or isinstance(task.get("index"), bool)
        or not isinstance(task.get("index"), int)
    ):
        raise ValueError(
            'TF_CONFIG must have a "task" with a string "type" and an int '
            f'"index", as in {expected}. Received: TF_CONFIG={text!r}'
        )
    # An evaluator runs beside the cluster, so it need not be listed in it.
    if task["type"] != "evaluator" and not (
        0 <= task["index"] < len(cluster.get(task["type"], ()))
    ):
        raise ValueError(
            'TF_CONFIG "task" must name a job of "cluster" and an index '
            f"within that job's address list; cluster jobs are "
            f"{sorted(cluster)}. Received: TF_CONFIG={text!r}"
        )
    return config


def _short_device_name(name):
    """'/job:localhost/replica:0/task:0/device:CPU:1' -> '/cpu:1'."""
    spec = tf.DeviceSpec.from_string(name)
    device = f"/{spec.device_type.lower()}:{spec.device_index}"
    if spec.job in (None, "localhost"):
        return device
    return f"/job:{spec.job}/task:{spec.task}{device}"


__all__ = [
    "STRATEGY_NAMES",
    "configure_logical_cpus",
    "describe_strategy",
    "get_strategy",
    "is_chief",
    "worker_values",
]
