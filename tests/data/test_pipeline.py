"""Tests for keras_seltransfer.data.pipeline."""

import os

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from keras_seltransfer.data.pipeline import distributed_dataset
from keras_seltransfer.data.pipeline import make_dataset
from keras_seltransfer.data.pipeline import steps_per_epoch
from keras_seltransfer.data.readers import from_image_folder
from keras_seltransfer.data.readers import from_numpy

LUMA = np.array([0.299, 0.587, 0.114])


def _indexed_source(num=16, size=6, channels=3, seed=0):
    """A source whose label is the example index, so outputs can be traced back."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (num, size, size, channels), dtype=np.uint8)
    return from_numpy(images, np.arange(num), [f"c{i}" for i in range(num)])


def _collect(dataset):
    images, labels = [], []
    for x, y in dataset:
        images.append(x.numpy())
        labels.append(y.numpy())
    return np.concatenate(images), np.concatenate(labels)


def test_in_memory_shapes_dtypes_and_exact_values():
    source = _indexed_source(num=10)
    dataset = make_dataset(source, 6, batch_size=4)
    assert dataset.element_spec[0].shape.as_list() == [None, 6, 6, 3]
    assert dataset.element_spec[0].dtype == tf.float32
    assert dataset.element_spec[1].dtype == tf.int32
    batches = list(dataset)
    assert [int(y.shape[0]) for _, y in batches] == [4, 4, 2]
    images, labels = _collect(dataset)
    np.testing.assert_array_equal(labels, np.arange(10))  # evaluation keeps order
    np.testing.assert_array_equal(images, source.images.astype(np.float32))
    assert images.max() > 1  # raw pixels, not normalised

    dropped = make_dataset(source, (6, 6), batch_size=4, drop_remainder=True)
    assert [int(y.shape[0]) for _, y in dropped] == [4, 4]
    assert dropped.element_spec[0].shape.as_list() == [4, 6, 6, 3]


def test_resize():
    source = _indexed_source(num=3, size=6)
    images, _ = _collect(make_dataset(source, (12, 5), batch_size=8))
    assert images.shape == (3, 12, 5, 3)
    assert images.min() >= 0 and images.max() <= 255
    expected = tf.image.resize(
        source.images.astype(np.float32), (12, 5), method="bilinear", antialias=True
    ).numpy()
    np.testing.assert_allclose(images, np.clip(expected, 0, 255), atol=1e-4)
    # A constant image stays constant through an antialiased bilinear resize.
    flat = from_numpy(np.full((2, 9, 9), 200, np.uint8), [0, 1])
    resized, _ = _collect(make_dataset(flat, 4, batch_size=2))
    np.testing.assert_allclose(resized, 200, atol=1e-3)


def test_channel_conversion_in_memory():
    rgb = _indexed_source(num=4, channels=3)
    gray_out, _ = _collect(make_dataset(rgb, 6, 4, channels=1))
    expected = (rgb.images.astype(np.float64) @ LUMA)[..., None]
    np.testing.assert_allclose(gray_out, expected, atol=1e-3)

    gray = _indexed_source(num=4, channels=1)
    rgb_out, _ = _collect(make_dataset(gray, 6, 4, channels=3))
    np.testing.assert_array_equal(rgb_out, np.repeat(gray.images, 3, axis=-1))

    rgba = _indexed_source(num=4, channels=4)
    kept, _ = _collect(make_dataset(rgba, 6, 4))
    assert kept.shape[-1] == 4
    dropped, _ = _collect(make_dataset(rgba, 6, 4, channels=3))
    np.testing.assert_array_equal(dropped, rgba.images[..., :3])


def _write_images(root, arrays, fmt="PNG", ext=".png"):
    for i, (class_name, array) in enumerate(arrays):
        path = os.path.join(root, class_name, f"img{i}{ext}")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        Image.fromarray(array).save(path, fmt)


def test_on_disk_png_matches_pil(tmp_path):
    rng = np.random.default_rng(1)
    arrays = [(name, rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)) for name in ("a", "a", "b")]
    _write_images(tmp_path, arrays)
    source = from_image_folder(tmp_path)
    images, labels = _collect(make_dataset(source, 8, batch_size=2))
    np.testing.assert_array_equal(labels, [0, 0, 1])
    for image, path in zip(images, source.paths):
        with Image.open(path) as reference:
            np.testing.assert_array_equal(image, np.asarray(reference, np.float32))
    gray, _ = _collect(make_dataset(source, 8, batch_size=2, channels=1))
    for image, path in zip(gray, source.paths):
        with Image.open(path) as reference:
            np.testing.assert_allclose(image[..., 0], np.asarray(reference) @ LUMA, atol=1e-3)


def test_on_disk_mixed_formats_sizes_and_channels(tmp_path):
    rng = np.random.default_rng(2)
    gray = rng.integers(0, 256, (8, 8), dtype=np.uint8)
    _write_images(tmp_path, [("gray", gray)], "BMP", ".bmp")
    color = rng.integers(0, 256, (10, 6, 3), dtype=np.uint8)
    _write_images(tmp_path, [("color", color)], "GIF", ".gif")
    _write_images(tmp_path, [("alpha", rng.integers(0, 256, (8, 8, 4), dtype=np.uint8))])
    jpeg = rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)
    _write_images(tmp_path, [("jpeg", jpeg)], "JPEG", ".jpg")
    with pytest.raises(ValueError, match="different channel counts"):
        from_image_folder(tmp_path)
    for channels in (1, 3):
        source = from_image_folder(tmp_path, channels=channels)
        assert source.class_names == ("alpha", "color", "gray", "jpeg")
        images, labels = _collect(make_dataset(source, 8, batch_size=4))
        assert images.shape == (4, 8, 8, channels)
        assert images.min() >= 0 and images.max() <= 255
        # The 8x8 grey BMP is not resized, and grey -> RGB repeats it.
        expected = np.repeat(gray[..., None], channels, -1)
        np.testing.assert_allclose(images[labels == 2][0], expected, atol=1e-3)


def _flip_kinds(images, labels, originals):
    """For each output image, which flip of its original it is."""
    kinds = []
    for image, label in zip(images, labels):
        original = originals[label].astype(np.float32)
        candidates = {
            "none": original,
            "lr": original[:, ::-1],
            "ud": original[::-1],
            "both": original[::-1, ::-1],
        }
        matches = [k for k, v in candidates.items() if np.array_equal(image, v)]
        assert matches, "output is not a flip of its original"
        kinds.append(matches[0])
    return kinds


def test_augment_flips_deterministically():
    source = _indexed_source(num=32)
    build = lambda seed, augment="flip": make_dataset(  # noqa: E731
        source, 6, 8, training=True, augment=augment, seed=seed
    )
    first_images, first_labels = _collect(build(7))
    second_images, second_labels = _collect(build(7))
    np.testing.assert_array_equal(first_images, second_images)
    np.testing.assert_array_equal(first_labels, second_labels)
    other_images, other_labels = _collect(build(8))
    assert not np.array_equal(other_labels, first_labels)

    kinds = _flip_kinds(first_images, first_labels, source.images)
    assert set(kinds) == {"none", "lr"}  # flips some, not all, never up-down

    ud_images, ud_labels = _collect(build(7, "flip_ud"))
    assert {"ud", "both"} & set(_flip_kinds(ud_images, ud_labels, source.images))

    plain_images, plain_labels = _collect(build(7, None))
    assert set(_flip_kinds(plain_images, plain_labels, source.images)) == {"none"}
    # Evaluation pipelines never augment, whatever `augment` says.
    eval_images, _ = _collect(make_dataset(source, 6, 8, augment="flip_ud", seed=7))
    np.testing.assert_array_equal(eval_images, source.images.astype(np.float32))


def test_shuffle_each_epoch_and_repeat():
    source = _indexed_source(num=20)
    dataset = make_dataset(source, 6, 5, training=True, augment=None, seed=3)
    epoch1 = _collect(dataset)[1]
    epoch2 = _collect(dataset)[1]
    np.testing.assert_array_equal(np.sort(epoch1), np.arange(20))
    np.testing.assert_array_equal(np.sort(epoch2), np.arange(20))
    assert not np.array_equal(epoch1, np.arange(20))
    assert not np.array_equal(epoch1, epoch2)

    repeated = make_dataset(source, 6, 8, training=True, seed=3, repeat=True)
    labels = _collect(repeated.take(5))[1]  # 40 examples: two epochs
    np.testing.assert_array_equal(np.bincount(labels), np.full(20, 2))
    np.testing.assert_array_equal(np.sort(labels[:20]), np.arange(20))
    once = make_dataset(source, 6, 8, repeat=True, cache=False)
    np.testing.assert_array_equal(_collect(once.take(3))[1], np.arange(24) % 20)


def test_make_dataset_errors():
    source = _indexed_source(num=4)
    with pytest.raises(ValueError, match="batch_size=0"):
        make_dataset(source, 6, 0)
    with pytest.raises(ValueError, match="non-empty source"):
        make_dataset(source.subset([]), 6, 2)
    with pytest.raises(ValueError, match=r"augment.*Received: augment='rotate'"):
        make_dataset(source, 6, 2, augment="rotate")
    with pytest.raises(ValueError, match="image_size=0"):
        make_dataset(source, 0, 2)
    with pytest.raises(ValueError, match=r"image_size=\(6, 6, 3\)"):
        make_dataset(source, (6, 6, 3), 2)
    with pytest.raises(ValueError, match="channels=4"):
        make_dataset(source, 6, 2, channels=4)
    with pytest.raises(ValueError, match="source=ndarray"):
        make_dataset(source.images, 6, 2)
    with pytest.raises(ValueError, match="shuffle_buffer=0"):
        make_dataset(source, 6, 2, shuffle_buffer=0)


def test_input_context_shards():
    source = _indexed_source(num=9)
    context = tf.distribute.InputContext(
        num_input_pipelines=2, input_pipeline_id=1, num_replicas_in_sync=2
    )
    labels = _collect(make_dataset(source, 6, 4, training=True, seed=0, input_context=context))[1]
    np.testing.assert_array_equal(np.sort(labels), [1, 3, 5, 7])
    single = tf.distribute.InputContext(1, 0, 2)
    assert len(_collect(make_dataset(source, 6, 4, input_context=single))[1]) == 9


def test_distributed_dataset_mirrored():
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    assert strategy.num_replicas_in_sync == 2
    source = _indexed_source(num=24)
    dataset = distributed_dataset(strategy, source, 8, 6, training=True, seed=0, augment="flip")
    for _ in range(2):  # every epoch covers every example exactly once
        seen = []
        for images, labels in dataset:
            local_images = strategy.experimental_local_results(images)
            local_labels = strategy.experimental_local_results(labels)
            assert len(local_labels) == 2
            for x, y in zip(local_images, local_labels):
                assert x.shape == (4, 6, 6, 3)
                assert y.shape == (4,)
                seen.extend(y.numpy().tolist())
        np.testing.assert_array_equal(np.sort(seen), np.arange(24))

    with pytest.raises(
        ValueError, match=r"divisible by the number of replicas \(2\).*global_batch_size=5"
    ):
        distributed_dataset(strategy, source, 5, 6)
    with pytest.raises(ValueError, match="batch_size"):
        distributed_dataset(strategy, source, 8, 6, batch_size=4)


def test_skipped_stream_continues_exactly_where_the_full_one_is():
    """A resumed run's pipeline (skip_batches / skip_steps) yields the very
    batches, in order and with the same flips, that the full stream yields
    after the skipped ones."""
    source = _indexed_source(num=20)
    kwargs = dict(training=True, seed=5, repeat=True, augment="flip_ud")
    full = _collect(make_dataset(source, 6, 8, **kwargs).take(9))
    resumed = _collect(make_dataset(source, 6, 8, skip_batches=6, **kwargs).take(3))
    np.testing.assert_array_equal(resumed[1], full[1][48:])
    np.testing.assert_array_equal(resumed[0], full[0][48:])

    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])

    def steps(dataset, count):
        out = []
        for _, (images, labels) in zip(range(count), dataset):
            out.append([y.numpy() for y in strategy.experimental_local_results(labels)])
        return out

    whole = steps(distributed_dataset(strategy, source, 8, 6, **kwargs), 7)
    later = steps(distributed_dataset(strategy, source, 8, 6, skip_steps=4, **kwargs), 3)
    for got, expected in zip(later, whole[4:]):
        for a, b in zip(got, expected):
            np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="skip_batches"):
        distributed_dataset(strategy, source, 8, 6, skip_batches=2)
    with pytest.raises(ValueError, match="skip_batches=-1"):
        make_dataset(source, 6, 2, skip_batches=-1)


def test_steps_per_epoch():
    assert steps_per_epoch(10, 4) == 3
    assert steps_per_epoch(10, 4, drop_remainder=True) == 2
    assert steps_per_epoch(8, 4) == 2
    assert steps_per_epoch(0, 4) == 0
    with pytest.raises(ValueError, match="batch_size=0"):
        steps_per_epoch(10, 0)
    with pytest.raises(ValueError, match="num_examples=-1"):
        steps_per_epoch(-1, 4)
