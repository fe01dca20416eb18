"""Knowledge-transferred fine-tuning: a student trained beside a frozen teacher.

KTFT (IEEE Access 2022) fine-tunes an anti-aliased network (the student,
from `keras_seltransfer.models.antialiasing`) on the target data while the
original pretrained network (the teacher, frozen) runs on the same batch,
and adds to the cross-entropy feature losses that transfer the teacher's
intermediate representations: a pixel-level and a global-level loss (see
`keras_seltransfer.losses` for their forms), and optionally a KL divergence
from the teacher's class probabilities to the student's.
"""

import keras
from keras import ops

from keras_seltransfer.losses import GlobalLevelLoss
from keras_seltransfer.losses import PixelLevelLoss
from keras_seltransfer.models import surgery
from keras_seltransfer.models.antialiasing import aligned_layer_name
from keras_seltransfer.utils.validation import check_loss_weight
from keras_seltransfer.utils.validation import check_single_output_model

TERMS = ("pixel", "global", "logit")


def stage_outputs(model):
    """Names of the stage outputs of a CNN: the last feature map at every
    spatial resolution below the input's.

    In topological order, every layer producing a 4-D map is grouped by its
    spatial size; padding and cropping layers are skipped, as are maps at
    the input's resolution (no downsampling yet). For keras.applications'
    ResNet50 this gives `conv1_relu`, `conv2_block3_out`, ...,
    `conv5_block3_out`: the outputs of its downsampling stages. A stage
    output is a layer the rest of the network is a function of: where the
    last map at a resolution comes from a residual branch whose sum is a
    plain operation (ConvNeXt's `x + block(x)`), the last layer at that
    resolution with that property is taken instead (ConvNeXt: the
    downsampling convolution), and a resolution with none is left out.
    Nested functional and `Sequential` models are inlined first.

    Raises:
        ValueError: if a map has no static spatial size.

    Example:

    >>> from keras_seltransfer import models
    >>> models.stage_outputs(models.small_cnn((16, 16, 1), widths=(4, 8)))
    ['block1_relu', 'block2_relu']
    """
    flat = surgery.flatten(model)
    height, width = flat.inputs[0].shape[1:3]
    last = {}
    for layer in flat.layers:
        if isinstance(
            layer, (keras.layers.InputLayer, keras.layers.ZeroPadding2D, keras.layers.Cropping2D)
        ):
            continue
        outputs = layer.output
        if not hasattr(outputs, "shape") or len(outputs.shape) != 4:
            continue
        size = tuple(outputs.shape[1:3])
        if None in size or height is None or width is None:
            raise ValueError(
                f"stage_outputs needs static spatial sizes; layer {layer.name!r} of model "
                f"{model.name!r} has output shape {tuple(outputs.shape)}. Name the layers "
                "to compare explicitly."
            )
        if size[0] >= height and size[1] >= width:
            continue
        last.setdefault(size, []).append(layer)
    names = []
    for layers in last.values():
        cut = next((layer for layer in reversed(layers) if _is_cut(flat, layer)), None)
        if cut is not None:
            names.append(cut.name)
    return names


def _is_cut(model, layer):
    """Whether every path from the model's input to its outputs goes
    through `layer`'s output (so the rest of the model is a function of it)."""
    if any(layer.output is output for output in model.outputs):
        return True
    try:
        keras.Model(layer.output, model.outputs)
    except ValueError:
        return False
    return True


@keras.saving.register_keras_serializable(package="keras_seltransfer")
class KnowledgeTransferModel(keras.Model):
    """Fine-tunes a student classifier while a frozen teacher runs on the same batch.

    The training loss is

        CE(y, p_s) + pixel_weight * L_pixel + global_weight * L_global
            + logit_weight * KL(p_t || p_s),

    where `CE` is the loss given to `compile` (with its sample and class
    weights), `L_pixel` and `L_global` compare the teacher's and the
    student's feature maps at the stage outputs `layer_names` (averaged over
    stages; see `keras_seltransfer.losses`), and `p_t`, `p_s` are the two
    networks' class probabilities. The feature terms are label-free, so
    they are not weighted by sample or class weights. Every term is
    computed and logged as a metric (`pixel_loss`, `global_loss`,
    `logit_loss`, and `val_...` in validation) whatever its weight, so an
    ablation with a weight of 0 still shows what it would have measured.

    The teacher is frozen (`trainable = False`, so its BatchNormalization
    layers use their moving statistics) and is always called with
    `training=False`. Calling the model returns a dict with the student's
    `"probabilities"`, the `"teacher_probabilities"` and both networks'
    `"student_features"` / `"teacher_features"` lists; `predict` returns the
    student's probabilities. Save or export `model.student` to serve: the
    teacher is only needed for training.

    Works in a plain `model.fit` and under `tf.distribute` strategies (build
    it inside the strategy scope).

    Args:
        student: the functional classifier being fine-tuned (for KTFT, the
            output of `antialias(teacher)`).
        teacher: the functional classifier whose representations are
            transferred (the original pretrained network), same input.
        layer_names: the stage outputs compared: teacher layer names, each
            matched to the student layer `aligned_layer_name(student, name)`
            (the same name, or its `_blurpool` replacement), or explicit
            `(teacher_name, student_name)` pairs. Default: every stage
            output of the teacher (`stage_outputs`).
        pixel_weight: weight of the pixel-level loss; 0 disables it.
        global_weight: weight of the global-level loss; 0 disables it.
        logit_weight: weight of the teacher-to-student KL divergence on
            the class probabilities; 0 (the default) disables it.
        **kwargs: base `keras.Model` arguments (`name`).

    Raises:
        ValueError: for a weight below 0, models without exactly one
            output or with different inputs, an unknown layer name, or
            teacher and student maps of different shapes.

    Example:

    ```python
    teacher = build_classifier(load_backbone("runs/pretrain/.../model.keras", (64, 64, 1)), 2)
    student = antialias(teacher, filt_size=4)
    model = KnowledgeTransferModel(student, teacher, pixel_weight=1.0, global_weight=1.0)
    model.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"])
    model.fit(train_ds, validation_data=val_ds, epochs=10)
    model.student.save("student.keras")
    ```

    Reference:
        Knowledge-transferred fine-tuning for anti-aliased convolutional
        neural networks. IEEE Access, 2022.
    """

    def __init__(
        self,
        student,
        teacher,
        layer_names=None,
        pixel_weight=1.0,
        global_weight=1.0,
        logit_weight=0.0,
        **kwargs,
    ):
        super().__init__(**kwargs)
        check_single_output_model(student, "student")
        check_single_output_model(teacher, "teacher")
        if tuple(student.inputs[0].shape) != tuple(teacher.inputs[0].shape) or len(
            student.inputs
        ) != len(teacher.inputs):
            raise ValueError(
                "The student and the teacher must take the same input. Received: student "
                f"input {tuple(student.inputs[0].shape)}, teacher input "
                f"{tuple(teacher.inputs[0].shape)}"
            )
        if tuple(student.outputs[0].shape) != tuple(teacher.outputs[0].shape):
            raise ValueError(
                "The student and the teacher must predict the same classes. Received: "
                f"student output {tuple(student.outputs[0].shape)}, teacher output "
                f"{tuple(teacher.outputs[0].shape)}"
            )
        self.pixel_weight = check_loss_weight(pixel_weight, "pixel_weight")
        self.global_weight = check_loss_weight(global_weight, "global_weight")
        self.logit_weight = check_loss_weight(logit_weight, "logit_weight")
        self.student = student
        self.teacher = teacher
        teacher.trainable = False
        self.layer_names = self._pairs(layer_names)
        teacher_maps = [teacher.get_layer(t).output for t, _ in self.layer_names]
        student_maps = [student.get_layer(s).output for _, s in self.layer_names]
        self._student_taps = keras.Model(
            student.inputs, [student.outputs[0], *student_maps], name=f"{student.name}_taps"
        )
        self._teacher_taps = keras.Model(
            teacher.inputs, [teacher.outputs[0], *teacher_maps], name=f"{teacher.name}_taps"
        )
        self.pixel_level_loss = PixelLevelLoss()
        self.global_level_loss = GlobalLevelLoss()
        self.logit_loss = keras.losses.KLDivergence(name="logit_kl")
        self.trackers = {term: keras.metrics.Mean(name=f"{term}_loss") for term in TERMS}
        # Every layer is built (the two networks are), so weights can be
        # loaded (a resumed run) before the first call.
        self.built = True

    def _pairs(self, layer_names):
        names = stage_outputs(self.teacher) if layer_names is None else list(layer_names)
        if not names:
            raise ValueError(
                "`layer_names` must name at least one layer to compare. "
                f"Received: layer_names={layer_names!r}"
            )
        teacher_names = {layer.name for layer in self.teacher.layers}
        student_names = {layer.name for layer in self.student.layers}
        pairs = []
        for item in names:
            if isinstance(item, (tuple, list)) and len(item) == 2:
                teacher_name, student_name = str(item[0]), str(item[1])
            elif isinstance(item, str):
                teacher_name = item
                try:
                    student_name = aligned_layer_name(self.student, item)
                except ValueError:
                    student_name = item  # reported as missing below
            else:
                raise ValueError(
                    "`layer_names` must hold layer names or (teacher, student) name pairs. "
                    f"Received: {item!r}"
                )
            for name, known, model in (
                (teacher_name, teacher_names, self.teacher),
                (student_name, student_names, self.student),
            ):
                if name not in known:
                    raise ValueError(
                        f"Model {model.name!r} has no layer {name!r}. "
                        f"Received: layer_names={layer_names!r}"
                    )
            teacher_shape = tuple(self.teacher.get_layer(teacher_name).output.shape)
            student_shape = tuple(self.student.get_layer(student_name).output.shape)
            if teacher_shape != student_shape:
                raise ValueError(
                    f"Teacher layer {teacher_name!r} outputs {teacher_shape} but student layer "
                    f"{student_name!r} outputs {student_shape}; compare maps of equal shape."
                )
            pairs.append((teacher_name, student_name))
        return pairs

    @property
    def inputs(self):
        """The student's (and the teacher's) symbolic inputs."""
        return self.student.inputs

    def call(self, inputs, training=None):
        student = self._student_taps(inputs, training=training)
        teacher = self._teacher_taps(inputs, training=False)
        teacher = [ops.stop_gradient(t) for t in teacher]
        return {
            "probabilities": student[0],
            "teacher_probabilities": teacher[0],
            "student_features": list(student[1:]),
            "teacher_features": list(teacher[1:]),
        }

    def transfer_terms(self, outputs):
        """Per-example values `[batch]` of the three transfer terms, from the
        dict the model returns: `{"pixel", "global", "logit"}`."""
        teacher, student = outputs["teacher_features"], outputs["student_features"]
        return {
            "pixel": self.pixel_level_loss.call(teacher, student),
            "global": self.global_level_loss.call(teacher, student),
            "logit": keras.losses.kl_divergence(
                ops.cast(outputs["teacher_probabilities"], "float32"),
                ops.cast(outputs["probabilities"], "float32"),
            ),
        }

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        loss = super().compute_loss(
            x=x, y=y, y_pred=y_pred["probabilities"], sample_weight=sample_weight, training=training
        )
        for term, values in self.transfer_terms(y_pred).items():
            self.trackers[term].update_state(values)
        teacher, student = y_pred["teacher_features"], y_pred["student_features"]
        if self.pixel_weight:
            loss = loss + self.pixel_weight * self.pixel_level_loss(teacher, student)
        if self.global_weight:
            loss = loss + self.global_weight * self.global_level_loss(teacher, student)
        if self.logit_weight:
            loss = loss + self.logit_weight * self.logit_loss(
                ops.cast(y_pred["teacher_probabilities"], "float32"),
                ops.cast(y_pred["probabilities"], "float32"),
            )
        return loss

    def compute_metrics(self, x, y, y_pred, sample_weight=None):
        return super().compute_metrics(x, y, y_pred["probabilities"], sample_weight=sample_weight)

    def predict_step(self, data):
        x, _, _ = keras.utils.unpack_x_y_sample_weight(data)
        return self.student(x, training=False)

    def get_config(self):
        return {
            "name": self.name,
            "student": keras.saving.serialize_keras_object(self.student),
            "teacher": keras.saving.serialize_keras_object(self.teacher),
            "layer_names": [list(pair) for pair in self.layer_names],
            "pixel_weight": self.pixel_weight,
            "global_weight": self.global_weight,
            "logit_weight": self.logit_weight,
        }

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        for key in ("student", "teacher"):
            config[key] = keras.saving.deserialize_keras_object(
                config[key], custom_objects=custom_objects
            )
        return cls(**config)


__all__ = ["KnowledgeTransferModel", "TERMS", "stage_outputs"]
