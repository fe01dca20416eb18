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

A shard is finished once its topk.npz exists (written last, atomically); a
rerun skips finished stages and shards (listed as "reused") and recomputes
a shard whose process was killed. A merge reads the data sets and settings
from config.json, so it needs only --output_dir and --num_shards.

Sharded use (each shard can run on another machine sharing --output_dir):

  python -m apps.build_index --num_shards=4 --shard_index=0   # ... 1, 2, 3
  python -m apps.build_index --num_shards=4 --merge           # merge the parts

Example:

  python -m apps.build_index --source=fashion_mnist --target=elpv --bank=conv
"""

import os

from absl import app
from absl import flags

from keras_seltransfer.apps import common

flags.DEFINE_string("source", "fashion_mnist", "Source data set spec (its training split is searched).")
flags.DEFINE_string("target", "elpv", "Target data set spec (its training split is described).")
flags.DEFINE_float(
    "target_fraction", 1.0, "Fraction of each target training class, as in apps.finetune.",
    lower_bound=0.0, upper_bound=1.0,
)
flags.DEFINE_integer(
    "seed", 0, "Seed of the target low-data subset (as in apps.finetune).",
    lower_bound=0, upper_bound=common.MAX_SEED,
)
flags.DEFINE_float(
    "test_fraction", 0.25, "Held-out share of a target without a test split (as in apps.finetune).",
    lower_bound=0.0, upper_bound=1.0,
)
flags.DEFINE_integer(
    "split_seed", 0, "Seed of the target's held-out split (as in apps.finetune).",
    lower_bound=0, upper_bound=common.MAX_SEED,
)
flags.DEFINE_enum("bank", "conv", ["conv", "gabor"], "Filter bank.")
flags.DEFINE_string(
    "backbone", None, "Backbone of the conv bank (default: the pretrain app's output)."
)
flags.DEFINE_integer("conv_layers", 2, "Conv bank: number of first conv layers.", lower_bound=1)
flags.DEFINE_boolean(
    "pre_activation", True, "Conv bank: tap responses before the activation (the authors' choice)."
)
flags.DEFINE_integer("num_bins", 32, "Histogram bins per channel.", lower_bound=1, upper_bound=1000)
flags.DEFINE_integer("k_max", 200, "Neighbours kept per target image.", lower_bound=1)
flags.DEFINE_integer("block_size", 4096, "Source rows per search block.", lower_bound=1)
flags.DEFINE_integer(
    "image_size", 64, "Images are resized to this size.",
    lower_bound=8, upper_bound=common.MAX_IMAGE_SIZE,
)
flags.DEFINE_enum(
    "channels", None, ["1", "3"],
    "Convert the images of image folders to this many channels (for folders mixing "
    "grayscale, RGB and RGBA). Unset: the conv bank's backbone's, or the data's.",
)
flags.DEFINE_integer("batch_size", 128, "Batch size for describing images.", lower_bound=1)
flags.DEFINE_integer("max_source", None, "Use only the first N source images (quick runs).", lower_bound=1)
flags.DEFINE_integer("num_shards", 1, "Split the source into this many shards.", lower_bound=1)
flags.DEFINE_integer("shard_index", 0, "Which shard this process describes.", lower_bound=0)
flags.DEFINE_boolean("merge", False, "Merge finished shards into neighbours.npz (no describing).")
flags.DEFINE_string("output_dir", os.path.join("runs", "index", "default"), "Output directory.")
flags.DEFINE_boolean("progress", True, "Show progress bars.")

FLAGS = flags.FLAGS


def main(argv):
    common.reject_extra_args(argv)
    try:
        from keras_seltransfer.retrieval import workflow

        outputs = workflow.build_neighbours(
            workflow.IndexConfig(
                source=FLAGS.source,
                target=FLAGS.target,
                target_fraction=FLAGS.target_fraction,
                seed=FLAGS.seed,
                test_fraction=FLAGS.test_fraction,
                split_seed=FLAGS.split_seed,
                bank=FLAGS.bank,
                backbone=FLAGS.backbone,
                conv_layers=FLAGS.conv_layers,
                pre_activation=FLAGS.pre_activation,
                num_bins=FLAGS.num_bins,
                k_max=FLAGS.k_max,
                block_size=FLAGS.block_size,
                image_size=FLAGS.image_size,
                batch_size=FLAGS.batch_size,
                max_source=FLAGS.max_source,
                num_shards=FLAGS.num_shards,
                shard_index=FLAGS.shard_index,
                output_dir=FLAGS.output_dir,
                progress=FLAGS.progress,
                channels=None if FLAGS.channels is None else int(FLAGS.channels),
            ),
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
