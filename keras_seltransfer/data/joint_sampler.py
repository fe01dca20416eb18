"""JointSampler: which target and source images each joint batch pairs.

Selective joint fine-tuning (Ge & Yu, CVPR 2017) pairs every target image of
a batch with a random neighbour from the first `K_i` entries of its sorted
neighbour list (from `keras_seltransfer.retrieval`); hard target images get
longer lists as training goes (`AdaptiveNeighbourGrowth`). `JointSampler`
holds the lists and the growth state in TensorFlow variables and draws each
epoch; `data.joint_variants.make_sampler` builds the sampler of each ablation variant;
`data.joint.make_joint_dataset` turns the draws into batches.

How an epoch is drawn (keyed on the sampler's seed and the epoch number, so
runs are reproducible and a resumed run draws the same batches):

1. Target draws. Each epoch makes `steps * batch/2` target draws, where
   `steps = ceil(num_targets / (batch/2))`. Target `i` gets a share
   proportional to its weight `K_i` (uniform for the pooled variants, and
   with `target_draws="uniform"`, the control that grows the lists without
   repeating hard images),
   allocated by systematic sampling (every target gets the floor or the
   ceiling of its expected count), then shuffled. With equal weights this is
   a shuffled pass over the targets, padded to whole batches. A target whose
   list grew gets proportionally more of the batches, so each of its
   neighbours is drawn about as often as those of a target that did not
   grow [code: the authors repeat a target image `level` times in the
   training list and give it `level * K0` neighbours].
   With `max_level` (the authors' `highest_sample_level`, 10 in their
   released prototxt) the lists stop growing at `max_level * K0` and no
   target is drawn more than `max_level` times in an epoch: the expected
   counts are capped at `max_level` and the draws the cap frees go to the
   other targets in proportion to their weights (water-filling) before the
   systematic allocation. Without it (the behaviour before the cap), a list
   may grow to all `k_max` stored neighbours (200 = 20 K0 by default) and a
   hard target that grew alone takes up to `num_draws * K_i / sum(K)` draws.
2. Source draws. Each target draw is paired with one source image: a
   uniformly random entry among the first `K_i` of its list, or a uniformly
   random image of the pool (variants `all` and `random`).
3. Batches. Consecutive draws form per-replica batches `[targets; sources]`
   with the target images first; under a strategy every replica gets its own
   half/half batch, so BatchNorm statistics always come from a mixed batch.
"""

import keras
import numpy as np
import tensorflow as tf

from keras_seltransfer.utils.validation import check_int
from keras_seltransfer.utils.validation import check_int_array
from keras_seltransfer.utils.validation import is_int

# How a neighbour sampler shares an epoch's draws among the target images:
# in proportion to their list lengths K_i, or equally.
TARGET_DRAWS = ("neighbours", "uniform")


class JointSampler(keras.callbacks.Callback):
    """Which source image goes with which target image, epoch by epoch.

    Build one with `JointSampler.from_neighbours` (the selective method) or
    `JointSampler.from_pool` (the "all source" and "random source"
    ablations), pass it to `make_joint_dataset`, and pass it to `fit` as a
    callback: it tells the pipeline which epoch is starting, so every epoch
    draws fresh batches and a run resumed with `initial_epoch` draws the
    same batches as an uninterrupted one. (Without the callback the pipeline
    counts its own iterations instead.)

    The source label space is re-indexed compactly over the classes of the
    candidate source images: `source_classes[j]` is the original label of
    compact class `j`, and `num_source_classes` sizes the source head.

    Create samplers outside `strategy.scope()`: their state lives on the
    host with the input pipeline, not with the model's replicas.

    Args:
        candidate_ids: `[P]` distinct positions, in the source set, of the
            source images that may be drawn.
        candidate_labels: `[P]` original labels of those images.
        num_targets: number of target training images.
        neighbours: `[num_targets, K]` positions *into `candidate_ids`*,
            each row sorted nearest first; None for a pool sampler, where
            every target draws uniformly from all candidates.
        k0: initial number of neighbours per target (neighbour samplers).
        seed: int seed of the draws.
        max_level: highest sampling level (neighbour samplers): lists grow
            to at most `max_level * k0` neighbours, and no target is drawn
            more than `max_level` times per epoch. None: no cap (lists grow
            to every stored neighbour, draws proportional to `K_i`).
        target_draws: how a neighbour sampler shares an epoch's target
            draws: `"neighbours"` in proportion to `K_i` (a grown target is
            drawn more often), `"uniform"` equally (lists still grow, so a
            hard target's draws reach more source images, but it is not
            repeated). Pool samplers always draw targets uniformly.

    Example:

    >>> neighbour_ids = np.array([[4, 2, 7], [2, 9, 4]])  # 2 targets, 3 neighbours
    >>> source_labels = np.arange(10) % 5
    >>> sampler = JointSampler.from_neighbours(neighbour_ids, source_labels, k0=2)
    >>> sampler.candidate_ids.tolist(), sampler.source_classes.tolist()
    ([2, 4, 7, 9], [2, 4])
    >>> sampler.get_neighbour_counts().tolist(), sampler.repetition_counts(4).tolist()
    ([2, 2], [2, 2])
    >>> sampler.set_neighbour_counts([3, 1])  # draws follow K_i
    >>> sampler.repetition_counts(4).tolist()
    [3, 1]
    """

    def __init__(
        self,
        candidate_ids,
        candidate_labels,
        num_targets,
        *,
        neighbours=None,
        k0=None,
        seed=0,
        max_level=None,
        target_draws="neighbours",
    ):
        super().__init__()
        if target_draws not in TARGET_DRAWS:
            raise ValueError(
                f"Expected `target_draws` in {TARGET_DRAWS}. Received: target_draws={target_draws!r}"
            )
        self.target_draws = target_draws
        if tf.distribute.has_strategy():
            raise ValueError(
                "Create the JointSampler outside `strategy.scope()`: its state "
                "belongs to the input pipeline on the host."
            )
        candidate_ids = check_int_array(candidate_ids, "candidate_ids", 1)
        candidate_labels = check_int_array(candidate_labels, "candidate_labels", 1)
        if len(candidate_ids) == 0:
            raise ValueError("Expected at least one candidate source image. Received: none.")
        if len(candidate_labels) != len(candidate_ids):
            raise ValueError(
                "Expected one label per candidate. Received: "
                f"{len(candidate_labels)} labels for {len(candidate_ids)} candidates"
            )
        if len(np.unique(candidate_ids)) != len(candidate_ids) or candidate_ids.min() < 0:
            raise ValueError("Expected `candidate_ids` to be distinct non-negative positions.")
        self.num_targets = check_int(num_targets, "num_targets", 1)
        if not is_int(seed):
            raise ValueError(f"Expected `seed` to be an int. Received: seed={seed!r}")
        self.seed = int(seed)
        self.candidate_ids = candidate_ids
        self.source_classes, compact = np.unique(candidate_labels, return_inverse=True)
        self.candidate_labels = compact.astype(np.int32)
        self.num_source_classes = len(self.source_classes)

        self.neighbours = None
        self.k0 = None
        self.k_max = None
        self.max_level = None
        self.neighbour_counts = None
        if max_level is not None:
            if neighbours is None:
                raise ValueError(
                    "`max_level` applies to neighbour samplers only; a pool sampler has no "
                    f"levels. Received: max_level={max_level!r}"
                )
            self.max_level = check_int(max_level, "max_level", 1)
        if neighbours is not None:
            neighbours = check_int_array(neighbours, "neighbours", 2)
            if neighbours.shape[0] != self.num_targets or neighbours.shape[1] < 1:
                raise ValueError(
                    f"Expected `neighbours` of shape [num_targets={self.num_targets}, K>=1]. "
                    f"Received: shape {neighbours.shape}"
                )
            if neighbours.min() < 0 or neighbours.max() >= len(candidate_ids):
                raise ValueError(
                    "Expected `neighbours` to hold positions into `candidate_ids` "
                    f"(0..{len(candidate_ids) - 1}). Received values in "
                    f"[{neighbours.min()}, {neighbours.max()}]"
                )
            self.k0 = check_int(k0, "k0", 1)
            if self.max_level is not None:
                # The authors give a target at level L the first L * K0 neighbours.
                neighbours = neighbours[:, : self.k0 * self.max_level]
            self.k_max = int(neighbours.shape[1])
            if self.k0 > self.k_max:
                raise ValueError(
                    f"`k0` ({self.k0}) exceeds the neighbours stored per target "
                    f"({self.k_max}); rebuild the index with a larger k_max or lower k0."
                )
            self.neighbours = neighbours.astype(np.int32)
            self._neighbours_table = tf.constant(self.neighbours)
            self.neighbour_counts = tf.Variable(
                np.full([self.num_targets], self.k0, np.int32),
                trainable=False,
                name="neighbour_counts",
            )
        elif k0 is not None:
            raise ValueError("`k0` applies to neighbour samplers only; a pool sampler has no lists.")
        # -1: no epoch set yet; the pipeline then counts its own iterations.
        self.epoch = tf.Variable(-1, dtype=tf.int64, trainable=False, name="joint_epoch")
        self._iterations = tf.Variable(0, dtype=tf.int64, trainable=False, name="joint_iterations")

    # ---------------------------------------------------------------- builders

    @classmethod
    def from_neighbours(
        cls, neighbour_ids, source_labels, *, k0, k_max=None, seed=0, max_level=None,
        target_draws="neighbours",
    ):
        """A sampler over per-target neighbour lists (the selective method).

        Args:
            neighbour_ids: `[num_targets, K]` positions in the source set,
                each row sorted nearest first (`neighbours.npz`'s
                `neighbour_ids`, rows in the order of the target images the
                pipeline gets).
            source_labels: `[num_source]` labels of the whole source set.
            k0: initial neighbours per target.
            k_max: keep only the first `k_max` columns (the growth cap);
                None keeps all.
            seed: int seed of the draws.
            max_level: highest sampling level (see the class); also keeps
                only the first `max_level * k0` columns.
            target_draws: `"neighbours"` or `"uniform"` (see the class).
        """
        ids = check_int_array(neighbour_ids, "neighbour_ids", 2)
        source_labels = check_int_array(source_labels, "source_labels", 1)
        if k_max is not None:
            ids = ids[:, : check_int(k_max, "k_max", 1)]
        if max_level is not None:
            # Only the neighbours a capped list can reach are candidates.
            ids = ids[:, : check_int(k0, "k0", 1) * check_int(max_level, "max_level", 1)]
        if ids.size and (ids.min() < 0 or ids.max() >= len(source_labels)):
            raise ValueError(
                f"Neighbour ids must be positions in the source set (0..{len(source_labels) - 1}). "
                f"Received values in [{ids.min()}, {ids.max()}]: the index was built for "
                "another source set."
            )
        candidates, inverse = np.unique(ids, return_inverse=True)
        return cls(
            candidates,
            source_labels[candidates],
            ids.shape[0],
            neighbours=inverse.reshape(ids.shape),
            k0=k0,
            seed=seed,
            max_level=max_level,
            target_draws=target_draws,
        )

    @classmethod
    def from_pool(cls, pool_ids, source_labels, num_targets, *, seed=0):
        """A sampler pairing every target draw with a uniform draw from a pool.

        Args:
            pool_ids: positions in the source set of the pool's images.
            source_labels: `[num_source]` labels of the whole source set.
            num_targets: number of target training images.
            seed: int seed of the draws.
        """
        pool_ids = np.unique(check_int_array(pool_ids, "pool_ids", 1))
        source_labels = check_int_array(source_labels, "source_labels", 1)
        if pool_ids.size and pool_ids.max() >= len(source_labels):
            raise ValueError(
                f"Pool ids must be positions in the source set (0..{len(source_labels) - 1})."
            )
        return cls(pool_ids, source_labels[pool_ids], num_targets, seed=seed)

    # ---------------------------------------------------------------- state

    @property
    def uses_neighbours(self):
        return self.neighbours is not None

    def get_neighbour_counts(self):
        """Current `K_i` per target as a NumPy array (neighbour samplers)."""
        self._require_neighbours()
        return self.neighbour_counts.numpy()

    def set_neighbour_counts(self, counts):
        """Sets `K_i` per target; the next epoch of the pipeline samples from them."""
        self._require_neighbours()
        counts = check_int_array(counts, "counts", 1)
        if counts.shape != (self.num_targets,) or counts.min() < 1 or counts.max() > self.k_max:
            raise ValueError(
                f"Expected `counts` of shape [{self.num_targets}] with values in "
                f"[1, {self.k_max}]. Received: shape {counts.shape}, values in "
                f"[{counts.min() if counts.size else None}, {counts.max() if counts.size else None}]"
            )
        self.neighbour_counts.assign(counts.astype(np.int32))

    def state_variables(self):
        """Variables a checkpoint must keep to resume the run exactly."""
        return {"neighbour_counts": self.neighbour_counts} if self.uses_neighbours else {}

    def _require_neighbours(self):
        if not self.uses_neighbours:
            raise ValueError("This sampler draws from a pool; it has no neighbour lists.")

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch.assign(int(epoch))

    # ---------------------------------------------------------------- drawing

    def next_epoch(self):
        """The epoch the pipeline is drawing, as a scalar int tensor.

        Reads the value the callback sets in `on_epoch_begin`, or counts the
        calls when no callback sets it. `make_joint_dataset` calls it once per
        pass over its (repeated) data set.
        """
        count = self._iterations.assign_add(1) - 1
        return tf.where(self.epoch >= 0, self.epoch, count)

    def draw(self, num_draws, epoch):
        """Draws one epoch's `(target_indices, candidate_positions)`.

        Pure TensorFlow (runs inside the input pipeline); see the module
        docstring for the rule.

        Args:
            num_draws: number of target draws (int).
            epoch: int64 scalar; the draws are a function of `(seed, epoch)`
                and the current neighbour counts.

        Returns:
            Two int32 tensors of shape `[num_draws]`: target indices and
            positions into `candidate_ids`.
        """
        key = tf.random.experimental.stateless_fold_in(
            tf.constant([self.seed, 7], tf.int64), tf.cast(epoch, tf.int64)
        )
        keys = tf.random.experimental.stateless_split(key, 3)
        if self.uses_neighbours:
            counts = tf.convert_to_tensor(self.neighbour_counts)
        if self.uses_neighbours and self.target_draws == "neighbours":
            weights = tf.cast(counts, tf.float64)
        else:
            weights = tf.ones([self.num_targets], tf.float64)
        # Systematic sampling: one uniform offset, evenly spaced points over
        # the cumulative weights; every target gets floor or ceil of its
        # expected count.
        offset = tf.random.stateless_uniform([], seed=keys[0], dtype=tf.float64)
        if self.max_level is None:
            cumulative = tf.cumsum(weights)
            points = (offset + tf.range(num_draws, dtype=tf.float64)) * (
                cumulative[-1] / num_draws
            )
        else:
            # Expected counts capped at max_level sum to num_draws, so points
            # one apart give each target floor or ceil of a count <= the cap.
            cumulative = tf.cumsum(capped_shares(weights, num_draws, self.max_level))
            points = offset + tf.range(num_draws, dtype=tf.float64)
        targets = tf.searchsorted(cumulative, points, side="right", out_type=tf.int32)
        targets = tf.minimum(targets, self.num_targets - 1)
        order = tf.argsort(tf.random.stateless_uniform([num_draws], seed=keys[1]))
        targets = tf.gather(targets, order)
        u = tf.random.stateless_uniform([num_draws], seed=keys[2], dtype=tf.float64)
        if self.uses_neighbours:
            k = tf.gather(counts, targets)
            column = tf.minimum(tf.cast(u * tf.cast(k, tf.float64), tf.int32), k - 1)
            positions = tf.gather_nd(self._neighbours_table, tf.stack([targets, column], axis=1))
        else:
            pool = len(self.candidate_ids)
            positions = tf.minimum(tf.cast(u * pool, tf.int32), pool - 1)
        return targets, positions

    def repetition_counts(self, num_draws, epoch=0):
        """How often each target image is drawn in one epoch (a diagnostic).

        Args:
            num_draws: target draws per epoch (`joint_steps_per_epoch(...) *
                global_batch_size / 2`).
            epoch: the epoch whose draws to count, with the current
                neighbour counts.

        Returns:
            An int `[num_targets]` array: the draws of each target image.
        """
        targets, _ = self.draw(check_int(num_draws, "num_draws", 1), tf.constant(int(epoch), tf.int64))
        return np.bincount(targets.numpy(), minlength=self.num_targets)


def capped_shares(weights, num_draws, cap):
    """Shares of `num_draws` proportional to `weights`, none above `cap`.

    Water-filling: a target whose proportional share exceeds `cap` gets
    exactly `cap`, and the draws this frees are shared among the others in
    proportion to their weights, until no share exceeds the cap. Pure
    TensorFlow (runs in the input pipeline).

    Args:
        weights: float64 `[N]` positive weights.
        num_draws: total to share; at most `N * cap`.
        cap: the largest share.

    Returns:
        float64 `[N]` shares summing to `num_draws`.

    Example:

    >>> capped_shares([1.0, 1.0, 6.0], num_draws=6, cap=3).numpy().tolist()
    [1.5, 1.5, 3.0]
    """
    weights = tf.convert_to_tensor(weights, tf.float64)
    total = tf.cast(num_draws, tf.float64)
    cap = tf.cast(cap, tf.float64)

    def shares(saturated):
        free = tf.where(saturated, tf.zeros_like(weights), weights)
        left = total - cap * tf.reduce_sum(tf.cast(saturated, tf.float64))
        return tf.where(saturated, cap, left * free / tf.reduce_sum(free))

    def body(saturated, _):
        grown = saturated | (shares(saturated) > cap)
        return grown, tf.reduce_any(grown != saturated)

    # Each round saturates at least one more target or stops: at most N rounds.
    saturated, _ = tf.while_loop(
        lambda _, changed: changed,
        body,
        [tf.zeros_like(weights, tf.bool), tf.constant(True)],
    )
    return tf.minimum(shares(saturated), cap)


__all__ = ["JointSampler", "TARGET_DRAWS", "capped_shares"]
