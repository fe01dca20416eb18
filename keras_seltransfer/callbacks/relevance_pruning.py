"""RelevancePruning: prunes the least relevant filters while fine-tuning.

Selective filter transfer (Jung & Kim, 2019) decides once, before
fine-tuning, which pretrained filters are relevant to the target data. This
callback keeps deciding during fine-tuning [inferred; the paper's abstract
describes no such schedule]: every `period` epochs it re-scores the filters
of the current network on (a sample of) the target data with a statistic of
`keras_seltransfer.relevance`, and prunes the lowest-scoring ones by
assigning to variables, so the training step is neither rebuilt nor
retraced. The pruned share grows linearly to `final_fraction` by the last
epoch (`pruning_fraction`).
"""

import warnings

import keras
import numpy as np
import tensorflow as tf

from keras_seltransfer.models.filter_masking import filter_masks
from keras_seltransfer.models.filter_reinit import BN_STATISTICS
from keras_seltransfer.models.filter_reinit import reinitialize_filters
from keras_seltransfer.models.filter_selection import prune_lowest
from keras_seltransfer.models.relevance import check_statistic
from keras_seltransfer.models.relevance import FilterResponses
from keras_seltransfer.utils.histograms import image_batches
from keras_seltransfer.utils.validation import check_choice
from keras_seltransfer.utils.validation import check_fraction
from keras_seltransfer.utils.validation import check_int

ACTIONS = ("mask", "reinit")


def pruning_fraction(epoch, *, epochs, final_fraction, period=1):
    """The share of filters pruned from the start of `epoch` on, when a round starts there.

    Rounds run at the *start* of epochs (so the network always trains after
    a change, and the final share is in force during the last epoch): at
    every epoch e >= 1 with e % period == 0, and at the last epoch
    e = epochs - 1. A round at epoch e prunes up to

        final_fraction * e / (epochs - 1)

    of each layer's filters: a linear schedule from 0 (epoch 0, never
    pruned) to `final_fraction` at the last epoch. With `epochs` = 1 there
    is no round.

    Args:
        epoch: the 0-based epoch about to start.
        epochs: the total number of epochs of the run.
        final_fraction: the share pruned at the last epoch, in [0, 1).
        period: epochs between rounds (a positive int).

    Returns:
        The fraction (a float) when a round starts at `epoch`, else None.

    Raises:
        ValueError: for a negative `epoch`, `epochs` < 1, `period` < 1 or a
            `final_fraction` outside [0, 1).

    Example:

    >>> [pruning_fraction(e, epochs=5, final_fraction=0.4, period=2) for e in range(5)]
    [None, None, 0.2, None, 0.4]
    """
    epoch = check_int(epoch, "epoch", 0)
    epochs = check_int(epochs, "epochs", 1)
    period = check_int(period, "period", 1)
    final_fraction = check_fraction(final_fraction, "final_fraction", high_open=True)
    if epoch < 1 or epoch >= epochs or (epoch % period and epoch != epochs - 1):
        return None
    return final_fraction * epoch / (epochs - 1)


class RelevancePruning(keras.callbacks.Callback):
    """Prunes each conv layer's least relevant filters on a schedule during `fit`.

    The model must have a `FilterMask` after each conv layer to prune (as
    `selective_filter_transfer` or `add_filter_masks` builds it). At the
    start of every round epoch (see `pruning_fraction`), the callback:

    1. scores the filters of the current weights on `data` with
       `relevance.filter_relevance(statistic)` (in inference mode, under the
       model's distribution strategy);
    2. per layer, grows the pruned set to the scheduled share with
       `relevance.prune_lowest`: pruned filters stay pruned, and the
       lowest-scoring others join them;
    3. applies `action` to the newly pruned filters:
       - `"mask"`: sets their `FilterMask.mask` entries to 0, so they are
         removed from the network (their channels are exactly zero);
       - `"reinit"`: re-initialises them in place with
         `models.filter_reinit.reinitialize_filters` (kernel slice, bias,
         BatchNormalization channel, `transferred` record set to 0), so a
         fresh filter replaces an irrelevant one; each filter is
         re-initialised at most once per run of pruning.

    What is pruned is model state: the masks are model variables (saved
    with the model and its checkpoints) and the pruned flags of `"reinit"`
    are `state_variables`, which `TrainingCheckpoint` saves for resume.
    A filter counts as pruned when its flag is set or its mask is 0.
    Calling `fit` again continues from that state; `reset_state()` clears
    the flags (masks are left to the model). `on_train_begin` resets only
    per-run state: the epoch count and the `rounds` log.

    Each epoch adds to the logs (so to the History and, when a
    `keras.callbacks.TensorBoard` comes after this callback, to
    TensorBoard): `pruned_fraction` (the share of the scored filters
    pruned during this epoch) and `pruned_filters` (filters newly pruned at
    its start, 0 between rounds). `rounds` lists every round of the run:
    `{"epoch", "fraction", "pruned": {layer: newly pruned}}`.

    With `keras.callbacks.EarlyStopping(restore_best_weights=True)`, the
    restored weights include the masks of the best epoch.

    Args:
        data: a finite `tf.data.Dataset` of target image batches or
            `(images, labels)` batches, unshuffled and unaugmented (a sample
            of the training images is enough); read once per round (three
            times for "kl", plus the BatchNormalization estimate of
            `"reinit"`).
        statistic: `"mean"`, `"frequency"` or `"kl"` (see
            `relevance.filter_statistics`).
        period: epochs between rounds.
        final_fraction: the share of each layer's filters pruned by the last
            epoch, in [0, 1).
        action: `"mask"` or `"reinit"`.
        source_data: source images, required for `"kl"`.
        layers: conv layer names to prune (each must have a FilterMask);
            None prunes every conv layer that has one.
        epochs: total epochs of the schedule; None takes `fit`'s `epochs`.
        seed: base seed of `"reinit"` draws (offset by the epoch); None uses
            NumPy's global generator.
        bn_statistics: `"reinit"`: moving statistics of re-initialised
            channels, `"target"` (estimated on `data`) or `"initializer"`.
        num_bins: bins per filter of `"kl"`.
        verbose: 1 prints a line per round.

    Example:

    ```python
    model = selective_filter_transfer(classifier, target, ratio=0.75)
    pruning = RelevancePruning(target, period=2, final_fraction=0.25)
    model.compile(...)
    model.fit(train, epochs=10, callbacks=[pruning])
    filter_transfer_summary(model)["block1_conv"]["masked"]
    ```

    Reference:
        Jung & Kim, "Selective filter transfer", 2019.
    """

    def __init__(
        self,
        data,
        *,
        statistic="mean",
        period=1,
        final_fraction=0.25,
        action="mask",
        source_data=None,
        layers=None,
        epochs=None,
        seed=None,
        bn_statistics="target",
        num_bins=32,
        verbose=0,
    ):
        super().__init__()
        check_statistic(statistic)
        image_batches(data, "data")
        check_choice(action, "action", ACTIONS)
        check_choice(bn_statistics, "bn_statistics", BN_STATISTICS)
        if statistic == "kl":
            if source_data is None:
                raise ValueError(
                    "The 'kl' statistic compares each filter's responses on source and "
                    "target images: pass a sample of the source images as `source_data`. "
                    "Received: source_data=None"
                )
            image_batches(source_data, "source_data")
        self.data = data
        self.statistic = statistic
        self.period = check_int(period, "period", 1)
        self.final_fraction = check_fraction(
            final_fraction, "final_fraction", high_open=True
        )
        self.action = action
        self.source_data = source_data
        self.layers = None if layers is None else [str(name) for name in layers]
        self.epochs = None if epochs is None else check_int(epochs, "epochs", 1)
        self.seed = seed
        self.bn_statistics = bn_statistics
        self.num_bins = num_bins
        self.verbose = verbose
        self._bound = None
        self._masks = {}
        self._flags = {}
        self._responses = None
        self.rounds = []
        self._run_epochs = None
        self._newly_pruned = 0

    def set_model(self, model):
        super().set_model(model)
        if model is not self._bound:
            self._bind(model)

    def _bind(self, model):
        masks = filter_masks(model)
        if self.layers is not None:
            missing = [name for name in self.layers if name not in masks]
            if missing:
                raise ValueError(
                    f"RelevancePruning needs a FilterMask after each conv layer it prunes; "
                    f"{missing} have none (build the model with selective_filter_transfer "
                    f"or add_filter_masks). Received: layers={self.layers!r}"
                )
            masks = {name: masks[name] for name in masks if name in self.layers}
        if not masks:
            raise ValueError(
                f"RelevancePruning needs FilterMask layers after conv layers, and model "
                f"{model.name!r} has none: build it with selective_filter_transfer or "
                "add_filter_masks."
            )
        self._masks = masks
        self._flags = {
            name: tf.Variable(
                np.zeros(int(mask.mask.shape[0]), np.float32),
                trainable=False,
                name=f"relevance_pruning_{name}",
            )
            for name, mask in masks.items()
        }
        self._responses = None
        self._bound = model

    @property
    def state_variables(self):
        """`{name: tf.Variable}` of the pruned flags, for `TrainingCheckpoint`
        (call `set_model` first)."""
        if self._bound is None:
            raise ValueError(
                "RelevancePruning.state_variables exist once the callback knows its model: "
                "call `set_model(model)` first."
            )
        return {f"relevance_pruning/{name}": flag for name, flag in self._flags.items()}

    def reset_state(self):
        """Clears the pruned flags (the masks are left as they are)."""
        for flag in self._flags.values():
            flag.assign(tf.zeros_like(flag))

    def pruned(self):
        """`{layer: bool array [filters]}` of the filters counted as pruned."""
        return {
            name: (self._flags[name].numpy() > 0) | (np.asarray(mask.mask.numpy()) == 0)
            for name, mask in self._masks.items()
        }

    def on_train_begin(self, logs=None):
        epochs = self.epochs or (self.params or {}).get("epochs")
        if not epochs:
            raise ValueError(
                "RelevancePruning needs the number of epochs of its schedule: pass "
                "`epochs=` or train with model.fit(epochs=...)."
            )
        self._run_epochs = int(epochs)
        if self._run_epochs < 2 and self.final_fraction > 0:
            warnings.warn(
                "RelevancePruning prunes at the start of epochs 1 and later; a run of "
                f"{self._run_epochs} epoch prunes nothing.",
                stacklevel=2,
            )
        self.rounds = []
        self._newly_pruned = 0

    def on_epoch_begin(self, epoch, logs=None):
        self._newly_pruned = 0
        if self._run_epochs is None:
            self.on_train_begin()
        fraction = pruning_fraction(
            epoch, epochs=self._run_epochs, final_fraction=self.final_fraction, period=self.period
        )
        if fraction is None:
            return
        if self._responses is None:
            self._responses = FilterResponses(self.model, list(self._masks))
        scores = self._responses.relevance(
            self.data, self.statistic, source_data=self.source_data, num_bins=self.num_bins
        )
        before = self.pruned()
        changed, reinit = {}, {}
        for name, mask in self._masks.items():
            after = prune_lowest(scores[name], before[name], fraction)
            newly = after & ~before[name]
            changed[name] = int(newly.sum())
            if self.action == "mask" and newly.any():
                values = np.array(mask.mask.numpy())
                values[newly] = 0.0
                mask.mask.assign(values)
            elif newly.any():
                reinit[name] = newly
            self._flags[name].assign(after.astype(np.float32))
        if reinit:
            reinitialize_filters(
                self.model,
                reinit,
                seed=None if self.seed is None else int(self.seed) + epoch,
                bn_statistics=self.bn_statistics,
                data=self.data,
            )
        self._newly_pruned = sum(changed.values())
        self.rounds.append({"epoch": int(epoch), "fraction": float(fraction), "pruned": changed})
        if self.verbose:
            print(
                f"RelevancePruning: epoch {epoch + 1}: {self.action} {self._newly_pruned} "
                f"filters ({self.statistic}); {self._fraction():.3f} of the filters pruned."
            )

    def _fraction(self):
        pruned = self.pruned()
        total = sum(p.size for p in pruned.values())
        return float(sum(int(p.sum()) for p in pruned.values()) / total)

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            logs["pruned_fraction"] = self._fraction()
            logs["pruned_filters"] = float(self._newly_pruned)


__all__ = ["ACTIONS", "RelevancePruning", "pruning_fraction"]
