r"""Finds, for every target training image, the most similar source images.

The retrieval step of selective joint fine-tuning (Ge & Yu, CVPR 2017): the
target training images and the source images are described by histograms of
low-level filter-bank responses (a Gabor bank, or the first conv layers of a
backbone), with bin edges fitted on the target images, and every target image
gets its `--k_max` nearest source images under a weighted symmetric KL
divergence.

Writes into --output_dir:
  bin_edges.npz        the target-fitted bin edges, the bank config and weights
  target_descriptors.npz  target descriptors, labels and ids (indices into
                       the target's training split)
  index/               the source index (descriptors, labels, ids), or
  shards/shard-i-of-n  one per shard with --num_shards > 1, each with its
                       own top-k part (topk.npz)
  neighbours.npz       neighbour ids [targets, k_max] and distances, sorted by
                       distance (written once every shard is done)
  config.json          the settings of the run; a later command into the same
                       --output_dir with other data or settings is refused
  run.lock             while a command runs (shard-i-of-n.lock for a shard):
                       names it; a second command on the same run (or the
                       same shard) is refused meanwhile, see --force

--search_mode=exact gives every target exactly the neighbours of a double
loop over pairs; --search_mode=fast re-scores only the k_max + margin
nearest by float32 GEMM distance (the GEMMs are the cost; a rare neighbour may
be missed); auto, the default, is fast from 100,000 source images. The mode
(auto resolved) is part of the run's settings.

A shard is finished once its topk.npz exists (written last, atomically); a
rerun skips finished stages and shards (listed as "reused") and recomputes
a shard whose process was killed. A merge reads the data sets and settings
from config.json, so it needs only --output_dir and --num_shards.

Sharded use (each shard can run on another machine sharing --output_dir, or
beside the others on one machine):

  python -m apps.build_index --num_shards=4 --shard_index=0   # ... 1, 2, 3
  python -m apps.build_index --num_shards=4 --merge           # merge the parts

On a tf.data service (for sources too large for one process): describing
the source images, the costly stage, runs on the service's workers, on any
number of machines, while the bin edges, the target descriptors and the
search run in this command; the index is a local build's (bit for bit on
CPU workers), and --data_service combines with --num_shards. Start the servers with
apps.data_service:

  python -m apps.data_service --role=dispatcher --port=5050        # one
  python -m apps.data_service --role=worker --dispatcher_address=hostA:5050 \
      --worker_host=$(hostname)                                     # each worker
  python -m apps.build_index --data_service=grpc://hostA:5050 ...

Example:

  python -m apps.build_index --source=fashion_mnist --target=elpv --bank=conv
"""

from absl import flags

from keras_seltransfer.apps import common
from keras_seltransfer.retrieval import workflow

common.define_config_flags(workflow.IndexConfig)
flags.DEFINE_boolean("merge", False, "Merge finished shards into neighbours.npz (no describing).")

FLAGS = flags.FLAGS


def main(argv):
    common.reject_extra_args(argv)
    try:
        outputs = workflow.build_neighbours(
            common.config_from_flags(workflow.IndexConfig),
            merge_only=FLAGS.merge,
        )
    except common.USER_ERRORS as e:
        common.fail("build_index", e)
    for key, value in outputs.items():
        print(f"  {key}: {value}")


def run():
    """Runs the app with the command line's flags."""
    common.run_app(main)


if __name__ == "__main__":
    run()
