r"""Draws target images beside their nearest and farthest source images.

Reads a finished `apps.build_index` run and writes a PNG grid: one row per
target image, with the target first (framed), then its `--columns` nearest
source images, then (after a gap) its `--columns` farthest ones, so a user can
see what the retrieval selected and what it rejected.

  python tools/show_neighbours.py --index_dir=runs/index/default --output=neighbours.png
"""

import os

import common  # tools/common.py: environment, repository root on sys.path

from absl import app
from absl import flags

flags.DEFINE_string("index_dir", os.path.join("runs", "index", "default"), "An apps.build_index output_dir.")
flags.DEFINE_string("output", None, "PNG to write (default: <index_dir>/neighbours.png).")
flags.DEFINE_integer("rows", 6, "Target images to show.", lower_bound=1)
flags.DEFINE_integer("columns", 6, "Nearest (and farthest) source images per target.", lower_bound=1)
flags.DEFINE_integer("tile", 64, "Tile size in pixels.", lower_bound=8)
flags.DEFINE_integer("seed", 0, "Which target images are shown (random, seeded).")
FLAGS = flags.FLAGS


def main(argv):
    common.reject_arguments(argv)
    from keras_seltransfer.retrieval import neighbour_grid
    from keras_seltransfer.utils.io import atomic_write_bytes

    try:
        png = neighbour_grid(FLAGS.index_dir, FLAGS.rows, FLAGS.columns, FLAGS.tile, FLAGS.seed)
    except FileNotFoundError as e:
        raise app.UsageError(str(e))
    output = FLAGS.output or os.path.join(FLAGS.index_dir, "neighbours.png")
    atomic_write_bytes(output, png)
    print(f"wrote {output}")


if __name__ == "__main__":
    app.run(main)
