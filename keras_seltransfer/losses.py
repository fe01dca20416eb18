"""Losses of the fine-tuning methods that add terms to the cross-entropy.

- DELTA (Li et al., ICLR 2019): `weighted_feature_distance`, the
  channel-weighted distance of feature maps to the pretrained network's,
  and `channel_attention`, the channel weights from loss increases.
- BSS (Chen et al., NeurIPS 2019): `batch_spectral_shrinkage`, the
  smallest squared singular values of the batch feature matrix.
- KTFT's pixel-level and global-level feature losses, below.

Knowledge-transferred fine-tuning (KTFT).

KTFT (IEEE Access 2022) fine-tunes an anti-aliased network while it copies
what the original pretrained network computes at intermediate stages, with
a pixel-level loss (the detailed knowledge, aliasing artefacts included)
and a global-level loss that rises when copying pixel detail pulls the
student away from the essential content. The paper does not publish the
exact forms; the ones here are:

- pixel level: the mean squared difference of the two feature maps, over
  positions and channels;
- global level: one minus the cosine similarity of the two globally
  average-pooled feature vectors. Global average pooling discards where a
  feature fired, which is exactly what aliasing perturbs (a one-pixel shift
  of the input moves and flickers aliased responses, but keeps their
  average), and keeps which features fired and how strongly relative to
  each other, which is what the classifier head reads (it sees pooled
  features too). The cosine ignores the overall scale, which the pixel-level
  term already constrains, so the two terms do not pull the same way. A
  Gram-matrix (texture) loss would also be shift-invariant, but costs
  channels^2 per stage and is dominated by the strongest channels.

Each loss takes one feature map or a list of them (one per stage) and
averages over stages, so its size does not grow with the number of stages
compared. Per-example values come from `call` / the functions; calling a
loss object reduces them over the batch as every Keras loss does (and
scales for `tf.distribute`).
"""

import keras
import numpy as np
from keras import ops


def _as_list(features):
    return list(features) if isinstance(features, (list, tuple)) else [features]


def _check_pairs(teacher, student):
    teacher, student = _as_list(teacher), _as_list(student)
    if not teacher or len(teacher) != len(student):
        raise ValueError(
            "Teacher and student features must be two equally long, non-empty lists of "
            f"tensors. Received: {len(teacher)} teacher and {len(student)} student tensors"
        )
    for t, s in zip(teacher, student):
        if tuple(t.shape) != tuple(s.shape) and None not in tuple(t.shape) + tuple(s.shape):
            raise ValueError(
                "Each teacher feature map must have the shape of its student map. "
                f"Received: teacher {tuple(t.shape)} and student {tuple(s.shape)}"
            )
    return teacher, student


def pixel_level_loss(teacher_features, student_features):
    """Mean squared difference of feature maps, per example.

    Args:
        teacher_features: a tensor `[batch, ...]` or a list of them (stages).
        student_features: the student's tensors, same shapes.

    Returns:
        `[batch]`: for each example, the mean over every position and
        channel of `(student - teacher)^2`, averaged over the stages.

    Example:

    ```python
    teacher = np.zeros((2, 4, 4, 3), "float32")
    student = np.ones((2, 4, 4, 3), "float32")
    pixel_level_loss(teacher, student)  # [1., 1.]
    pixel_level_loss([teacher, teacher], [student, teacher])  # [0.5, 0.5]: two stages
    ```
    """
    teacher, student = _check_pairs(teacher_features, student_features)
    total = 0.0
    for t, s in zip(teacher, student):
        t, s = ops.cast(t, "float32"), ops.cast(s, "float32")
        axes = tuple(range(1, len(t.shape)))
        total = total + ops.mean(ops.square(s - t), axis=axes)
    return total / len(teacher)


def global_pool(features):
    """Global average pooling over every axis but the first and the last.

    Example:

    ```python
    global_pool(np.ones((2, 4, 4, 3))).shape  # (2, 3)
    ```
    """
    features = ops.cast(features, "float32")
    if len(features.shape) <= 2:
        return features
    return ops.mean(features, axis=tuple(range(1, len(features.shape) - 1)))


def global_level_loss(teacher_features, student_features, epsilon=1e-12):
    """One minus the cosine similarity of globally pooled features, per example.

    Computed as half the squared distance of the L2-normalised pooled
    vectors, which equals `1 - cos` when both vectors are non-zero and is 0
    when both are zero (a stage silent for both networks agrees).

    Args:
        teacher_features: a tensor `[batch, height, width, channels]` (or
            already pooled, `[batch, channels]`), or a list of them.
        student_features: the student's tensors, same shapes.
        epsilon: floor of the squared norms.

    Returns:
        `[batch]`, in [0, 2], averaged over the stages.

    Example:

    ```python
    teacher = np.ones((2, 4, 4, 3), "float32")
    global_level_loss(teacher, 2.0 * teacher)  # [0., 0.]: same direction, any scale
    global_level_loss(teacher, -teacher)  # [2., 2.]: opposite directions
    ```
    """
    teacher, student = _check_pairs(teacher_features, student_features)
    total = 0.0
    for t, s in zip(teacher, student):
        t, s = global_pool(t), global_pool(s)
        t = t / ops.sqrt(ops.maximum(ops.sum(ops.square(t), axis=-1, keepdims=True), epsilon))
        s = s / ops.sqrt(ops.maximum(ops.sum(ops.square(s), axis=-1, keepdims=True), epsilon))
        total = total + 0.5 * ops.sum(ops.square(s - t), axis=-1)
    return total / len(teacher)


def batch_spectral_shrinkage(features, k=1):
    """Batch Spectral Shrinkage: the k smallest squared singular values of a batch.

    BSS (Chen et al., NeurIPS 2019) penalises the smallest singular values
    of the batch feature matrix `F` (`[batch, dim]`, the pooled features a
    classification head reads): the spectral components that fine-tuning on
    few target images cannot estimate well, where pretrained knowledge that
    does not transfer lingers. The penalty is

        L_bss(F) = sum_{i=1..k} sigma_{-i}(F)^2,

    with `sigma_{-i}` the i-th smallest of the `min(batch, dim)` singular
    values (`keras.ops.svd`). A batch with fewer than `k` singular values
    contributes all of them.

    Args:
        features: a `[batch, dim]` tensor.
        k: how many of the smallest singular values are penalised (>= 1).

    Returns:
        A scalar tensor (float32).

    Raises:
        ValueError: if `features` is not 2-D or `k` is not a positive int.

    Example:

    ```python
    features = np.diag([3.0, 2.0, 0.5]).astype("float32")
    batch_spectral_shrinkage(features, k=1)  # 0.25 = 0.5 ** 2
    batch_spectral_shrinkage(features, k=2)  # 4.25 = 0.5 ** 2 + 2 ** 2
    ```

    Reference:
        Chen, Wang, Fu, Long, Wang. Catastrophic Forgetting Meets Negative
        Transfer: Batch Spectral Shrinkage for Safe Transfer Learning.
        NeurIPS 2019.
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"`k` must be a positive int. Received: k={k!r}")
    features = ops.cast(features, "float32")
    if len(features.shape) != 2:
        raise ValueError(
            "`features` must be a [batch, dim] matrix. "
            f"Received: features with shape {tuple(features.shape)}"
        )
    # Singular values come in descending order; the last k are the smallest.
    singular_values = ops.svd(features, full_matrices=False, compute_uv=False)
    return ops.sum(ops.square(singular_values[-k:]))


def weighted_feature_distance(teacher_features, student_features, channel_weights=None):
    """DELTA's attention-weighted feature-map distance, per example.

    For each pair of maps `[batch, ..., channels]` (one per layer j, with
    C_j channels) and each example, the distance is

        sum_j sum_c 0.5 * C_j * W_{j,c} * mean_positions((s_{j,c} - t_{j,c})^2),

    the form of the authors' code (Li et al., ICLR 2019; also the
    Transfer-Learning-Library's `AttentionBehavioralRegularization`): the
    squared distance of channel c's map divided by its number of positions,
    weighted by the channel attention `W_j` (which sums to 1 over a layer,
    so `C_j * W_{j,c}` averages 1). Without attention (`channel_weights`
    None) every channel has `W_{j,c} = 1 / C_j`, so each layer contributes
    half the sum over channels of the mean squared difference. (The
    authors' attention-free variant sums the squared differences over
    positions instead of averaging them, which only rescales the term by
    the map size.)

    Args:
        teacher_features: a tensor `[batch, ..., channels]` or a list of
            them (one per layer): the frozen pretrained network's maps.
        student_features: the fine-tuned network's maps, same shapes.
        channel_weights: None, or one vector `[C_j]` per layer (a list),
            each non-negative; normally `channel_attention`'s output.

    Returns:
        `[batch]`: the distance of each example, summed over the layers.

    Raises:
        ValueError: for unpaired or differently shaped maps, or channel
            weights whose count or length does not match the maps.

    Example:

    ```python
    teacher = np.zeros((1, 2, 2, 2), "float32")
    student = np.ones((1, 2, 2, 2), "float32")
    weighted_feature_distance(teacher, student)  # [1.0] = 0.5 * (1 + 1)
    weighted_feature_distance(teacher, student, [np.array([1.0, 0.0])])  # [1.0] = 0.5 * 2 * 1
    ```

    Reference:
        Li, Xiong, Wang, Rao, Liu, Chen, Huan. DELTA: Deep Learning Transfer
        using Feature Map with Attention for Convolutional Networks. ICLR 2019.
    """
    teacher, student = _check_pairs(teacher_features, student_features)
    if channel_weights is not None:
        channel_weights = _as_list(channel_weights)
        if len(channel_weights) != len(teacher):
            raise ValueError(
                "`channel_weights` must hold one vector per feature map. Received: "
                f"{len(channel_weights)} vectors for {len(teacher)} maps"
            )
    total = 0.0
    for j, (t, s) in enumerate(zip(teacher, student)):
        t, s = ops.cast(t, "float32"), ops.cast(s, "float32")
        channels = int(t.shape[-1])
        if channel_weights is None:
            weights = ops.full((channels,), 1.0 / channels, dtype="float32")
        else:
            weights = ops.cast(channel_weights[j], "float32")
            if tuple(weights.shape) != (channels,):
                raise ValueError(
                    f"`channel_weights[{j}]` must have one weight per channel ({channels}). "
                    f"Received: shape {tuple(weights.shape)}"
                )
        positions = tuple(range(1, len(t.shape) - 1))
        squared = ops.square(s - t)
        per_channel = ops.mean(squared, axis=positions) if positions else squared
        total = total + 0.5 * channels * ops.sum(per_channel * weights, axis=-1)
    return total


def channel_attention(loss_increases, temperature=5.0):
    """DELTA's supervised channel attention from per-channel loss increases.

    Li et al. (ICLR 2019) weight each channel of a layer by how much the
    target loss rises when the channel is removed from the pretrained
    network (with a head trained on the target task). As in the authors'
    code, the increases of one layer are standardised (zero mean, unit
    standard deviation) and turned into weights by a softmax with
    temperature 5:

        W_c = softmax_c((d_c - mean(d)) / (std(d) * temperature)).

    A layer whose channels all change the loss equally gets uniform weights.

    Args:
        loss_increases: a vector `[channels]` of one layer, or a list of
            them (one per layer).
        temperature: softmax temperature (> 0); larger is flatter.

    Returns:
        A float64 NumPy vector summing to 1 (or a list of them).

    Raises:
        ValueError: for a non-positive temperature, or an empty or non-finite
            vector.

    Example:

    >>> import numpy as np
    >>> weights = channel_attention(np.array([0.0, 1.0]), temperature=1.0)
    >>> np.round(weights, 4).tolist()  # softmax([-1, 1])
    [0.1192, 0.8808]
    >>> channel_attention(np.array([0.3, 0.3])).tolist()
    [0.5, 0.5]
    """
    if isinstance(temperature, bool) or not float(temperature) > 0:
        raise ValueError(f"`temperature` must be > 0. Received: temperature={temperature!r}")
    if isinstance(loss_increases, (list, tuple)):
        return [channel_attention(d, temperature) for d in loss_increases]
    d = np.asarray(loss_increases, dtype="float64")
    if d.ndim != 1 or d.size == 0 or not np.all(np.isfinite(d)):
        raise ValueError(
            "`loss_increases` must be a non-empty finite vector per layer. "
            f"Received: loss_increases with shape {d.shape}"
        )
    spread = d.std()
    z = (d - d.mean()) / spread if spread > 0 else np.zeros_like(d)
    z = z / float(temperature)
    weights = np.exp(z - z.max())
    return weights / weights.sum()


@keras.saving.register_keras_serializable(package="keras_seltransfer")
class PixelLevelLoss(keras.losses.Loss):
    """KTFT's pixel-level loss: mean squared difference of stage feature maps.

    `y_true` holds the teacher's feature maps, `y_pred` the student's (a
    tensor or a list of tensors, one per stage); see `pixel_level_loss`.

    Args:
        reduction: Keras loss reduction. Default `"sum_over_batch_size"`.
        name: loss name.
        dtype: dtype of the loss computation.

    Example:

    ```python
    loss = PixelLevelLoss()
    loss(np.zeros((2, 4, 4, 3)), np.ones((2, 4, 4, 3)))  # 1.0, the batch mean
    # In a model whose "stages" output lists the student's stage features and
    # whose targets are the teacher's:
    model.compile("adam", loss={"classes": "sparse_categorical_crossentropy",
                                "stages": PixelLevelLoss()})
    ```
    """

    def __init__(self, reduction="sum_over_batch_size", name="pixel_level_loss", dtype=None):
        super().__init__(name=name, reduction=reduction, dtype=dtype)

    def call(self, y_true, y_pred):
        return pixel_level_loss(y_true, y_pred)

    def get_config(self):
        return {"name": self.name, "reduction": self.reduction}


@keras.saving.register_keras_serializable(package="keras_seltransfer")
class GlobalLevelLoss(keras.losses.Loss):
    """KTFT's global-level loss: cosine distance of pooled stage features.

    `y_true` holds the teacher's feature maps, `y_pred` the student's (a
    tensor or a list of tensors, one per stage); see `global_level_loss`.

    Args:
        epsilon: floor of the squared norms.
        reduction: Keras loss reduction. Default `"sum_over_batch_size"`.
        name: loss name.
        dtype: dtype of the loss computation.

    Example:

    ```python
    loss = GlobalLevelLoss()
    teacher = np.ones((2, 4, 4, 3), "float32")
    loss(teacher, 2.0 * teacher)  # 0.0: the pooled features point the same way
    ```
    """

    def __init__(
        self, epsilon=1e-12, reduction="sum_over_batch_size", name="global_level_loss", dtype=None
    ):
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        if not float(epsilon) > 0:
            raise ValueError(f"`epsilon` must be > 0. Received: epsilon={epsilon}")
        self.epsilon = float(epsilon)

    def call(self, y_true, y_pred):
        return global_level_loss(y_true, y_pred, epsilon=self.epsilon)

    def get_config(self):
        return {"epsilon": self.epsilon, "name": self.name, "reduction": self.reduction}


__all__ = [
    "GlobalLevelLoss",
    "PixelLevelLoss",
    "batch_spectral_shrinkage",
    "channel_attention",
    "global_level_loss",
    "global_pool",
    "pixel_level_loss",
    "weighted_feature_distance",
]
