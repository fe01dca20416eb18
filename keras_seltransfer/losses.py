"""Feature losses of knowledge-transferred fine-tuning (KTFT).

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
    "global_level_loss",
    "global_pool",
    "pixel_level_loss",
]
