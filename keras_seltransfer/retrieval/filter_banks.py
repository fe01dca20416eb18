"""Low-level filter banks whose response histograms describe an image.

Selective joint fine-tuning (Ge & Yu, CVPR 2017) retrieves source images
whose low-level statistics resemble the target images'. The statistics are
histograms of the responses of a bank of filters: either a fixed Gabor bank
or the first convolutional layers of the pretrained network. `gabor_bank`
and `conv_bank` hold the banks, this module the protocol they follow and
`bank_from_config`; `keras_seltransfer.utils.histograms` turns their
responses into histograms.

A bank is any object with:

- `__call__(images)`: float32 `[batch, height, width, channels]` raw pixels
  in [0, 255] (tensor or array) to a list of float32 response tensors, one
  per group, each `[batch, height', width', channels_g]`, computed with
  TensorFlow ops (so it runs inside `tf.function`, on any device and under a
  distribution strategy);
- `groups`: list of `(name, num_channels)`, in output order;
- `num_channels`: the total number of channels over all groups;
- `get_config()`: a JSON-serialisable dict with a `"type"` key, which
  `bank_from_config` turns back into the bank.
"""

import warnings

from keras_seltransfer.retrieval.conv_bank import ConvBank
from keras_seltransfer.retrieval.gabor_bank import GaborBank

# The kinds of filter bank, as `get_config()["type"]` names them: the one
# list of bank choices (the index configuration and the apps use it).
BANKS = ("conv", "gabor")


def bank_from_config(config, backbone=None):
    """Rebuilds a bank from its `get_config()`.

    Args:
        config: a dict from `GaborBank.get_config()` or
            `ConvBank.get_config()`.
        backbone: the backbone a conv bank taps (required for
            `"type": "conv"`; ignored for Gabor banks). A warning is issued
            when its name differs from the one the bank was built on.

    Returns:
        A `GaborBank` or `ConvBank`.

    Raises:
        ValueError: for an unknown type, or a conv bank without a backbone.

    Example:

    >>> bank = bank_from_config(GaborBank(num_orientations=4).get_config())
    >>> type(bank).__name__, bank.num_channels
    ('GaborBank', 32)
    """
    if not isinstance(config, dict) or config.get("type") not in BANKS:
        raise ValueError(
            "Expected `config` to be a bank config dict with 'type' 'gabor' or "
            f"'conv'. Received: config={config!r}"
        )
    config = dict(config)
    kind = config.pop("type")
    if kind == "gabor":
        return GaborBank(**config)
    if backbone is None:
        raise ValueError(
            "A conv bank taps a backbone: pass the backbone it was built on. "
            "Received: backbone=None"
        )
    name = config.pop("backbone", None)
    if name is not None and name != backbone.name:
        warnings.warn(
            f"The conv bank was built on backbone {name!r} but is rebuilt on "
            f"{backbone.name!r}; descriptors are only comparable when the "
            "weights are the same.",
            stacklevel=2,
        )
    return ConvBank(backbone, **config)


__all__ = ["BANKS", "bank_from_config"]
