"""Index builds on a tf.data service (keras_seltransfer.retrieval.data_service).

Real servers: a dispatcher and two workers run in this process on
localhost (the slow test at the end runs them as `apps.data_service`
processes), so the describe function's graph goes through the service's
registration and the workers' gRPC as it does across machines.
"""

import functools
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from keras_seltransfer.data import from_image_folder
from keras_seltransfer.data import from_numpy
from keras_seltransfer.data import make_dataset
from keras_seltransfer.models.backbones import small_cnn
from keras_seltransfer.retrieval import ConvBank
from keras_seltransfer.retrieval import GaborBank
from keras_seltransfer.retrieval import IndexConfig
from keras_seltransfer.retrieval import SourceIndex
from keras_seltransfer.retrieval import build_neighbours
from keras_seltransfer.retrieval import data_service
from keras_seltransfer.utils import histograms
from tests import helpers

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SIZE = 16
BATCH = 8
# Not a multiple of the batch size, nor of the shard count: a short last batch.
NUM_SOURCES = 45


@pytest.fixture(scope="module")
def service():
    dispatcher = data_service.start_server("dispatcher")
    # Frequent heartbeats let the workers stop at once when the module ends.
    workers = [
        data_service.start_server("worker", dispatcher=dispatcher.target, heartbeat_interval_ms=100)
        for _ in range(2)
    ]
    yield dispatcher.target
    for server in workers + [dispatcher]:
        server.stop()


@pytest.fixture(scope="module")
def world():
    """A source of varied grey images, and a conv bank of a random-weights
    `small_cnn` (BatchNorm included) with edges fitted on other images."""
    rng = np.random.default_rng(0)
    level = rng.uniform(30, 220, size=(NUM_SOURCES + 20, 1, 1))
    spread = rng.uniform(5, 80, size=(NUM_SOURCES + 20, 1, 1))
    images = np.clip(level + spread * rng.standard_normal((NUM_SOURCES + 20, SIZE, SIZE)), 0, 255)
    images = images.round().astype(np.uint8)
    source = from_numpy(images[:NUM_SOURCES], np.arange(NUM_SOURCES) % 3, name="synthetic")
    target = from_numpy(images[NUM_SOURCES:], np.arange(20) % 2)
    keras.utils.set_random_seed(7)
    bank = ConvBank(small_cnn((SIZE, SIZE, 1), widths=(4, 8)), layers=2)
    edges = histograms.fit_bin_edges(
        bank, make_dataset(target, SIZE, BATCH), num_bins=8, progress=False
    )
    return source, bank, edges


def _build(source, bank, edges, service=None, **kwargs):
    arguments = dict(
        batch_size=BATCH,
        bin_edges=edges,
        channel_weights=histograms.channel_weights(bank),
        bank_config=bank.get_config(),
        progress=False,
        **kwargs,
    )
    if service is None:
        return SourceIndex.build(
            functools.partial(histograms.describe, bank, edges), source, SIZE, **arguments
        )
    return SourceIndex.build_on_service(
        functools.partial(histograms.describe_batch, bank, edges), source, SIZE, service,
        **arguments,
    )


def _assert_same_index(a, b, rounded=False):
    """`a` equals `b`; when `rounded`, descriptors may differ by responses
    lying on a bin edge that the two builds rounded to either side (see
    `data_service`): in under 1% of the channel histograms, by a few
    responses (total variation under 0.1)."""
    for name in ("descriptors", "labels", "ids", "bin_edges", "channel_weights"):
        if name != "descriptors" or not rounded:
            np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)
        assert getattr(a, name).dtype == getattr(b, name).dtype, name
    if rounded:
        variation = 0.5 * np.abs(a.descriptors.astype(np.float64) - b.descriptors).sum(axis=-1)
        assert np.mean(variation > 0) < 0.01 and variation.max() < 0.1, variation.max()
    assert (a.bank_config, a.metadata) == (b.bank_config, b.metadata)
    assert (a.num_shards, a.shard_index) == (b.num_shards, b.shard_index)


def test_service_build_equals_the_local_and_the_sharded_builds(world, service):
    source, bank, edges = world
    local = _build(source, bank, edges)
    sharded = [_build(source, bank, edges, num_shards=2, shard_index=i) for i in range(2)]
    on_service = _build(source, bank, edges, service)
    _assert_same_index(on_service, local)
    _assert_same_index(on_service, SourceIndex.merge(sharded))
    # A shard described on the service is the local shard, and merges.
    shard1 = _build(source, bank, edges, service, num_shards=2, shard_index=1)
    _assert_same_index(shard1, sharded[1])
    _assert_same_index(SourceIndex.merge([sharded[0], shard1]), local)
    # The descriptors are real histograms that tell the images apart.
    assert len(np.unique(on_service.descriptors.reshape(NUM_SOURCES, -1), axis=0)) == NUM_SOURCES


@pytest.mark.slow
def test_image_folder_source_on_service(service, tmp_path):
    """Workers read and decode files themselves (paths travel, not pixels),
    here RGB PNGs of another size converted to one resized grey channel."""
    rng = np.random.default_rng(3)
    for i in range(11):
        folder = tmp_path / f"class{i % 2}"
        folder.mkdir(exist_ok=True)
        pixels = rng.integers(0, 256, (20, 24, 3), np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:02d}.png")
    source = from_image_folder(tmp_path)
    bank = GaborBank()
    edges = histograms.fit_bin_edges(
        bank, make_dataset(source, SIZE, BATCH, channels=1), num_bins=4, progress=False
    )
    local = _build(source, bank, edges, channels=1)
    on_service = _build(source, bank, edges, service, channels=1)
    _assert_same_index(on_service, local)


def test_variables_off_the_cpu_are_frozen_into_the_graph(world, service, monkeypatch):
    """Variables on another device than the registering CPU (a GPU) go to
    the workers as constants, which the workers' graph optimiser folds
    otherwise than a local `tf.function` folds variable reads: equal up to
    responses rounded to the other side of a bin edge."""
    source, bank, edges = world
    devices = []
    monkeypatch.setattr(data_service, "_device_type", lambda device: devices.append(device) or "GPU")
    on_service = _build(source, bank, edges, service)
    assert devices and "CPU" in devices[0]  # the bank's variables live on the CPU here
    _assert_same_index(on_service, _build(source, bank, edges), rounded=True)


def test_bad_inputs_are_clear_errors(world, service):
    source, bank, edges = world
    describe_batch = functools.partial(histograms.describe_batch, bank, edges)
    for bad in ("localhost", "grpc://localhost:0", "http://localhost:5050", "a:b", 5050, None):
        with pytest.raises(ValueError, match="Expected `service`.*Received: service="):
            SourceIndex.build_on_service(describe_batch, source, SIZE, bad, bin_edges=edges)
    (closed,) = helpers.free_ports(1)
    unreachable = f"Cannot reach the tf.data service dispatcher at grpc://127.0.0.1:{closed}"
    with pytest.raises(ConnectionError, match=unreachable):
        _build(source, bank, edges, f"127.0.0.1:{closed}", timeout=5)
    wrong_shape = r"descriptors of shape \(12, 8\).*Received: descriptors of shape \(12, 7\)"
    with pytest.raises(ValueError, match=wrong_shape):
        SourceIndex.build_on_service(
            lambda images: histograms.describe_batch(bank, edges, images)[..., :7],
            source, SIZE, service, bin_edges=edges, progress=False,
        )
    with pytest.raises(ValueError, match="function of the images alone"):
        SourceIndex.build_on_service(
            lambda images: histograms.describe_batch(bank, edges, images)
            + 0.0 * tf.random.uniform([]),
            source, SIZE, service, bin_edges=edges, progress=False,
        )
    with pytest.raises(ValueError, match="Received: describe_batch_fn=str"):
        SourceIndex.build_on_service("describe", source, SIZE, service, bin_edges=edges)
    with pytest.raises(ValueError, match="Received: timeout=0"):
        _build(source, bank, edges, service, timeout=0)
    with pytest.raises(ValueError, match="Received: role='client'"):
        data_service.start_server("client")
    with pytest.raises(ValueError, match="Received: dispatcher=None"):
        data_service.start_server("worker")
    with pytest.raises(ValueError, match="Received: worker_host='host:1'"):
        data_service.start_server("worker", dispatcher=service, worker_host="host:1")
    assert data_service.service_address(" [::1]:5050") == "grpc://[::1]:5050"


def test_a_service_without_workers_times_out(world):
    source, bank, edges = world
    lonely = data_service.start_server("dispatcher")
    try:
        with pytest.raises(TimeoutError, match=r"No batch came .* for 0.5 s \(0 of 6 batches"):
            _build(source, bank, edges, lonely.target, timeout=0.5)
    finally:
        lonely.stop()


def test_lost_batches_are_detected():
    positions = [np.array([0, 1]), np.array([4, 5])]
    descriptors = [np.zeros([2, 1, 1], np.float32)] * 2
    lost = r"4 descriptors for 6 images \(2 missing, 0 repeated\)"
    with pytest.raises(ConnectionError, match=lost):
        data_service._in_source_order(positions, descriptors, 6, "grpc://h:1")
    ordered = data_service._in_source_order(
        [np.array([2, 3]), np.array([0, 1])],
        [np.float32([2, 3])[:, None, None], np.float32([0, 1])[:, None, None]],
        4, "grpc://h:1",
    )
    np.testing.assert_array_equal(ordered[:, 0, 0], [0, 1, 2, 3])


# The retrieval run and the apps ------------------------------------------------


def _index_config(root, out, **fields):
    return IndexConfig(
        source="numpy:" + str(root / "source.npz"), target="numpy:" + str(root / "target.npz"),
        bank="gabor", image_size=SIZE, num_bins=4, k_max=5, batch_size=BATCH,
        output_dir=str(out), progress=False, **fields,
    )


def _assert_same_run(out, reference):
    with np.load(out / "neighbours.npz") as a, np.load(reference / "neighbours.npz") as b:
        for name in ("target_ids", "neighbour_ids", "neighbour_labels", "distances"):
            np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    _assert_same_index(SourceIndex.load(out / "index"), SourceIndex.load(reference / "index"))


@pytest.fixture
def run_data(tmp_path):
    helpers.write_npz(tmp_path / "source.npz", num_per_class=15, num_classes=3, seed=4)
    helpers.write_npz(tmp_path / "target.npz", num_per_class=6, seed=5)
    return tmp_path


def test_retrieval_run_on_service_equals_the_local_run(run_data, service):
    build_neighbours(_index_config(run_data, run_data / "local"))
    outputs = build_neighbours(
        _index_config(run_data, run_data / "service", data_service=service.split("://")[1])
    )
    assert "neighbours" in outputs
    _assert_same_run(run_data / "service", run_data / "local")
    with pytest.raises(ValueError, match="Received: service='grpc://host'"):
        _index_config(run_data, run_data / "bad", data_service="grpc://host")


def _app(*args):
    return [sys.executable, "-m", *args]


_ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", TF_ENABLE_ONEDNN_OPTS="0", PYTHONPATH=ROOT)


@pytest.mark.slow
def test_build_index_app_on_data_service_processes(run_data):
    """A dispatcher and two workers started as `apps.data_service`
    processes, and `apps.build_index --data_service` as a user runs them: the
    run equals the one built in one process; a dispatcher that is not
    there is one clear line."""
    port, closed = helpers.free_ports(2)
    servers = [
        subprocess.Popen(
            _app("apps.data_service", "--role=dispatcher", f"--port={port}"),
            cwd=ROOT, env=_ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
    ]
    try:
        assert f"serving at grpc://localhost:{port}" in servers[0].stdout.readline()
        for _ in range(2):
            servers.append(subprocess.Popen(
                _app("apps.data_service", "--role=worker",
                     f"--dispatcher_address=localhost:{port}"),
                cwd=ROOT, env=_ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            ))
        for worker in servers[1:]:
            assert "tf.data service worker serving" in worker.stdout.readline()
        build_neighbours(_index_config(run_data, run_data / "local"))
        common = [
            f"--source=numpy:{run_data / 'source.npz'}",
            f"--target=numpy:{run_data / 'target.npz'}",
            "--bank=gabor", f"--image_size={SIZE}", "--num_bins=4", "--k_max=5",
            f"--batch_size={BATCH}", "--noprogress",
        ]
        built = subprocess.run(
            _app("apps.build_index", *common, f"--output_dir={run_data / 'app'}",
                 f"--data_service=grpc://localhost:{port}"),
            cwd=ROOT, env=_ENV, capture_output=True, text=True, timeout=300,
        )
        assert built.returncode == 0, built.stderr
        assert "neighbours:" in built.stdout
        _assert_same_run(run_data / "app", run_data / "local")
        assert all(server.poll() is None for server in servers)  # they serve on
    finally:
        for server in servers:
            server.kill()
            server.communicate()
    bad = subprocess.run(
        _app("apps.build_index", *common, f"--output_dir={run_data / 'bad'}",
             f"--data_service=localhost:{closed}", "--data_service_timeout=5"),
        cwd=ROOT, env=_ENV, capture_output=True, text=True, timeout=300,
    )
    assert bad.returncode == 2 and "Traceback" not in bad.stderr, bad.stderr
    assert (
        "build_index: error: Cannot reach the tf.data service dispatcher at "
        f"grpc://localhost:{closed}"
    ) in bad.stderr
    taken = subprocess.run(
        _app("apps.data_service", "--role=worker"), cwd=ROOT, env=_ENV,
        capture_output=True, text=True, timeout=300,
    )
    assert taken.returncode == 2 and "needs --dispatcher_address" in taken.stderr
