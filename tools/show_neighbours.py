r"""Draws target images beside their nearest and farthest source images.

Reads a finished `apps.build_index` run and writes a PNG grid: one row per
target image, with the target first (framed), then its `--columns` nearest
source images, then (after a gap) its `--columns` farthest ones, so a user can
see what the retrieval selected and what it rejected.

  python tools/show_neighbours.py --index_dir=runs/index/default --output=neighbours.png
"""

import io
import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app  # noqa: E402
from absl import flags  # noqa: E402

flags.DEFINE_string("index_dir", os.path.join("runs", "index", "default"), "An apps.build_index output_dir.")
flags.DEFINE_string("output", None, "PNG to write (default: <index_dir>/neighbours.png).")
flags.DEFINE_integer("rows", 6, "Target images to show.", lower_bound=1)
flags.DEFINE_integer("columns", 6, "Nearest (and farthest) source images per target.", lower_bound=1)
flags.DEFINE_integer("tile", 64, "Tile size in pixels.", lower_bound=8)
flags.DEFINE_integer("seed", 0, "Which target images are shown (random, seeded).")
FLAGS = flags.FLAGS


def _tile(source, index, size):
    from PIL import Image

    if source.in_memory:
        array = source.images[index]
        image = Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array[..., :3])
    else:
        with Image.open(source.paths[index]) as f:
            image = f.convert("RGB") if f.mode not in ("L", "RGB") else f.copy()
    return image.convert("RGB").resize((size, size), Image.BILINEAR)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    import numpy as np
    from PIL import Image
    from PIL import ImageDraw

    from keras_seltransfer.retrieval import workflow
    from keras_seltransfer.retrieval.index import SourceIndex
    from keras_seltransfer.retrieval.similarity import pairwise_distances
    from keras_seltransfer.utils.io import atomic_write_bytes

    path = os.path.join(FLAGS.index_dir, "neighbours.npz")
    if not os.path.isfile(path):
        raise app.UsageError(f"No neighbours.npz in {FLAGS.index_dir}: run apps.build_index first.")
    with np.load(path) as data:
        neighbours = {k: data[k] for k in data.files}
    config = workflow.IndexConfig(**json.loads(str(neighbours["config"])))
    with np.load(os.path.join(FLAGS.index_dir, "target_descriptors.npz")) as data:
        target_desc = data["descriptors"]
    if config.num_shards == 1:
        index = SourceIndex.load(os.path.join(FLAGS.index_dir, "index"))
    else:
        shards = sorted(os.listdir(os.path.join(FLAGS.index_dir, "shards")))
        index = SourceIndex.merge(
            [SourceIndex.load(os.path.join(FLAGS.index_dir, "shards", s)) for s in shards]
        )

    train_full, _ = workflow.target_training_images(config)
    source = workflow.source_training_images(config)
    rng = np.random.default_rng(FLAGS.seed)
    rows = rng.choice(len(target_desc), size=min(FLAGS.rows, len(target_desc)), replace=False)
    distances = np.asarray(
        pairwise_distances(target_desc[rows], index.descriptors, index.channel_weights)
    )
    farthest = index.ids[np.argsort(-distances, axis=1, kind="stable")[:, : FLAGS.columns]]

    size, gap, cols = FLAGS.tile, FLAGS.tile // 4, FLAGS.columns
    width = size * (1 + 2 * cols) + 3 * gap
    height = len(rows) * (size + gap) + 20
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((2, 2), "target", fill="black")
    draw.text((size + gap, 2), f"{cols} nearest source images", fill="darkgreen")
    draw.text((size * (1 + cols) + 2 * gap, 2), f"{cols} farthest", fill="darkred")
    for r, row in enumerate(rows):
        y = 20 + r * (size + gap)
        canvas.paste(_tile(train_full, int(neighbours["target_ids"][row]), size), (0, y))
        draw.rectangle([0, y, size - 1, y + size - 1], outline="blue", width=2)
        for c, sid in enumerate(neighbours["neighbour_ids"][row][:cols]):
            canvas.paste(_tile(source, int(sid), size), (size + gap + c * size, y))
        for c, sid in enumerate(farthest[r]):
            canvas.paste(_tile(source, int(sid), size), (size * (1 + cols) + 2 * gap + c * size, y))
    buffer = io.BytesIO()
    canvas.save(buffer, format="PNG")
    output = FLAGS.output or os.path.join(FLAGS.index_dir, "neighbours.png")
    atomic_write_bytes(output, buffer.getvalue())
    print(f"wrote {output}")


if __name__ == "__main__":
    app.run(main)
