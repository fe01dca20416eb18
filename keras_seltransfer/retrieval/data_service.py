"""Describing source images on a tf.data service: index builds at scale.

Describing a large source (decoding, resizing and running the filter bank
over every image) is the costly part of an index build. `describe_on_service`
runs it on the workers of a tf.data service
(`tf.data.experimental.service`): a dispatcher hands out batches, any number
of worker processes (on this machine or others) compute their descriptors,
and this process gathers them in the source's order. The same batches go
through the same ops with the same weights as in a local build, so on CPU
workers the descriptors are the local build's bit for bit (see Rounding
for other devices).

Why the tf.data service and not Apache Beam (which TensorFlow Datasets uses to
prepare large data sets): it is part of TensorFlow, so it adds no dependency
(Beam would be a heavy one); it runs the tf.data pipeline the toolkit
already builds (`data.pipeline.prepare_fn`, then the bank's
`describe_batch`), unchanged, on its workers; and its workers are plain
processes started with one command each (`python -m apps.data_service`),
where Beam needs a runner (Dataflow, Flink, Spark) of its own.

How it works:

- The describe function is traced once; tf.data sends its variables (a
  conv bank's backbone weights) along with the dataset graph, as their
  values at registration, so the graph is self-contained: a worker needs no
  model file, only TensorFlow. The function is called, not inlined, so the
  workers' runtime optimises it as a local `tf.function` is optimised
  (Grappler's constant folding changes rounding; inlined into the dataset's
  graph, the function would run unoptimised).
- The dataset starts from the batch numbers (`Dataset.range`), and each
  batch number expands into the same images, in the same batch, as a local
  `make_dataset` pipeline of `batch_size`. The service splits the batch
  numbers among the workers dynamically (`ShardingPolicy.DYNAMIC`, the
  `"distributed_epoch"` processing mode: each batch is made once, by
  whichever worker asks first), so a faster or later-joining worker simply
  takes more batches.
- The service returns batches in whatever order the workers finish them;
  each carries the positions of its images, and the descriptors are put back
  in order by position.
- Images travel to the workers as the dataset holds them: an in-memory
  source's pixels inside the dataset graph (under protocol buffers' 2 GB
  limit), an image folder's file paths, which every worker must be able to
  read (a shared file system, the same mount point).

The dynamic split gives each batch at most once: a worker that dies with
batches in hand loses them, which is detected (`ConnectionError`) rather
than leaving holes; building the shard again recomputes it.

Rounding: descriptors count filter responses between bin edges fitted on
target responses, so a response lying exactly on an edge (flat image
regions give many) moves bin if it is rounded one float32 step apart. On
CPU workers with the build's TensorFlow the ops and their optimisation are
the local build's, and the descriptors were bit-identical in the tests (60,000
Fashion-MNIST images through a conv bank, the Gabor bank on image folders).
Two cases round apart: variables on another device than the registering
CPU (a GPU), which tf.data cannot send, are frozen into constants, and the
optimiser then folds them where the local build reads variables; and
workers on other hardware (GPUs) compute convolutions their own way. Frozen
into constants, 134 of the 18.4M histogram entries of 6,000 Fashion-MNIST
images differed from the local build's (single responses moving bin); the
search's distances move by about 1e-5 for such a response.
"""

import queue
import re
import socket
import threading
import time

import keras
import numpy as np
import tensorflow as tf
from tensorflow.python.framework.convert_to_constants import (
    convert_variables_to_constants_v2,
)

from keras_seltransfer.data.image_source import ImageSource
from keras_seltransfer.data.pipeline import prepare_fn
from keras_seltransfer.utils.validation import check_choice
from keras_seltransfer.utils.validation import check_int
from keras_seltransfer.utils.validation import image_size_pair

# The roles of `start_server`: one dispatcher per service, any number of workers.
SERVER_ROLES = ("dispatcher", "worker")

# Seconds `describe_on_service` waits for the next batch before giving up.
DEFAULT_TIMEOUT = 300.0

# Stateful ops a describe function may hold: variable reads (tf.data sends
# the variables' values along) and calls of nested functions.
_SERIALIZABLE_STATE = {"ReadVariableOp", "PartitionedCall", "StatefulPartitionedCall"}

_ADDRESS = re.compile(
    r"^(?:(?P<protocol>[A-Za-z0-9+_-]+)://)?"
    r"(?P<host>\[[0-9A-Fa-f:.]+\]|[^:/\[\]\s]+):(?P<port>[0-9]+)$"
)


def service_address(service):
    """The dispatcher address `grpc://host:port` of `service`, checked.

    Args:
        service: `"grpc://host:port"` or `"host:port"`, as printed by
            `apps.data_service --role=dispatcher` (`DispatchServer.target`).
            An IPv6 host is written in brackets, `grpc://[::1]:5050`.

    Returns:
        The address with its protocol, `"grpc://host:port"`.

    Raises:
        ValueError: for anything but a string of that form, another
            protocol than grpc, or a port outside `[1, 65535]`.

    Example:

    >>> service_address("localhost:5050")
    'grpc://localhost:5050'
    >>> service_address("grpc://10.0.0.7:5050")
    'grpc://10.0.0.7:5050'
    """
    match = _ADDRESS.match(service.strip()) if isinstance(service, str) else None
    if match is None or not 1 <= int(match["port"]) <= 65535:
        raise ValueError(
            "Expected `service` to be the address of a tf.data service dispatcher, "
            "'grpc://host:port' or 'host:port' with a port in [1, 65535]. "
            f"Received: service={service!r}"
        )
    protocol = match["protocol"] or "grpc"
    if protocol != "grpc":
        raise ValueError(
            "Expected `service` to use the grpc protocol, the one tf.data service "
            f"dispatchers serve. Received: service={service!r}"
        )
    return f"grpc://{match['host']}:{int(match['port'])}"


def start_server(
    role, port=0, dispatcher=None, worker_host="localhost", heartbeat_interval_ms=None
):
    """Starts a tf.data service dispatcher or worker in this process.

    The server runs in background threads until the process ends (or its
    `stop()`); `apps.data_service` starts one and waits on its `join()`.

    Args:
        role: `"dispatcher"` or `"worker"`.
        port: the port to serve on; 0 takes a free one (read it back from
            the returned server's `target` for a dispatcher).
        dispatcher: a worker's dispatcher address (`service_address`
            forms). Required for a worker; unused for a dispatcher.
        worker_host: the host name or address under which clients reach this
            worker (the dispatcher passes it on to them): the default
            `"localhost"` serves clients on this machine only; give the
            machine's name when they run elsewhere.
        heartbeat_interval_ms: a worker's heartbeat period to the
            dispatcher, in milliseconds; shorter ones release a finished
            job's resources, and let `stop()` return, sooner. None:
            TensorFlow's default.

    Returns:
        The started `tf.data.experimental.service.DispatchServer` or
        `WorkerServer`.

    Raises:
        ValueError: for an unknown role, a bad port or dispatcher address,
            or a worker without a dispatcher.

    Example:

    >>> dispatcher = start_server("dispatcher")
    >>> worker = start_server("worker", dispatcher=dispatcher.target)
    >>> dispatcher.target.startswith("grpc://localhost:")
    True
    """
    check_choice(role, "role", SERVER_ROLES)
    port = check_int(port, "port", 0, 65535)
    if heartbeat_interval_ms is not None:
        heartbeat_interval_ms = check_int(heartbeat_interval_ms, "heartbeat_interval_ms", 1)
    if role == "dispatcher":
        return tf.data.experimental.service.DispatchServer(
            tf.data.experimental.service.DispatcherConfig(port=port)
        )
    if dispatcher is None:
        raise ValueError(
            "Expected `dispatcher`, the address of the dispatcher a worker registers "
            "with. Received: dispatcher=None"
        )
    host = worker_host.strip() if isinstance(worker_host, str) else ""
    if not host or (":" in host and not (host.startswith("[") and host.endswith("]"))):
        raise ValueError(
            "Expected `worker_host` to be a host name or address without a port. "
            f"Received: worker_host={worker_host!r}"
        )
    address = service_address(dispatcher)
    return tf.data.experimental.service.WorkerServer(
        tf.data.experimental.service.WorkerConfig(
            dispatcher_address=address.split("://", 1)[1],
            worker_address=f"{host}:%port%",
            port=port,
            heartbeat_interval_ms=heartbeat_interval_ms,
        )
    )


def describe_on_service(
    describe_batch_fn,
    source,
    image_size,
    service,
    *,
    batch_size=64,
    channels=None,
    descriptor_shape=None,
    timeout=DEFAULT_TIMEOUT,
    progress=True,
):
    """Descriptors of every image of `source`, computed by tf.data service workers.

    The images are prepared as `make_dataset` prepares them (unshuffled,
    unaugmented), in the batches of `batch_size` a local pipeline forms,
    and `describe_batch_fn` runs on each batch on a worker; see the module
    docstring for how and why.

    Args:
        describe_batch_fn: a TensorFlow function of one batch, float32
            images `[batch, height, width, channels]` (raw pixels) to
            descriptors `[batch, C, B]`, for example
            `functools.partial(histograms.describe_batch, bank, bin_edges)`.
            It is traced once; the values of the variables it reads go
            with the graph the workers run (frozen into constants when
            they live off the CPU). Stateful ops (random numbers,
            `tf.py_function`) are refused.
        source: an `ImageSource`, every image of which is described.
        image_size: int or `(height, width)` the images are resized to.
        service: the dispatcher's address (see `service_address`).
        batch_size: images per batch.
        channels: None (the source's), 1 or 3; see `make_dataset`.
        descriptor_shape: `(C, B)` the descriptors must have, checked before
            anything is sent to the service; None skips the check.
        timeout: seconds to wait for the dispatcher to accept a connection
            and then for each next batch before giving up: a service without
            workers (or whose workers cannot read the images) waits forever
            otherwise.
        progress: show a progress bar over the batches.

    Returns:
        float32 array `[len(source), C, B]`, in the order of `source`.

    Raises:
        ValueError: for bad arguments, a `describe_batch_fn` that does not
            give one float descriptor `[C, B]` per image (of
            `descriptor_shape`), or one that holds state.
        ConnectionError: if nothing accepts connections at `service`, or
            batches were lost (a worker died during the job).
        TimeoutError: if no batch arrives for `timeout` seconds.

    Example:

    ```python
    dispatcher = start_server("dispatcher", port=5050)  # or apps.data_service
    workers = [start_server("worker", dispatcher="localhost:5050") for _ in range(2)]
    descriptors = describe_on_service(
        functools.partial(histograms.describe_batch, bank, edges), source, 64,
        "grpc://localhost:5050",
    )
    ```
    """
    if not callable(describe_batch_fn):
        raise ValueError(
            "Expected `describe_batch_fn` to be callable. "
            f"Received: describe_batch_fn={type(describe_batch_fn).__name__}"
        )
    if not isinstance(source, ImageSource) or len(source) == 0:
        raise ValueError(
            "Expected `source` to be a non-empty ImageSource. "
            f"Received: source={source!r}"
        )
    address = service_address(service)
    height, width = image_size_pair(image_size)
    batch_size = check_int(batch_size, "batch_size", 1)
    if channels is not None and (isinstance(channels, bool) or channels not in (1, 3)):
        raise ValueError(f"Expected `channels` to be None, 1 or 3. Received: channels={channels!r}")
    channels = source.channels if channels is None else int(channels)
    if (
        isinstance(timeout, bool)
        or not isinstance(timeout, (int, float))
        or not 0 < timeout < float("inf")
    ):
        raise ValueError(
            f"Expected `timeout` to be a positive number of seconds. Received: timeout={timeout!r}"
        )

    describe = _traced_batch_fn(
        describe_batch_fn, [None, height, width, channels], descriptor_shape
    )
    dataset = _batch_dataset(source, height, width, channels, batch_size, describe)
    _check_reachable(address, timeout)
    num_batches = -(-len(source) // batch_size)
    positions, descriptors = _gather(dataset, address, num_batches, timeout, progress)
    return _in_source_order(positions, descriptors, len(source), address)


def _traced_batch_fn(describe_batch_fn, input_shape, descriptor_shape):
    """`describe_batch_fn` traced for the workers: a function of a batch."""
    # Not inlined into the dataset's graph: a function call is optimised by
    # Grappler as a `tf.function` called here is, so a worker computes what
    # `histograms.describe` computes locally (tf.data leaves inlined code
    # unoptimised, and constant folding moves rounding).
    traced = tf.function(
        describe_batch_fn, experimental_attributes={"_noinline": True}
    ).get_concrete_function(tf.TensorSpec(input_shape, tf.float32))
    outputs = traced.structured_outputs
    if (
        not isinstance(outputs, tf.Tensor)
        or outputs.shape.rank != 3
        or not outputs.dtype.is_floating
    ):
        raise ValueError(
            "Expected `describe_batch_fn` to return one float tensor [batch, C, B] for "
            f"images of shape {input_shape}. Received: {outputs!r}"
        )
    if descriptor_shape is not None and outputs.shape[1:].as_list() != list(descriptor_shape):
        raise ValueError(
            f"Expected `describe_batch_fn` to give descriptors of shape {tuple(descriptor_shape)}. "
            f"Received: descriptors of shape {tuple(outputs.shape[1:].as_list())}"
        )
    stateful = sorted(
        {op.type for op in traced.graph.get_operations() if op.op_def.is_stateful}
        - _SERIALIZABLE_STATE
    )
    if stateful:
        raise ValueError(
            "Expected `describe_batch_fn` to be a function of the images alone: its graph "
            "runs in other processes, where state of this one (random generators, Python "
            f"callbacks) does not exist. Received: a function with the stateful ops {stateful}"
        )
    if not any(_device_type(v.device) not in (None, "CPU") for v in traced.variables):
        return traced
    # tf.data sends a variable to the workers as its value only from the
    # registering device (the CPU), so variables elsewhere become constants.
    frozen = convert_variables_to_constants_v2(traced)
    return lambda images: frozen(images)[0]


def _device_type(device):
    return tf.DeviceSpec.from_string(device).device_type if device else None


def _batch_dataset(source, height, width, channels, batch_size, describe):
    """The dataset the workers run: batch numbers to `(positions, descriptors)`."""
    size = len(source)
    items = tf.constant(source.images if source.in_memory else source.paths)
    positions = tf.range(size, dtype=tf.int64)
    prepare = prepare_fn(source, height, width, channels)

    def batch(number):
        start = number * batch_size
        stop = tf.minimum(start + batch_size, size)
        # The positions ride in the label slot of `prepare`.
        return (
            tf.data.Dataset.from_tensor_slices((items[start:stop], positions[start:stop]))
            .map(prepare, num_parallel_calls=tf.data.AUTOTUNE)
            .batch(batch_size)
        )

    dataset = tf.data.Dataset.range(-(-size // batch_size)).flat_map(batch)
    dataset = dataset.map(
        lambda images, ids: (ids, tf.cast(describe(images), tf.float32)),
        num_parallel_calls=tf.data.AUTOTUNE,
    )
    options = tf.data.Options()
    # Variables are serialised with the dataset as their current values, the
    # weights the workers should use; other state was refused when tracing.
    options.experimental_external_state_policy = tf.data.experimental.ExternalStatePolicy.IGNORE
    return dataset.with_options(options)


def _check_reachable(address, timeout):
    host, port = address.split("://", 1)[1].rsplit(":", 1)
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=min(timeout, 30.0)):
            pass
    except OSError as e:
        raise ConnectionError(
            f"Cannot reach the tf.data service dispatcher at {address} ({e}). Start it "
            "(python -m apps.data_service --role=dispatcher --port=...) or correct the address."
        ) from e


def _gather(dataset, address, num_batches, timeout, progress):
    """`(positions, descriptors)` lists of every batch the service returns.

    The registration and the iteration run in a daemon thread, so that a
    dispatcher that never answers or a job that no worker serves (where
    TensorFlow retries without end) ends in a `TimeoutError` here.
    """
    results = queue.Queue()

    def produce():
        try:
            distributed = dataset.apply(
                tf.data.experimental.service.distribute(
                    processing_mode=tf.data.experimental.service.ShardingPolicy.DYNAMIC,
                    service=address,
                )
            )
            received = 0
            for element in distributed.as_numpy_iterator():
                results.put(("batch", element))
                received += 1
                if received == num_batches:
                    # The client hears that a job has ended only on its
                    # next poll of the dispatcher, about a second later;
                    # every batch is here, so that wait is skipped.
                    break
            results.put(("end", None))
        except BaseException as e:  # noqa: BLE001 -- re-raised by the caller
            results.put(("error", e))

    threading.Thread(target=produce, name="describe-on-service", daemon=True).start()
    progbar = keras.utils.Progbar(num_batches, unit_name="batch") if progress else None
    positions, descriptors = [], []
    started = time.monotonic()
    while True:
        try:
            kind, value = results.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(
                f"No batch came from the tf.data service at {address} for {timeout:g} s "
                f"({len(positions)} of {num_batches} batches received in "
                f"{time.monotonic() - started:.0f} s). Check that its workers are running, "
                "registered with this dispatcher and able to read the source images, or "
                "allow more time (`timeout`; apps.build_index --data_service_timeout)."
            ) from None
        if kind == "error":
            raise value
        if kind == "end":
            return positions, descriptors
        positions.append(value[0])
        descriptors.append(value[1])
        if progbar is not None:
            progbar.update(len(positions))


def _in_source_order(positions, descriptors, size, address):
    """The batches' descriptors concatenated and ordered by position."""
    positions = np.concatenate(positions) if positions else np.zeros([0], np.int64)
    order = np.argsort(positions, kind="stable")
    if not np.array_equal(positions[order], np.arange(size)):
        distinct = len(np.unique(positions))
        raise ConnectionError(
            f"The tf.data service at {address} returned {len(positions)} descriptors for "
            f"{size} images ({size - distinct} missing, {len(positions) - distinct} repeated): "
            "a worker that stops during a job loses the batches it was making. Build "
            "again; nothing of this build was kept."
        )
    return np.concatenate(descriptors)[order]


__all__ = [
    "DEFAULT_TIMEOUT",
    "SERVER_ROLES",
    "describe_on_service",
    "service_address",
    "start_server",
]
