"""Pictures of retrieval results."""

import io
import json
import os

import numpy as np

from keras_seltransfer.retrieval import workflow
from keras_seltransfer.retrieval.index import SourceIndex
from keras_seltransfer.retrieval.similarity import pairwise_distances


def _tile(source, index, size):
    from PIL import Image

    if source.in_memory:
        array = source.images[index]
        image = Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array[..., :3])
    else:
        with Image.open(source.paths[index]) as f:
            image = f.convert("RGB") if f.mode not in ("L", "RGB") else f.copy()
    return image.convert("RGB").resize((size, size), Image.BILINEAR)


def neighbour_grid(index_dir, rows=6, columns=6, tile=64, seed=0):
    """Draws target images beside their nearest and farthest source images.

    A picture of what retrieval selected and what it rejected: one row per
    target image (framed), then its `columns` nearest source images, then,
    after a gap, its `columns` farthest ones.

    Args:
        index_dir: a finished `apps.build_index` output directory.
        rows: number of target images shown (chosen at random with `seed`).
        columns: nearest (and farthest) source images per target.
        tile: tile size in pixels.
        seed: seed of the choice of target images.

    Returns:
        The PNG file's bytes.

    Raises:
        FileNotFoundError: if `index_dir` holds no finished index.

    Example:

    ```python
    from keras_seltransfer.utils.io import atomic_write_bytes

    # `config.output_dir` of a finished `build_neighbours(config)` run.
    png = neighbour_grid(config.output_dir, rows=4, columns=5)
    atomic_write_bytes(os.path.join(config.output_dir, "neighbours.png"), png)
    ```
    """
    from PIL import Image
    from PIL import ImageDraw

    path = os.path.join(index_dir, "neighbours.npz")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No neighbours.npz in {index_dir}: run apps.build_index first.")
    with np.load(path) as data:
        neighbours = {k: data[k] for k in data.files}
    config = workflow.IndexConfig(**json.loads(str(neighbours["config"])))
    with np.load(os.path.join(index_dir, "target_descriptors.npz")) as data:
        target_desc = data["descriptors"]
    if config.num_shards == 1:
        index = SourceIndex.load(os.path.join(index_dir, "index"))
    else:
        shards = sorted(os.listdir(os.path.join(index_dir, "shards")))
        index = SourceIndex.merge(
            [SourceIndex.load(os.path.join(index_dir, "shards", s)) for s in shards]
        )

    train_full, _ = workflow.target_training_images(config)
    source = workflow.source_training_images(config)
    rng = np.random.default_rng(seed)
    chosen = rng.choice(len(target_desc), size=min(rows, len(target_desc)), replace=False)
    distances = np.asarray(
        pairwise_distances(target_desc[chosen], index.descriptors, index.channel_weights)
    )
    farthest = index.ids[np.argsort(-distances, axis=1, kind="stable")[:, :columns]]

    size, gap, cols = tile, tile // 4, columns
    width = size * (1 + 2 * cols) + 3 * gap
    height = len(chosen) * (size + gap) + 20
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((2, 2), "target", fill="black")
    draw.text((size + gap, 2), f"{cols} nearest source images", fill="darkgreen")
    draw.text((size * (1 + cols) + 2 * gap, 2), f"{cols} farthest", fill="darkred")
    for r, row in enumerate(chosen):
        y = 20 + r * (size + gap)
        canvas.paste(_tile(train_full, int(neighbours["target_ids"][row]), size), (0, y))
        draw.rectangle([0, y, size - 1, y + size - 1], outline="blue", width=2)
        for c, sid in enumerate(neighbours["neighbour_ids"][row][:cols]):
            canvas.paste(_tile(source, int(sid), size), (size + gap + c * size, y))
        for c, sid in enumerate(farthest[r]):
            canvas.paste(_tile(source, int(sid), size), (size * (1 + cols) + 2 * gap + c * size, y))
    buffer = io.BytesIO()
    canvas.save(buffer, format="PNG")
    return buffer.getvalue()
