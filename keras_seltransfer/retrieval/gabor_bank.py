"""GaborBank: a fixed bank of Gabor filters whose responses describe an image.

Selective joint fine-tuning (Ge & Yu, CVPR 2017) describes images by the
responses of a filter bank; its Gabor bank is 4 scales x 6 orientations,
real and imaginary parts (48 filters). The paper publishes no Gabor
parameters [inferred: frequencies 0.05/0.1/0.2/0.4 cycles per pixel,
orientations k*pi/6]. A bank follows the protocol of
`keras_seltransfer.retrieval.filter_banks`.
"""

import math

import numpy as np
import tensorflow as tf

from keras_seltransfer.data.pipeline import LUMA
from keras_seltransfer.utils.histograms import image_tensor


# [inferred] The paper uses 4 scales x 6 orientations but publishes no
# frequencies. These are one octave apart, from 20 to 2.5 pixels per cycle
# (0.5, the Nyquist frequency, would be 2).
DEFAULT_FREQUENCIES = (0.05, 0.1, 0.2, 0.4)


# Largest kernel size chosen automatically. A 3-sigma window at f = 0.05 is
# 69 px wide, larger than the small images this toolkit targets.
MAX_AUTO_KERNEL_SIZE = 31


PADDINGS = ("symmetric", "valid")


def _gabor_sigma(frequency, bandwidth):
    # scikit-image's `gabor_kernel` convention: the Gaussian's standard
    # deviation for a half-magnitude bandwidth of `bandwidth` octaves.
    prefactor = (
        (1.0 / math.pi)
        * math.sqrt(math.log(2.0) / 2.0)
        * (2.0**bandwidth + 1.0)
        / (2.0**bandwidth - 1.0)
    )
    return prefactor / frequency


def _check_gabor_args(frequencies, num_orientations, kernel_size, bandwidth):
    try:
        freqs = tuple(float(f) for f in frequencies)
    except (TypeError, ValueError) as e:
        raise ValueError(
            "Expected `frequencies` to be a sequence of numbers. "
            f"Received: frequencies={frequencies!r}"
        ) from e
    if not freqs or not all(0.0 < f <= 0.5 for f in freqs):
        raise ValueError(
            "Expected `frequencies` to be a non-empty sequence of frequencies in "
            "(0, 0.5] cycles per pixel (0.5 is the Nyquist frequency). "
            f"Received: frequencies={frequencies!r}"
        )
    if (
        isinstance(num_orientations, bool)
        or not isinstance(num_orientations, (int, np.integer))
        or num_orientations < 1
    ):
        raise ValueError(
            "Expected `num_orientations` to be a positive int. "
            f"Received: num_orientations={num_orientations!r}"
        )
    if kernel_size is not None and (
        isinstance(kernel_size, bool)
        or not isinstance(kernel_size, (int, np.integer))
        or kernel_size < 1
        or kernel_size % 2 == 0
    ):
        raise ValueError(
            "Expected `kernel_size` to be None or a positive odd int. "
            f"Received: kernel_size={kernel_size!r}"
        )
    if isinstance(bandwidth, bool) or not (
        isinstance(bandwidth, (int, float, np.number))
        and math.isfinite(bandwidth)
        and bandwidth > 0
    ):
        raise ValueError(
            "Expected `bandwidth` to be a positive number (octaves). "
            f"Received: bandwidth={bandwidth!r}"
        )
    if kernel_size is not None:
        kernel_size = int(kernel_size)
    return freqs, int(num_orientations), kernel_size, float(bandwidth)


def gabor_kernels(
    frequencies=DEFAULT_FREQUENCIES, num_orientations=6, kernel_size=None, bandwidth=1.0
):
    """Real and imaginary parts of a bank of complex Gabor filters.

    Each filter is

        g(x, y) = 1 / (2 pi sigma^2) * exp(-(x'^2 + y'^2) / (2 sigma^2))
                  * exp(i 2 pi f x'),
        x' = x cos(theta) + y sin(theta),
        y' = -x sin(theta) + y cos(theta),

    with sigma = (1/pi) sqrt(ln 2 / 2) (2^b + 1) / (2^b - 1) / f for a
    bandwidth of b octaves, as scikit-image's `gabor_kernel`. Coordinates
    are pixel offsets from the kernel centre with x along the columns
    (rightwards) and y along the rows (downwards): `kernel[r, c]` holds
    g(c - h, r - h) for half size h. So theta = 0 oscillates along x and
    responds to vertical stripes, and theta turns from +x towards +y
    (clockwise on screen).

    Each filter is non-zero on its own centred square of half size
    ceil(3 sigma) (as scikit-image) and zero-padded to the common size, or
    cut by it when the common size is smaller.

    Defaults [inferred; the paper publishes neither]: frequencies 0.05,
    0.1, 0.2 and 0.4 cycles per pixel (20 to 2.5 pixels per cycle, one
    octave apart), theta = j pi / 6 for j = 0..5, bandwidth 1 octave: the
    paper's 4 scales x 6 orientations x (real, imaginary) = 48 filters.

    Kernel size: with `kernel_size=None` the common size is the smallest odd
    size holding every filter's 3-sigma square, capped at
    `MAX_AUTO_KERNEL_SIZE` (31) so that the filters fit the small images
    this toolkit targets. With the defaults the 3-sigma size of f = 0.05
    is 69 and of f = 0.1 is 35, so the cap cuts the f = 0.05 envelope at
    +-1.33 sigma (the Gaussian keeps 69% of its mass) and the f = 0.1
    envelope at +-2.67 sigma (99%). Pass `kernel_size=69` for untruncated
    filters on large images.

    DC: the mean is not subtracted, so the filters are the closed form
    above exactly. An untruncated real part sums to about 0.001 to 0.002
    (it nearly ignores flat brightness); the capped f = 0.05 real parts sum
    to about -0.07, so those channels also respond weakly to brightness.
    Imaginary parts are odd and sum to zero.

    Args:
        frequencies: spatial frequencies in cycles per pixel, in (0, 0.5].
        num_orientations: number of orientations, theta = j pi / n.
        kernel_size: odd size of the square kernels, or None for automatic.
        bandwidth: half-magnitude frequency bandwidth in octaves.

    Returns:
        np.float32 array `[k, k, 1, 2 * len(frequencies) * num_orientations]`:
        for each frequency, for each orientation, the real part then the
        imaginary part. As `tf.nn.conv2d` computes a cross-correlation,
        convolving with it correlates the image with g.

    Raises:
        ValueError: for out-of-range arguments.

    Example:

    >>> gabor_kernels().shape
    (31, 31, 1, 48)
    >>> gabor_kernels([0.25], num_orientations=2, kernel_size=7).shape
    (7, 7, 1, 4)
    """
    freqs, num_orientations, kernel_size, bandwidth = _check_gabor_args(
        frequencies, num_orientations, kernel_size, bandwidth
    )
    sigmas = [_gabor_sigma(f, bandwidth) for f in freqs]
    half_sizes = [int(math.ceil(3.0 * s)) for s in sigmas]
    if kernel_size is None:
        kernel_size = min(2 * max(half_sizes) + 1, MAX_AUTO_KERNEL_SIZE)
    h = kernel_size // 2
    y, x = np.mgrid[-h : h + 1, -h : h + 1].astype(np.float64)
    filters = []
    for f, sigma, support in zip(freqs, sigmas, half_sizes):
        inside = (np.abs(x) <= support) & (np.abs(y) <= support)
        for j in range(num_orientations):
            theta = j * math.pi / num_orientations
            xr = x * math.cos(theta) + y * math.sin(theta)
            yr = -x * math.sin(theta) + y * math.cos(theta)
            g = (
                np.exp(-(xr**2 + yr**2) / (2.0 * sigma**2))
                / (2.0 * math.pi * sigma**2)
                * np.exp(2j * math.pi * f * xr)
            )
            g = np.where(inside, g, 0.0)
            filters.extend([g.real, g.imag])
    return np.stack(filters, axis=-1)[:, :, None, :].astype(np.float32)


class GaborBank:
    """A Gabor filter bank on grayscale images, as the paper's Gabor variant.

    Images are converted to grayscale in [0, 1] (ITU-R 601-2 luma of RGB
    pixels divided by 255; one-channel images are divided by 255) and
    correlated with `gabor_kernels(...)` as one group named `"gabor"`.

    Padding: `"symmetric"` (default) mirrors the image about its border
    (edge pixel repeated, NumPy's and TensorFlow's `SYMMETRIC`) before a
    valid convolution, so responses have the image's size. Zero padding
    would put a step edge around every image, and with a 31 px kernel on a
    64 px image 72% of the positions lie within reach of the border, so
    those artificial edges would dominate the histograms; a valid
    convolution would keep only the central 34x34 positions and fail on
    images smaller than the kernel. `"valid"` is offered for large images.

    Args:
        frequencies: spatial frequencies in cycles per pixel, in (0, 0.5].
        num_orientations: number of orientations, theta = j pi / n.
        kernel_size: odd kernel size, or None (see `gabor_kernels`).
        bandwidth: frequency bandwidth in octaves.
        padding: `"symmetric"` or `"valid"`.

    Call arguments:
        images: float `[batch, height, width, 1 or 3]` raw pixels in [0, 255].

    Returns:
        A one-element list: float32 `[batch, height', width', 2 * F * O]`.

    Example:

    ```python
    bank = GaborBank()
    (responses,) = bank(images)  # [batch, height, width, 48]
    ```

    Reference:
        Ge & Yu, "Borrowing Treasures from the Wealthy: Deep Transfer
        Learning through Selective Joint Fine-Tuning", CVPR 2017.
    """

    def __init__(
        self,
        frequencies=DEFAULT_FREQUENCIES,
        num_orientations=6,
        kernel_size=None,
        bandwidth=1.0,
        padding="symmetric",
    ):
        freqs, num_orientations, kernel_size, bandwidth = _check_gabor_args(
            frequencies, num_orientations, kernel_size, bandwidth
        )
        if padding not in PADDINGS:
            raise ValueError(
                f"Expected `padding` to be one of {PADDINGS}. Received: padding={padding!r}"
            )
        self.frequencies = freqs
        self.num_orientations = num_orientations
        self.kernel_size = kernel_size
        self.bandwidth = bandwidth
        self.padding = padding
        self.kernels = gabor_kernels(freqs, num_orientations, kernel_size, bandwidth)

    @property
    def groups(self):
        return [("gabor", int(self.kernels.shape[-1]))]

    @property
    def num_channels(self):
        return int(self.kernels.shape[-1])

    def grayscale(self, images):
        """Grayscale in [0, 1] `[batch, height, width, 1]` of raw images."""
        images = image_tensor(images)
        channels = images.shape[-1]
        if channels == 3:
            luma = tf.constant(LUMA, tf.float32)
            grey = tf.reduce_sum(images * luma, axis=-1, keepdims=True)
        elif channels == 1:
            grey = images
        else:
            raise ValueError(
                "GaborBank expects images with 1 or 3 channels. "
                f"Received: images.shape={images.shape}"
            )
        return grey / 255.0

    def __call__(self, images):
        grey = self.grayscale(images)
        size = self.kernels.shape[0]
        half = size // 2
        height, width = grey.shape[1], grey.shape[2]
        if self.padding == "symmetric":
            # SYMMETRIC padding cannot reach further than the image itself.
            if (height is not None and height < half) or (width is not None and width < half):
                raise ValueError(
                    f"Images must be at least {half} px high and wide for "
                    f"symmetric padding with {size}x{size} kernels. "
                    f"Received: images.shape={images.shape}"
                )
            grey = tf.pad(grey, [[0, 0], [half, half], [half, half], [0, 0]], mode="SYMMETRIC")
        elif (height is not None and height < size) or (width is not None and width < size):
            raise ValueError(
                f"Images must be at least {size} px high and wide for valid "
                f"padding with {size}x{size} kernels. Received: images.shape={images.shape}"
            )
        kernels = tf.constant(self.kernels)
        return [tf.nn.conv2d(grey, kernels, strides=1, padding="VALID")]

    def get_config(self):
        return {
            "type": "gabor",
            "frequencies": list(self.frequencies),
            "num_orientations": self.num_orientations,
            "kernel_size": self.kernel_size,
            "bandwidth": self.bandwidth,
            "padding": self.padding,
        }

    def __repr__(self):
        return (
            f"GaborBank(frequencies={list(self.frequencies)}, num_orientations="
            f"{self.num_orientations}, kernel_size={self.kernels.shape[0]}, "
            f"bandwidth={self.bandwidth}, padding={self.padding!r})"
        )


__all__ = [
    "DEFAULT_FREQUENCIES",
    "GaborBank",
    "MAX_AUTO_KERNEL_SIZE",
    "PADDINGS",
    "gabor_kernels",
]
