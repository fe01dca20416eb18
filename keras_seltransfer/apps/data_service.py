r"""Runs a tf.data service dispatcher or worker, for index builds at scale.

`apps.build_index --data_service=grpc://host:port` describes the source
images on the workers of a tf.data service (`tf.data.experimental.service`,
part of TensorFlow): start one dispatcher, then any number of workers (one
per machine or per core group) registered with it. Each runs until it is
stopped (Ctrl-C, SIGTERM); workers may join or leave between builds, and
join during one. The descriptors are those of a build in one process, bit
for bit on CPU workers (GPU workers may round a filter response to the
other side of a bin edge; see `keras_seltransfer.retrieval.data_service`).

Workers run the graph the build command sends them (the filter bank's
weights included), so they need TensorFlow (the build's version) but no
model file; for image-folder sources they need the images at the same
paths (a shared file system).
Every worker tells the dispatcher the address clients reach it at:
--worker_host=localhost serves clients on the worker's own machine only;
give the worker machine's name when the build runs elsewhere.

Example (one machine: a dispatcher, two workers, the build):

  python -m apps.data_service --role=dispatcher --port=5050 &
  python -m apps.data_service --role=worker --dispatcher_address=localhost:5050 &
  python -m apps.data_service --role=worker --dispatcher_address=localhost:5050 &
  python -m apps.build_index --data_service=grpc://localhost:5050 --source=fashion_mnist ...

Several machines: the dispatcher on host A, on every worker machine

  python -m apps.data_service --role=worker --dispatcher_address=hostA:5050 \
      --worker_host=$(hostname)
"""

from absl import flags

from keras_seltransfer.apps import common
from keras_seltransfer.retrieval import data_service

flags.DEFINE_enum(
    "role", None, data_service.SERVER_ROLES,
    "Which server to run: the one dispatcher of the service, or a worker.",
)
flags.DEFINE_integer(
    "port", 0,
    "Port to serve on (0: a free one; give the dispatcher a fixed one, e.g. 5050, for "
    "the workers and builds to name).",
    lower_bound=0, upper_bound=65535,
)
flags.DEFINE_string(
    "dispatcher_address", None,
    "Worker: the dispatcher to register with, host:port or grpc://host:port.",
)
flags.DEFINE_string(
    "worker_host", "localhost",
    "Worker: the host name or address clients reach this worker at (the dispatcher "
    "passes it on): localhost for builds on this machine only, else this machine's name.",
)
flags.mark_flag_as_required("role")

FLAGS = flags.FLAGS


def main(argv):
    common.reject_extra_args(argv)
    try:
        if FLAGS.role == "worker" and FLAGS.dispatcher_address is None:
            raise ValueError("A worker needs --dispatcher_address, the dispatcher's host:port.")
        server = data_service.start_server(
            FLAGS.role,
            port=FLAGS.port,
            dispatcher=FLAGS.dispatcher_address,
            worker_host=FLAGS.worker_host,
        )
    except common.USER_ERRORS as e:
        common.fail("data_service", e)
    except RuntimeError as e:
        # TensorFlow's whole message for a port it cannot bind.
        common.fail(
            "data_service",
            f"Could not start the {FLAGS.role} on port {FLAGS.port} ({e}): is the port in use?",
        )
    if FLAGS.role == "dispatcher":
        print(f"tf.data service dispatcher serving at {server.target}", flush=True)
    else:
        print(
            "tf.data service worker serving for the dispatcher at "
            f"{data_service.service_address(FLAGS.dispatcher_address)}",
            flush=True,
        )
    server.join()


def run():
    """Runs the app with the command line's flags."""
    common.run_app(main)


if __name__ == "__main__":
    run()
