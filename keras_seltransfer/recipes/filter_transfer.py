"""Recipe of `--method=filter_transfer`: selective filter transfer (Jung & Kim, 2019).

The classifier built on the pretrained backbone is scored filter by filter
on the target training images (`config.relevance_statistic`; "kl" also
reads a sample of `config.source`'s training split); per conv layer the
top `config.transfer_ratio` of the filters keep their pretrained weights
and the rest are re-initialised (`selective_filter_transfer`, with
`config.reinit_next`). When the run's BatchNorm is frozen, the BatchNorm
channels of the re-initialised filters train as `config.reinit_batchnorm`
says (`set_reinitialized_batchnorm`; with trained BatchNorm every channel
trains anyway). With `config.prune_period` > 0, a `RelevancePruning`
callback then prunes the least relevant filters during fine-tuning (masks
or re-initialises them, `config.prune_action`) up to
`config.prune_fraction` of each layer by the last epoch. Everything is
trained. `model.keras` and the SavedModel keep the `FilterMask` layers
(the SavedModel serves exactly what `model.keras` computes;
`fold_filter_masks` gives the same network without them); the report lists
per layer how many filters were transferred, re-initialised and masked.
"""

import numpy as np

from keras_seltransfer import data as data_lib
from keras_seltransfer.callbacks.relevance_pruning import RelevancePruning
from keras_seltransfer.models.classifier import set_batchnorm_mode
from keras_seltransfer.models.filter_transfer import filter_transfer_summary
from keras_seltransfer.models.filter_transfer import selective_filter_transfer
from keras_seltransfer.models.filter_transfer import set_reinitialized_batchnorm
from keras_seltransfer.recipes import MethodSetup

# Source images the "kl" statistic compares the target images with: enough
# for stable 32-bin histograms per filter, quick to stream.
SOURCE_SAMPLE_SIZE = 2000

# Target images each RelevancePruning round re-scores the filters on.
PRUNING_SAMPLE_SIZE = 1024


def _sample(source, size, seed):
    if len(source) <= size:
        return source
    ids = np.random.default_rng(seed).choice(len(source), size=size, replace=False)
    return source.subset(np.sort(ids))


def source_sample(config, channels, size=SOURCE_SAMPLE_SIZE):
    """A fixed random sample of `config.source`'s training split (at most
    `size` images, drawn with `config.seed`), as an unshuffled dataset of
    image batches resized to `config.image_size` with `channels` channels."""
    from keras_seltransfer.training import load_train_test

    source, _ = load_train_test(config.source, config.test_fraction, config.split_seed)
    return data_lib.make_dataset(
        _sample(source, size, config.seed), config.image_size, config.batch_size, channels=channels
    )


def setup(config, classifier, context):
    """The `MethodSetup` of selective filter transfer (see the module docstring)."""
    channels = context.channels
    target = data_lib.make_dataset(
        context.train, config.image_size, config.batch_size, channels=channels
    )
    source = (
        source_sample(config, channels) if config.relevance_statistic == "kl" else None
    )
    with context.strategy.scope():
        model = selective_filter_transfer(
            classifier,
            target,
            ratio=config.transfer_ratio,
            statistic=config.relevance_statistic,
            source_data=source,
            reinit_next=config.reinit_next,
            seed=config.seed,
        )
        set_batchnorm_mode(model, config.batchnorm_mode)
        if config.batchnorm_mode == "frozen":
            set_reinitialized_batchnorm(model, config.reinit_batchnorm)

    pruning = None
    if config.prune_period > 0:
        sample = _sample(context.train, PRUNING_SAMPLE_SIZE, config.seed)
        pruning = RelevancePruning(
            data_lib.make_dataset(sample, config.image_size, config.batch_size, channels=channels),
            statistic=config.relevance_statistic,
            period=config.prune_period,
            final_fraction=config.prune_fraction,
            action=config.prune_action,
            source_data=source,
            seed=config.seed,
            verbose=min(config.verbose, 1),
        )
        pruning.set_model(model)

    def report():
        extra = {
            "statistic": config.relevance_statistic,
            "transfer_ratio": config.transfer_ratio,
            "reinit_next": config.reinit_next,
            "reinit_batchnorm": (
                config.reinit_batchnorm if config.batchnorm_mode == "frozen" else "train"
            ),
            "layers": filter_transfer_summary(model),
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
        model=model,
        callbacks=[pruning] if pruning is not None else [],
        state_variables=pruning.state_variables if pruning is not None else {},
        report=report,
    )


__all__ = ["PRUNING_SAMPLE_SIZE", "SOURCE_SAMPLE_SIZE", "setup", "source_sample"]
