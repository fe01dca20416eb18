"""`--method=filter_transfer`: selective filter transfer (Jung & Kim, 2019).

The classifier built on the pretrained backbone is scored filter by filter
on the target training images (`relevance_statistic`; "kl" also reads a
sample of `FinetuneConfig.source`'s training split); per conv layer the top
`transfer_ratio` of the filters keep their pretrained weights and the rest
are re-initialised (`models.selective_filter_transfer`, with `reinit_next`).
When the run's BatchNorm is frozen, the BatchNorm channels of the
re-initialised filters train as `reinit_batchnorm` says (with trained
BatchNorm every channel trains anyway). With `prune_period` > 0, a
`RelevancePruning` callback then prunes the least relevant filters during
fine-tuning (masks or re-initialises them, `prune_action`) up to
`prune_fraction` of each layer by the last epoch. Everything is trained.
`model.keras` and the SavedModel keep the `FilterMask` layers
(`fold_filter_masks` gives the same network without them); the report lists
per layer how many filters were transferred, re-initialised and masked.
"""

import dataclasses

import numpy as np

from keras_seltransfer import data as data_lib
from keras_seltransfer.callbacks.relevance_pruning import ACTIONS as PRUNE_ACTIONS
from keras_seltransfer.callbacks.relevance_pruning import RelevancePruning
from keras_seltransfer.methods.base import Method
from keras_seltransfer.methods.base import MethodSetup
from keras_seltransfer.utils.options import option
from keras_seltransfer.methods.registry import register
from keras_seltransfer.models.classifier import set_batchnorm_mode
from keras_seltransfer.models.filter_transfer import REINIT_BATCHNORM
from keras_seltransfer.models.filter_transfer import filter_transfer_summary
from keras_seltransfer.models.filter_transfer import selective_filter_transfer
from keras_seltransfer.models.filter_transfer import set_reinitialized_batchnorm
from keras_seltransfer.models.relevance import STATISTICS as RELEVANCE_STATISTICS

# Source images the "kl" statistic compares the target images with: enough
# for stable 32-bin histograms per filter, quick to stream.
SOURCE_SAMPLE_SIZE = 2000

# Target images each RelevancePruning round re-scores the filters on.
PRUNING_SAMPLE_SIZE = 1024


@dataclasses.dataclass
class FilterTransferOptions:
    """Options of `--method=filter_transfer`."""

    relevance_statistic: str = option(
        "mean",
        "filter_transfer: filter relevance: mean (mean post-activation response), frequency "
        "(fraction of positive responses) or kl (symmetric KL between the filter's response "
        "distributions on source and target data; uses --source).",
        choices=RELEVANCE_STATISTICS,
    )
    transfer_ratio: float = option(
        0.5,
        "filter_transfer: fraction of each layer's filters transferred (the most relevant); "
        "the rest are re-initialised.",
        above=0.0, upper=1.0,
    )
    reinit_next: bool = option(
        False,
        "filter_transfer: also re-initialise the next layer's input slices of the "
        "re-initialised filters (the next layers' pretrained weights would otherwise read "
        "random channels).",
    )
    reinit_batchnorm: str = option(
        "channels",
        "filter_transfer with frozen BatchNorm: what the BatchNorm channels of re-initialised "
        "filters do: channels trains them (batch statistics, moving statistics kept current, "
        "learnt scale and offset) while transferred channels keep their pretrained ones; "
        "layer trains every BatchNorm layer holding a re-initialised channel; frozen keeps "
        "them at scale 1, offset 0 and statistics estimated once at initialisation.",
        choices=REINIT_BATCHNORM,
    )
    prune_period: int = option(
        0,
        "filter_transfer: epochs between relevance-pruning rounds during fine-tuning "
        "(0: none).",
        lower=0,
    )
    prune_fraction: float = option(
        0.25,
        "filter_transfer: fraction of each layer's filters pruned by the end of training.",
        lower=0.0, below=1.0,
    )
    prune_action: str = option(
        "mask", "filter_transfer: mask or re-initialise pruned filters.", choices=PRUNE_ACTIONS
    )


def sample(images, size, seed):
    """At most `size` of `images` (an `ImageSource`), drawn without
    replacement with `seed`, in their original order."""
    if len(images) <= size:
        return images
    ids = np.random.default_rng(seed).choice(len(images), size=size, replace=False)
    return images.subset(np.sort(ids))


def source_sample(config, channels, size=SOURCE_SAMPLE_SIZE):
    """A fixed random sample of `config.source`'s training split (at most
    `size` images, drawn with `config.seed`), as an unshuffled dataset of
    image batches resized to `config.image_size` with `channels` channels."""
    source, _ = data_lib.load_train_test(config.source, config.test_fraction, config.split_seed)
    return data_lib.make_dataset(
        sample(source, size, config.seed), config.image_size, config.batch_size, channels=channels
    )


class FilterTransfer(Method):
    """Transfer only the relevant pretrained filters."""

    name = "filter_transfer"
    summary = (
        "selective filter transfer (Jung & Kim, 2019): only the pretrained filters most "
        "relevant to the target images are transferred, the rest re-initialised"
    )
    options = (FilterTransferOptions,)
    order = 30

    def setup(self, config, model, context):
        """See the module docstring."""
        channels = int(model.inputs[0].shape[-1])
        target = data_lib.make_dataset(
            context.train, config.image_size, config.batch_size, channels=channels
        )
        source = source_sample(config, channels) if config.relevance_statistic == "kl" else None
        with context.strategy.scope():
            transferred = selective_filter_transfer(
                model,
                target,
                ratio=config.transfer_ratio,
                statistic=config.relevance_statistic,
                source_data=source,
                reinit_next=config.reinit_next,
                seed=config.seed,
            )
            set_batchnorm_mode(transferred, config.batchnorm_mode)
            if config.batchnorm_mode == "frozen":
                set_reinitialized_batchnorm(transferred, config.reinit_batchnorm)

        pruning = None
        if config.prune_period > 0:
            images = sample(context.train, PRUNING_SAMPLE_SIZE, config.seed)
            pruning = RelevancePruning(
                data_lib.make_dataset(
                    images, config.image_size, config.batch_size, channels=channels
                ),
                statistic=config.relevance_statistic,
                period=config.prune_period,
                final_fraction=config.prune_fraction,
                action=config.prune_action,
                source_data=source,
                seed=config.seed,
                verbose=min(config.verbose, 1),
            )
            pruning.set_model(transferred)

        def report(fit_info):
            extra = {
                "statistic": config.relevance_statistic,
                "transfer_ratio": config.transfer_ratio,
                "reinit_next": config.reinit_next,
                "reinit_batchnorm": (
                    config.reinit_batchnorm if config.batchnorm_mode == "frozen" else "train"
                ),
                "layers": filter_transfer_summary(transferred),
            }
            if pruning is not None:
                extra["pruning"] = {
                    "period": config.prune_period,
                    "final_fraction": config.prune_fraction,
                    "action": config.prune_action,
                    "rounds": pruning.rounds,
                }
            return {"filter_transfer": extra}

        return MethodSetup(
            model=transferred,
            callbacks=[pruning] if pruning is not None else [],
            state_variables=pruning.state_variables if pruning is not None else {},
            report=report,
        )


register(FilterTransfer())
