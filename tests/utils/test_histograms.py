import numpy as np
import pytest
import tensorflow as tf

from keras_seltransfer.retrieval.gabor_bank import GaborBank
from keras_seltransfer.utils.histograms import channel_weights
from keras_seltransfer.utils.histograms import describe
from keras_seltransfer.utils.histograms import describe_batch
from keras_seltransfer.utils.histograms import fit_bin_edges

FINE = 200


class StubBank:
    """A bank whose responses are the input channels themselves: group "a"
    is channels 0-1 at full resolution, group "b" channels 2-4 subsampled by
    2, so the test controls the response distributions exactly."""

    groups = [("a", 2), ("b", 3)]
    num_channels = 5

    def __call__(self, images):
        images = tf.convert_to_tensor(images, tf.float32)
        return [images[..., :2], images[:, ::2, ::2, 2:5]]

    def get_config(self):
        return {"type": "stub"}


def _known_distributions(num_images=12, size=16, seed=0):
    """Channels: uniform, exponential (skewed), constant, half zeros + uniform,
    normal."""
    rng = np.random.default_rng(seed)
    shape = (num_images, size, size)
    point_mass = np.where(rng.uniform(size=shape) < 0.5, 0.0, rng.uniform(1, 3, shape))
    channels = [rng.uniform(-2, 5, shape), rng.exponential(1.0, shape), np.full(shape, 3.25),
                point_mass, rng.normal(10, 2, shape)]
    return np.stack(channels, axis=-1).astype("float32")


def _responses(images):
    """Per channel, all responses of the stub bank as a flat float32 array."""
    return [images[..., 0].ravel(), images[..., 1].ravel(), images[:, ::2, ::2, 2].ravel(),
            images[:, ::2, ::2, 3].ravel(), images[:, ::2, ::2, 4].ravel()]


def _dataset(images, batch_size, labels=True):
    if labels:
        labels = np.arange(len(images))
        return tf.data.Dataset.from_tensor_slices((images, labels)).batch(batch_size)
    return tf.data.Dataset.from_tensor_slices(images).batch(batch_size)


def _reference_histograms(images, edges):
    """np.histogram of each image's clipped responses, per channel."""
    out = np.zeros((len(images), edges.shape[0], edges.shape[1] - 1))
    for i in range(len(images)):
        for c, values in enumerate(_responses(images[i : i + 1])):
            clipped = np.clip(values, edges[c, 0], edges[c, -1])
            out[i, c] = np.histogram(clipped, bins=edges[c])[0] / values.size
    return out


# --- fit_bin_edges ---------------------------------------------------------------


def test_fit_bin_edges_equal_mass_on_known_distributions():
    images = _known_distributions()
    num_bins = 10
    edges = fit_bin_edges(StubBank(), _dataset(images, 5), num_bins=num_bins, fine_bins=FINE,
                          progress=False)
    assert edges.shape == (5, num_bins + 1) and edges.dtype == np.float64
    assert np.all(np.diff(edges, axis=1) > 0)
    for c, values in enumerate(_responses(images)):
        assert edges[c, 0] == values.min()
        if c != 2:
            assert edges[c, -1] == values.max()
    for c in (0, 1, 4):
        values = _responses(images)[c]
        mass = np.histogram(values, bins=edges[c])[0] / values.size
        # Each edge is off by at most the mass of one fine interval.
        fine_mass = np.histogram(values, bins=FINE, range=(values.min(), values.max()))[0]
        tolerance = 2 * fine_mass.max() / values.size
        np.testing.assert_allclose(mass, 1 / num_bins, atol=tolerance)
        # Independently: each interior edge is within one fine interval of
        # the empirical quantile.
        step = (values.max() - values.min()) / FINE
        quantiles = np.quantile(values.astype(np.float64), np.arange(1, num_bins) / num_bins)
        np.testing.assert_allclose(edges[c, 1:-1], quantiles, atol=1.01 * step)


def test_fit_bin_edges_degenerate_channels():
    images = _known_distributions()
    edges = fit_bin_edges(StubBank(), _dataset(images, 12), num_bins=8, fine_bins=FINE,
                          progress=False)
    constant = edges[2]
    assert constant[0] == np.float32(3.25) and np.all(np.diff(constant) > 0)
    # The point mass at zero fills the first bin; the other bins share the rest.
    hist = describe(StubBank(), edges, _dataset(images, 12), progress=False)
    np.testing.assert_array_equal(hist[:, 2, 0], 1.0)
    pooled = hist[:, 3].mean(axis=0)
    assert pooled[0] == pytest.approx(0.5, abs=0.05)
    np.testing.assert_allclose(pooled[5:], 1 / 8, atol=0.03)
    # Edges are float32 values, so float32 comparisons see them exactly.
    np.testing.assert_array_equal(edges.astype(np.float32).astype(np.float64), edges)


def test_fit_bin_edges_streaming_equals_one_batch():
    images = _known_distributions(num_images=9)
    kwargs = dict(num_bins=16, fine_bins=FINE, progress=False)
    one = fit_bin_edges(StubBank(), _dataset(images, 9), **kwargs)
    streamed = fit_bin_edges(StubBank(), _dataset(images, 2, labels=False), **kwargs)
    np.testing.assert_array_equal(one, streamed)


def test_fit_bin_edges_gabor_bank_on_random_images(capsys):
    images = np.random.default_rng(3).uniform(0, 255, (6, 20, 20, 3)).astype("float32")
    bank = GaborBank(frequencies=(0.2, 0.4), num_orientations=3, kernel_size=9)
    edges = fit_bin_edges(bank, _dataset(images, 4), num_bins=8, fine_bins=500)
    assert "batch" in capsys.readouterr().out
    assert edges.shape == (12, 9) and np.all(np.diff(edges, axis=1) > 0)
    (responses,) = bank(images)
    values = responses.numpy().reshape(-1, 12)
    # Convolutions of different batch sizes may differ in the last bit.
    np.testing.assert_allclose(edges[:, 0], values.min(axis=0), rtol=1e-6)
    np.testing.assert_allclose(edges[:, -1], values.max(axis=0), rtol=1e-6)
    # Described with their own edges, the fitting images' pooled histograms
    # are flat.
    hist = describe(bank, edges, _dataset(images, 4), progress=False)
    np.testing.assert_allclose(hist.mean(axis=0), 1 / 8, atol=0.01)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"num_bins": 0}, "num_bins=0"),
        ({"num_bins": 1001}, "num_bins=1001"),
        ({"num_bins": 2.5}, "num_bins=2.5"),
        ({"num_bins": 32, "fine_bins": 16}, "fine_bins=16"),
    ],
)
def test_fit_bin_edges_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        fit_bin_edges(StubBank(), _dataset(_known_distributions(2), 2), progress=False, **kwargs)


def test_fit_bin_edges_bad_data():
    images = _known_distributions(2)
    with pytest.raises(ValueError, match="tf.data.Dataset"):
        fit_bin_edges(StubBank(), images, progress=False)
    with pytest.raises(ValueError, match="batch the dataset"):
        fit_bin_edges(StubBank(), tf.data.Dataset.from_tensor_slices(images), progress=False)
    with pytest.raises(ValueError, match="at least one batch"):
        fit_bin_edges(StubBank(), _dataset(images, 2).take(0), progress=False)
    images[0, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        fit_bin_edges(StubBank(), _dataset(images, 2), progress=False)


# --- describe ----------------------------------------------------------------------


def test_describe_equals_numpy_reference_with_end_bins():
    rng = np.random.default_rng(5)
    # Integer responses that hit the integer interior edges exactly, and
    # values beyond both end edges.
    images = rng.integers(-3, 9, (4, 6, 6, 5)).astype("float32")
    edges = np.tile(np.array([0.0, 1.0, 2.0, 4.0, 5.0]), (5, 1))
    edges[3] = [-1.0, 0.5, 2.5, 3.0, 6.0]
    hist = describe(StubBank(), edges, _dataset(images, 3), progress=False)
    assert hist.shape == (4, 5, 4) and hist.dtype == np.float32
    np.testing.assert_allclose(hist.sum(axis=-1), 1.0, atol=1e-6)
    np.testing.assert_allclose(hist, _reference_histograms(images, edges), atol=1e-6)
    # Out-of-range responses land in the end bins.
    extreme = np.zeros((1, 2, 2, 5), np.float32)
    extreme[..., 0] = -1e6
    extreme[..., 1] = 1e6
    hist = describe_batch(StubBank(), edges, extreme).numpy()
    np.testing.assert_array_equal(hist[0, 0], [1, 0, 0, 0])
    np.testing.assert_array_equal(hist[0, 1], [0, 0, 0, 1])


def test_describe_fitted_edges_and_single_bin():
    images = _known_distributions(num_images=5)
    edges = fit_bin_edges(StubBank(), _dataset(images, 5), num_bins=6, fine_bins=FINE,
                          progress=False)
    hist = describe(StubBank(), edges, _dataset(images, 2, labels=False), progress=False)
    assert hist.shape == (5, 5, 6)
    np.testing.assert_allclose(hist, _reference_histograms(images, edges), atol=1e-6)
    one_bin = describe(StubBank(), edges[:, [0, -1]], _dataset(images, 2), progress=False)
    np.testing.assert_array_equal(one_bin, np.ones((5, 5, 1)))


def test_describe_batch_in_tf_function_with_tensor_edges():
    images = _known_distributions(num_images=3)
    edges = fit_bin_edges(StubBank(), _dataset(images, 3), num_bins=4, fine_bins=FINE,
                          progress=False)
    step = tf.function(lambda x, e: describe_batch(StubBank(), e, x))
    got = step(tf.constant(images), tf.constant(edges, tf.float32))
    np.testing.assert_allclose(got, _reference_histograms(images, edges), atol=1e-6)


def test_describe_edge_mismatch_errors():
    images = _known_distributions(num_images=2)
    good = np.tile(np.linspace(0, 1, 5), (5, 1))
    for bad, match in [
        (good[:4], r"\[5, >= 2\].*Received: bin_edges.shape=\(4, 5\)"),
        (good[0], r"bin_edges.shape=\(5,\)"),
        (good[:, :1], r"bin_edges.shape=\(5, 1\)"),
        (good[:, ::-1], "strictly increasing"),
    ]:
        with pytest.raises(ValueError, match=match):
            describe(StubBank(), bad, _dataset(images, 2), progress=False)
    with pytest.raises(ValueError, match=r"bin_edges.shape=\(3, 5\)"):
        describe_batch(StubBank(), tf.constant(good[:3]), images)


# --- channel_weights -------------------------------------------------------------


def test_channel_weights():
    np.testing.assert_allclose(channel_weights(StubBank()), [0.25, 0.25, 1 / 6, 1 / 6, 1 / 6])
    assert channel_weights(StubBank()).sum() == pytest.approx(1.0)
    np.testing.assert_allclose(channel_weights(StubBank(), [1.0, 3.0]), [0.5, 0.5, 1, 1, 1])
    with pytest.raises(ValueError, match=r"one weight per group \(2.*layer_weights=\[1.0\]"):
        channel_weights(StubBank(), [1.0])
    with pytest.raises(ValueError, match="non-negative. Received: layer_weights="):
        channel_weights(StubBank(), [0.5, -0.1])
    with pytest.raises(ValueError, match="non-negative"):
        channel_weights(StubBank(), [0.5, float("nan")])
