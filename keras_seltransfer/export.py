"""SavedModel export of a target classifier, serving raw images."""

import json
import os

import keras
import tensorflow as tf

from keras_seltransfer.utils.io import atomic_directory

SERVING_ENDPOINT = "serve"


def export_saved_model(model, path, class_names=None, overwrite=True):
    """Writes `model` as a TensorFlow SavedModel that serves raw images.

    Only the given model is exported: pass the *target* classifier (for a
    multi-task model, its target sub-model), so no source head or
    training-only branch reaches serving. The `serve` signature takes a
    batch of uint8 images of any height and width with the model's channel
    count, resizes them to the model's input size exactly as the training
    pipeline does (bilinear with antialiasing, skipped when the size already
    matches) and returns `{"probabilities": [batch, classes],
    "class_id": [batch]}`. Class names, when given, are written to
    `assets.extra/class_names.json` inside the SavedModel.

    The directory is written atomically: a failure leaves any previous
    export at `path` untouched.

    Args:
        model: a single-output Keras classifier from raw images in [0, 255].
        path: the SavedModel directory to write.
        class_names: optional list of class names, in label order.
        overwrite: whether an existing export at `path` may be replaced.

    Returns:
        The absolute path written.

    Example:

    ```python
    export_saved_model(model, "runs/exported")
    served = tf.saved_model.load("runs/exported")
    probs = served.serve(tf.zeros([1, 300, 300, 1], tf.uint8))["probabilities"]
    ```
    """
    if len(model.outputs) != 1:
        raise ValueError(
            "export_saved_model exports one classifier output; for a multi-task "
            "model pass its target sub-model. Received: a model with "
            f"{len(model.outputs)} outputs ({[o.name for o in model.outputs]})"
        )
    input_shape = tuple(model.inputs[0].shape[1:])
    if len(input_shape) != 3 or None in input_shape:
        raise ValueError(
            "export_saved_model needs a model with a fixed (height, width, "
            f"channels) input. Received: input shape {input_shape}"
        )
    height, width, channels = (int(d) for d in input_shape)
    num_classes = int(model.outputs[0].shape[-1])
    if class_names is not None and len(class_names) != num_classes:
        raise ValueError(
            f"`class_names` has {len(class_names)} names but the model has "
            f"{num_classes} outputs. Received: class_names={list(class_names)}"
        )

    def serve(images):
        x = tf.cast(images, tf.float32)
        same_size = tf.logical_and(
            tf.equal(tf.shape(x)[1], height), tf.equal(tf.shape(x)[2], width)
        )
        x = tf.cond(
            same_size,
            lambda: x,
            lambda: tf.image.resize(x, (height, width), antialias=True),
        )
        x = tf.ensure_shape(x, [None, height, width, channels])
        probabilities = tf.cast(model(x, training=False), tf.float32)
        return {
            "probabilities": probabilities,
            "class_id": tf.argmax(probabilities, axis=-1, output_type=tf.int32),
        }

    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint(
        name=SERVING_ENDPOINT,
        fn=serve,
        input_signature=[
            tf.TensorSpec([None, None, None, channels], tf.uint8, name="images")
        ],
    )
    with atomic_directory(path, overwrite=overwrite) as tmp:
        archive.write_out(tmp, verbose=False)
        if class_names is not None:
            extra = os.path.join(tmp, "assets.extra")
            os.makedirs(extra, exist_ok=True)
            with open(os.path.join(extra, "class_names.json"), "w") as f:
                json.dump([str(c) for c in class_names], f)
    return os.path.abspath(path)


def load_class_names(path):
    """Reads the class names stored with an export, or None if absent.

    Example:

    ```python
    export_saved_model(model, "exports/elpv", class_names=["ok", "defect"])
    load_class_names("exports/elpv")  # ["ok", "defect"]
    ```
    """
    names = os.path.join(path, "assets.extra", "class_names.json")
    if not os.path.isfile(names):
        return None
    with open(names) as f:
        return json.load(f)


__all__ = [
    "SERVING_ENDPOINT",
    "export_saved_model",
    "load_class_names",
]
