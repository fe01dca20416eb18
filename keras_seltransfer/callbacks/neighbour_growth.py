"""AdaptiveNeighbourGrowth: longer neighbour lists for hard target images.

Selective joint fine-tuning (Ge & Yu, CVPR 2017) grows the source neighbour
set of target images the network finds hard. After every round, for target
image `i` with predicted class distribution `p_i`:

    K_i += sigma0 * K0   if i is misclassified,
    K_i += sigma1 * K0   if i is correct but the entropy H(p_i) >= delta,
    K_i unchanged        otherwise,

capped at `k_max` (the neighbours stored per target). The paper reports the
increments as multiples of K0 (4 and 2 by default here).
"""

import math

import keras
import numpy as np
import tensorflow as tf


def prediction_entropy(probabilities):
    """Entropy in nats of each row of `probabilities` (`0 log 0 = 0`).

    Example:

    ```python
    prediction_entropy(np.array([[1.0, 0.0], [0.5, 0.5]]))
    # [0.0, 0.693...]: ln 2 for the uniform row
    ```
    """
    p = np.asarray(probabilities, dtype=np.float64)
    if p.ndim != 2:
        raise ValueError(
            f"Expected probabilities of shape [N, classes]. Received: shape {p.shape}"
        )
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, -p * np.log(p), 0.0)
    return terms.sum(axis=1)


def grow_neighbour_counts(counts, labels, probabilities, *, k0, sigma0=4.0, sigma1=2.0, delta, k_max):
    """Applies one round of the growth rule (a pure function).

    Args:
        counts: `[N]` current neighbour counts `K_i`.
        labels: `[N]` true target labels.
        probabilities: `[N, classes]` predicted class probabilities.
        k0: the initial count `K0`; increments are multiples of it.
        sigma0: increment factor for misclassified images.
        sigma1: increment factor for correct but uncertain images.
        delta: entropy threshold in nats.
        k_max: cap on `K_i`.

    Returns:
        `(new_counts, grown)`: int64 `[N]` counts and a bool `[N]` mask of
        the images whose count changed.

    Example:

    ```python
    counts, grown = grow_neighbour_counts(
        counts=np.array([4, 4, 4]),
        labels=np.array([0, 1, 0]),
        probabilities=np.array([[0.9, 0.1], [0.8, 0.2], [0.55, 0.45]]),
        k0=4,
        delta=0.5,
        k_max=32,
    )
    # counts: [4, 20, 12]: the misclassified image grows by sigma0 * K0 = 16,
    # the correct but uncertain one (entropy 0.69 > delta) by sigma1 * K0 = 8.
    # grown: [False, True, True]
    ```
    """
    counts = np.asarray(counts, dtype=np.int64)
    labels = np.asarray(labels, dtype=np.int64)
    probabilities = np.asarray(probabilities)
    if counts.ndim != 1 or labels.shape != counts.shape or len(probabilities) != len(counts):
        raise ValueError(
            "Expected counts [N], labels [N] and probabilities [N, classes] for the same N. "
            f"Received: {counts.shape}, {labels.shape}, {probabilities.shape}"
        )
    if sigma0 < 0 or sigma1 < 0 or k0 < 1 or k_max < 1:
        raise ValueError("Expected k0 >= 1, k_max >= 1 and non-negative sigmas.")
    wrong = probabilities.argmax(axis=1) != labels
    uncertain = ~wrong & (prediction_entropy(probabilities) >= delta)
    step = np.where(wrong, int(round(sigma0 * k0)), np.where(uncertain, int(round(sigma1 * k0)), 0))
    new_counts = np.minimum(counts + step, k_max)
    # Counts already above the cap (set by hand) are never lowered.
    new_counts = np.maximum(new_counts, counts)
    return new_counts, new_counts != counts


class AdaptiveNeighbourGrowth(keras.callbacks.Callback):
    """Grows the neighbour lists of hard target images during `fit`.

    Every `period` epochs it predicts the target training images, applies
    `grow_neighbour_counts` and stores the new counts in the sampler's
    variables; the joint pipeline samples from the new lists from the next
    epoch on (nothing is rebuilt or retraced).

    Each epoch it adds to the logs (and so to the History and, when a
    `keras.callbacks.TensorBoard` comes after it in the callback list, to
    TensorBoard): `neighbours_mean`, `neighbours_median`, `neighbours_max`
    (the distribution of `K_i`) and `neighbours_grown` (images grown at this
    epoch, 0 between rounds). With `draws_per_epoch` it also adds
    `draws_max`: the most times one target image will be drawn in the next
    epoch (`JointSampler.repetition_counts`), the repetition of hard images
    that the growth leaves; `max_draws` keeps it per epoch and
    `worst_histogram` the histogram of draws per target (index: draws,
    value: target images) of the epoch with the most. With `log_dir` it also writes a histogram of
    `K_i` (and of the draws per target) per round.

    Args:
        sampler: the `JointSampler` of the training pipeline.
        target_data: the target training images in the sampler's row order:
            an array, or a `tf.data.Dataset` of images or `(images, labels)`
            batches, unshuffled and unaugmented.
        labels: `[num_targets]` true labels of those images.
        period: epochs per round.
        sigma0: increment (in units of K0) for misclassified images.
        sigma1: increment (in units of K0) for correct, uncertain images.
        delta: entropy threshold in nats; None uses half the maximum entropy,
            `ln(classes) / 2` [inferred: the paper gives no value].
        output: output key of a multi-output model holding the target
            probabilities.
        batch_size: prediction batch size for array inputs.
        log_dir: optional TensorBoard directory for the `K_i` histogram.
        draws_per_epoch: target draws per epoch of the pipeline
            (`joint_steps_per_epoch(...) * global_batch_size // 2`); None
            skips the repetition diagnostic.

    Example:

    ```python
    # `target` and `source`: in-memory `ImageSource`s; `neighbour_ids`:
    # [num_targets, K] nearest source images per target (the source index);
    # `model`: a two-head model from `build_multitask_model`.
    sampler = JointSampler.from_neighbours(neighbour_ids, source.labels, k0=4)
    dataset = make_joint_dataset(target, source, sampler, image_size=64, global_batch_size=32)
    growth = AdaptiveNeighbourGrowth(sampler, target.images, target.labels, period=2)
    model.fit(dataset, epochs=10, callbacks=[sampler, growth])
    sampler.get_neighbour_counts()  # the grown K_i
    ```
    """

    def __init__(
        self,
        sampler,
        target_data,
        labels,
        *,
        period=2,
        sigma0=4.0,
        sigma1=2.0,
        delta=None,
        output="target",
        batch_size=128,
        log_dir=None,
        draws_per_epoch=None,
    ):
        super().__init__()
        if not getattr(sampler, "uses_neighbours", False):
            raise ValueError(
                "AdaptiveNeighbourGrowth needs a JointSampler built from neighbour lists "
                "(JointSampler.from_neighbours)."
            )
        if int(period) < 1:
            raise ValueError(f"`period` must be >= 1. Received: period={period}")
        labels = np.asarray(labels)
        if labels.shape != (sampler.num_targets,):
            raise ValueError(
                f"Expected {sampler.num_targets} labels (one per target row). "
                f"Received: shape {labels.shape}"
            )
        self.sampler = sampler
        self.target_data = target_data
        self.labels = labels
        self.period = int(period)
        self.sigma0 = float(sigma0)
        self.sigma1 = float(sigma1)
        self.delta = delta
        self.output = output
        self.batch_size = int(batch_size)
        self.log_dir = log_dir
        self.draws_per_epoch = None if draws_per_epoch is None else int(draws_per_epoch)
        self.max_draws = []
        self.worst_histogram = None
        self._writer = None

    def on_train_begin(self, logs=None):
        self.max_draws = []
        self.worst_histogram = None

    def _probabilities(self):
        predictions = self.model.predict(
            self.target_data,
            batch_size=None if isinstance(self.target_data, tf.data.Dataset) else self.batch_size,
            verbose=0,
        )
        if isinstance(predictions, dict):
            predictions = predictions[self.output]
        predictions = np.asarray(predictions)
        if len(predictions) != len(self.labels):
            raise ValueError(
                f"The target data gave {len(predictions)} predictions for "
                f"{len(self.labels)} labels; pass the sampler's target images, unshuffled."
            )
        return predictions

    def on_epoch_end(self, epoch, logs=None):
        grown = 0
        if (epoch + 1) % self.period == 0:
            probabilities = self._probabilities()
            delta = self.delta
            if delta is None:
                delta = 0.5 * math.log(probabilities.shape[1])
            counts, mask = grow_neighbour_counts(
                self.sampler.get_neighbour_counts(),
                self.labels,
                probabilities,
                k0=self.sampler.k0,
                sigma0=self.sigma0,
                sigma1=self.sigma1,
                delta=delta,
                k_max=self.sampler.k_max,
            )
            self.sampler.set_neighbour_counts(counts)
            grown = int(mask.sum())
        draws = None
        if self.draws_per_epoch is not None:
            # The next epoch's draws, with the counts as they are now.
            draws = self.sampler.repetition_counts(self.draws_per_epoch, epoch + 1)
            self.max_draws.append(int(draws.max()))
            if self.max_draws[-1] == max(self.max_draws):
                self.worst_histogram = np.bincount(draws).tolist()
        if (epoch + 1) % self.period == 0:
            if self.log_dir:
                if self._writer is None:
                    self._writer = tf.summary.create_file_writer(self.log_dir)
                with self._writer.as_default():
                    tf.summary.histogram("neighbour_counts", counts, step=epoch)
                    tf.summary.scalar("neighbours_grown", grown, step=epoch)
                    if draws is not None:
                        tf.summary.histogram("draws_per_target", draws, step=epoch)
                self._writer.flush()
        counts = self.sampler.get_neighbour_counts()
        if logs is not None:
            logs["neighbours_mean"] = float(counts.mean())
            logs["neighbours_median"] = float(np.median(counts))
            logs["neighbours_max"] = float(counts.max())
            logs["neighbours_grown"] = float(grown)
            if draws is not None:
                logs["draws_max"] = float(draws.max())

    def on_train_end(self, logs=None):
        if self._writer is not None:
            self._writer.close()
            self._writer = None


__all__ = ["AdaptiveNeighbourGrowth", "grow_neighbour_counts", "prediction_entropy"]
