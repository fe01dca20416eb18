"""Training models that add a regulariser of DELTA or BSS to a classifier's loss.

Both wrap the classifier being fine-tuned and add to the compiled loss a
term computed from its intermediate outputs:

- `DeltaModel` (Li et al., ICLR 2019): the channel-weighted distance of the
  classifier's feature maps to those of the frozen pretrained network on
  the same batch, plus an L2 penalty on the new head;
- `BatchSpectralShrinkageModel` (Chen et al., NeurIPS 2019): the smallest
  squared singular values of the batch of pooled features fed to the head.

Each term is logged as a metric (`delta_loss`, `head_l2`, `bss_loss`, and
`val_...` in validation), unweighted, whatever its weight. The wrapped
classifier is what is saved and served; the wrapper only trains it. The
batch-level terms are added once per global batch: under `tf.distribute`
each replica adds its term divided by the number of replicas, as Keras
scales its own losses, so the summed gradients equal one device's.
"""

import keras
import numpy as np
import tensorflow as tf
from keras import ops

from keras_seltransfer.losses import batch_spectral_shrinkage
from keras_seltransfer.losses import weighted_feature_distance
from keras_seltransfer.utils.validation import check_loss_weight
from keras_seltransfer.utils.validation import check_single_output_model


def _per_replica(value):
    """`value` divided by the replicas in sync: what one replica adds of a
    term that belongs to the whole batch."""
    replicas = tf.distribute.get_strategy().num_replicas_in_sync
    return value / replicas if replicas > 1 else value


def head_features_layer(classifier, head_layer="target_head"):
    """The name of the layer whose output a classifier's head reads.

    The layer feeding `head_layer`, or, when that is a Dropout layer, the
    one feeding the dropout: the pooled features of the backbone.

    Raises:
        ValueError: if `classifier` has no layer `head_layer`.

    Example:

    >>> from keras_seltransfer import models
    >>> backbone = models.small_cnn((16, 16, 1), widths=(4, 8))
    >>> head_features_layer(models.build_classifier(backbone, 2, dropout=0.5))
    'features'
    """
    names = {layer.name for layer in classifier.layers}
    if head_layer not in names:
        raise ValueError(
            f"Model {classifier.name!r} has no layer {head_layer!r}. "
            f"Received: head_layer={head_layer!r}"
        )
    producers = {id(layer.output): layer for layer in classifier.layers}
    layer = producers.get(id(classifier.get_layer(head_layer).input))
    if isinstance(layer, keras.layers.Dropout):
        layer = producers.get(id(layer.input))
    if layer is None:
        raise ValueError(
            f"Cannot tell which layer feeds {head_layer!r} in {classifier.name!r}; name the "
            "features layer explicitly."
        )
    return layer.name


class _RegularizedClassifierModel(keras.Model):
    """A classifier's training model whose loss gains weighted terms.

    Subclasses set `TERMS`, build `self._taps` (the classifier's
    probabilities first, then what the terms need) and define `terms`.
    """

    TERMS = ()

    def __init__(self, classifier, **kwargs):
        super().__init__(**kwargs)
        check_single_output_model(classifier, "classifier")
        self.classifier = classifier
        self.trackers = {term: keras.metrics.Mean(name=term) for term in self.TERMS}

    @property
    def inputs(self):
        """The classifier's symbolic inputs."""
        return self.classifier.inputs

    def term_weights(self):
        """`{term: weight}` of the terms added to the loss."""
        raise NotImplementedError

    def terms(self, outputs):
        """`{term: scalar}` from what `call` returns."""
        raise NotImplementedError

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        loss = super().compute_loss(
            x=x, y=y, y_pred=y_pred["probabilities"], sample_weight=sample_weight, training=training
        )
        weights = self.term_weights()
        extra = 0.0
        for term, value in self.terms(y_pred).items():
            self.trackers[term].update_state(value)
            if weights[term]:
                extra = extra + weights[term] * value
        return loss + _per_replica(extra)

    def compute_metrics(self, x, y, y_pred, sample_weight=None):
        return super().compute_metrics(x, y, y_pred["probabilities"], sample_weight=sample_weight)

    def predict_step(self, data):
        x, _, _ = keras.utils.unpack_x_y_sample_weight(data)
        return self.classifier(x, training=False)


@keras.saving.register_keras_serializable(package="keras_seltransfer")
class DeltaModel(_RegularizedClassifierModel):
    """Fine-tunes a classifier with DELTA's feature-map regulariser.

    The training loss is

        CE(y, p) + alpha * mean_batch(D) + beta * 0.5 * ||w_head||^2,

    where `CE` is the loss given to `compile` (with its sample and class
    weights), `D` is `keras_seltransfer.losses.weighted_feature_distance`
    between the classifier's maps at `layer_names` and those of the frozen
    pretrained `teacher` on the same images, with `channel_weights` (DELTA's
    supervised attention) or uniform weights, and `w_head` are the weights
    (kernel and bias) of the new head layers.

    The authors' code sums `D` over the batch; here it is averaged, so
    `alpha` does not depend on the batch size: their alpha of 0.01 at
    batch 64 is `alpha=0.64` here.

    The teacher is frozen (`trainable = False`, so its BatchNormalization
    layers use their moving statistics) and always called with
    `training=False`. The channel weights are non-trainable variables of
    this model, so a resumed run's checkpoint restores them. Save or export
    `model.classifier` to serve.

    Args:
        classifier: the functional classifier being fine-tuned.
        teacher: a functional model holding the pretrained layers named
            `layer_names` (the pretrained backbone), same input as the
            classifier.
        layer_names: the layers whose outputs are compared, present in both
            models with equal shapes (e.g. `stage_outputs(classifier)`).
        channel_weights: None (uniform), or one non-negative vector per
            layer, one weight per channel (`channel_attention`'s output).
        alpha: weight of the feature-map term; 0 disables it.
        beta: weight of the head's L2 term; 0 disables it.
        head_layers: names of the new head layers of `classifier`.
        **kwargs: base `keras.Model` arguments (`name`).

    Raises:
        ValueError: for a weight below 0, unknown layers, maps of different
            shapes, or channel weights of the wrong count or length.

    Example:

    ```python
    classifier = build_classifier(load_backbone("runs/pretrain/.../model.keras", (64, 64, 1)), 2)
    teacher = load_backbone("runs/pretrain/.../model.keras", (64, 64, 1))
    names = stage_outputs(classifier)
    model = DeltaModel(classifier, teacher, names, alpha=0.64, beta=0.01)
    model.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"])
    model.fit(train_ds, epochs=10)  # logs delta_loss and head_l2
    model.classifier.save("model.keras")
    ```

    Reference:
        Li, Xiong, Wang, Rao, Liu, Chen, Huan. DELTA: Deep Learning Transfer
        using Feature Map with Attention for Convolutional Networks. ICLR 2019.
    """

    TERMS = ("delta_loss", "head_l2")

    def __init__(
        self,
        classifier,
        teacher,
        layer_names,
        channel_weights=None,
        alpha=0.64,
        beta=0.01,
        head_layers=("target_head",),
        **kwargs,
    ):
        super().__init__(classifier, **kwargs)
        self.alpha = check_loss_weight(alpha, "alpha")
        self.beta = check_loss_weight(beta, "beta")
        if not isinstance(teacher, keras.Model) or tuple(teacher.inputs[0].shape) != tuple(
            classifier.inputs[0].shape
        ):
            raise ValueError(
                "`teacher` must be a functional keras.Model with the classifier's input "
                f"{tuple(classifier.inputs[0].shape)}. Received: teacher={teacher!r}"
            )
        self.teacher = teacher
        teacher.trainable = False
        self.layer_names = [str(name) for name in layer_names]
        self.head_layers = [str(name) for name in head_layers]
        if not self.layer_names:
            raise ValueError(
                f"`layer_names` must name at least one layer. Received: layer_names={layer_names!r}"
            )
        for name in self.layer_names + self.head_layers:
            for model in (classifier, teacher) if name in self.layer_names else (classifier,):
                if name not in {layer.name for layer in model.layers}:
                    raise ValueError(
                        f"Model {model.name!r} has no layer {name!r}. Received: "
                        f"layer_names={self.layer_names!r}, head_layers={self.head_layers!r}"
                    )
        shapes = []
        for name in self.layer_names:
            student_shape = tuple(classifier.get_layer(name).output.shape)
            teacher_shape = tuple(teacher.get_layer(name).output.shape)
            if student_shape != teacher_shape:
                raise ValueError(
                    f"Layer {name!r} outputs {student_shape} in the classifier but "
                    f"{teacher_shape} in the teacher; compare maps of equal shape."
                )
            shapes.append(student_shape)
        self.uniform = channel_weights is None
        if not self.uniform and len(channel_weights) != len(self.layer_names):
            raise ValueError(
                "`channel_weights` must hold one vector per layer. Received: "
                f"{len(channel_weights)} vectors for layer_names={self.layer_names!r}"
            )
        self.channel_weights = []
        for j, shape in enumerate(shapes):
            width = int(shape[-1])
            values = np.full(width, 1.0 / width) if self.uniform else np.asarray(
                channel_weights[j], dtype="float64"
            )
            if values.shape != (width,) or not np.all(values >= 0):
                raise ValueError(
                    f"`channel_weights[{j}]` must be {width} non-negative weights (layer "
                    f"{self.layer_names[j]!r}). Received: shape {values.shape}"
                )
            self.channel_weights.append(
                self.add_weight(
                    shape=(width,),
                    initializer=keras.initializers.Constant(values.astype("float32")),
                    trainable=False,
                    name=f"channel_weights_{j}",
                )
            )
        self._taps = keras.Model(
            classifier.inputs,
            [classifier.outputs[0], *[classifier.get_layer(n).output for n in self.layer_names]],
            name=f"{classifier.name}_taps",
        )
        self._teacher_taps = keras.Model(
            teacher.inputs,
            [teacher.get_layer(n).output for n in self.layer_names],
            name=f"{teacher.name}_taps",
        )
        self._head_weights = [
            w for name in self.head_layers for w in classifier.get_layer(name).trainable_weights
        ]
        # Every layer is built, so weights can be loaded (a resumed run)
        # before the first call.
        self.built = True

    def call(self, inputs, training=None):
        student = self._taps(inputs, training=training)
        teacher = self._teacher_taps(inputs, training=False)
        teacher = teacher if isinstance(teacher, (list, tuple)) else [teacher]
        return {
            "probabilities": student[0],
            "student_features": list(student[1:]),
            "teacher_features": [ops.stop_gradient(t) for t in teacher],
        }

    def term_weights(self):
        return {"delta_loss": self.alpha, "head_l2": self.beta}

    def terms(self, outputs):
        distance = weighted_feature_distance(
            outputs["teacher_features"],
            outputs["student_features"],
            None if self.uniform else [ops.convert_to_tensor(w) for w in self.channel_weights],
        )
        head = 0.0
        for w in self._head_weights:
            head = head + 0.5 * ops.sum(ops.square(ops.cast(w, "float32")))
        return {"delta_loss": ops.mean(distance), "head_l2": head}

    def get_config(self):
        return {
            "name": self.name,
            "classifier": keras.saving.serialize_keras_object(self.classifier),
            "teacher": keras.saving.serialize_keras_object(self.teacher),
            "layer_names": list(self.layer_names),
            "channel_weights": None
            if self.uniform
            else [ops.convert_to_numpy(w).tolist() for w in self.channel_weights],
            "alpha": self.alpha,
            "beta": self.beta,
            "head_layers": list(self.head_layers),
        }

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        for key in ("classifier", "teacher"):
            config[key] = keras.saving.deserialize_keras_object(
                config[key], custom_objects=custom_objects
            )
        return cls(**config)


@keras.saving.register_keras_serializable(package="keras_seltransfer")
class BatchSpectralShrinkageModel(_RegularizedClassifierModel):
    """Fine-tunes a classifier with Batch Spectral Shrinkage.

    The training loss is `CE(y, p) + eta * L_bss(F)`, where `CE` is the loss
    given to `compile` and `L_bss` is
    `keras_seltransfer.losses.batch_spectral_shrinkage`: the sum of the `k`
    smallest squared singular values of the batch feature matrix `F`, the
    output of layer `features_layer` (the pooled features the head reads,
    before any dropout). Under `tf.distribute` each replica's `F` is its
    own share of the batch.

    Save or export `model.classifier` to serve.

    Args:
        classifier: the functional classifier being fine-tuned.
        eta: weight of the penalty (the authors': 0.001); 0 disables it.
        k: how many of the smallest singular values are penalised (the
            authors': 1).
        features_layer: the layer whose `[batch, dim]` output is `F`;
            default: the one feeding the head (`head_features_layer`).
        **kwargs: base `keras.Model` arguments (`name`).

    Raises:
        ValueError: for `eta` below 0, `k` not a positive int, or a
            features layer that is missing or not 2-D.

    Example:

    ```python
    classifier = build_classifier(small_cnn((32, 32, 1), widths=(8, 16)), 2)
    model = BatchSpectralShrinkageModel(classifier, eta=0.001, k=1)
    model.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"])
    model.fit(images, labels, epochs=3)  # logs bss_loss
    model.classifier.save("model.keras")
    ```

    Reference:
        Chen, Wang, Fu, Long, Wang. Catastrophic Forgetting Meets Negative
        Transfer: Batch Spectral Shrinkage for Safe Transfer Learning.
        NeurIPS 2019.
    """

    TERMS = ("bss_loss",)

    def __init__(self, classifier, eta=0.001, k=1, features_layer=None, **kwargs):
        super().__init__(classifier, **kwargs)
        self.eta = check_loss_weight(eta, "eta")
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"`k` must be a positive int. Received: k={k!r}")
        self.k = k
        if features_layer is None:
            features_layer = head_features_layer(classifier)
        self.features_layer = str(features_layer)
        if self.features_layer not in {layer.name for layer in classifier.layers}:
            raise ValueError(
                f"Model {classifier.name!r} has no layer {self.features_layer!r}. "
                f"Received: features_layer={features_layer!r}"
            )
        features = classifier.get_layer(self.features_layer).output
        if len(features.shape) != 2:
            raise ValueError(
                f"`features_layer` must output [batch, dim] features. Received: "
                f"features_layer={features_layer!r} with output shape {tuple(features.shape)}"
            )
        self._taps = keras.Model(
            classifier.inputs, [classifier.outputs[0], features], name=f"{classifier.name}_taps"
        )
        self.built = True

    def call(self, inputs, training=None):
        probabilities, features = self._taps(inputs, training=training)
        return {"probabilities": probabilities, "features": features}

    def term_weights(self):
        return {"bss_loss": self.eta}

    def terms(self, outputs):
        return {"bss_loss": batch_spectral_shrinkage(outputs["features"], self.k)}

    def get_config(self):
        return {
            "name": self.name,
            "classifier": keras.saving.serialize_keras_object(self.classifier),
            "eta": self.eta,
            "k": self.k,
            "features_layer": self.features_layer,
        }

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        config["classifier"] = keras.saving.deserialize_keras_object(
            config["classifier"], custom_objects=custom_objects
        )
        return cls(**config)


__all__ = ["BatchSpectralShrinkageModel", "DeltaModel", "head_features_layer"]
