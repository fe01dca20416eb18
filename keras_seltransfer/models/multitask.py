"""One shared backbone with a source head and a target head.

The model of selective joint fine-tuning (Ge & Yu, CVPR 2017): source and
target images pass through the same backbone in one mixed batch (so
BatchNorm statistics come from both), and each task has its own softmax
head. Train it with `make_joint_dataset` batches and the compile arguments
of `joint_compile_args`; serve the target task with `target_model`.
"""

import keras

from keras_seltransfer.models.classifier import head_input

SOURCE = "source"
TARGET = "target"


def build_multitask_model(
    backbone,
    num_source_classes,
    num_target_classes,
    *,
    dropout=0.0,
    source_head="source_head",
    target_head="target_head",
    name="multitask",
):
    """Builds a two-head model on a shared backbone.

    Args:
        backbone: a `keras.Model` from images to pooled features
            `[batch, features]`.
        num_source_classes: classes of the source head (the compact source
            label space of a `JointSampler`); at least 1.
        num_target_classes: classes of the target head; at least 2.
        dropout: dropout rate before both heads.
        source_head: name of the source head's dense layer.
        target_head: name of the target head's dense layer.
        name: model name.

    Returns:
        A functional `keras.Model` whose output is a dict
        `{"target": probabilities, "source": probabilities}`; both heads
        compute in float32 under mixed precision.

    Example:

    ```python
    model = build_multitask_model(backbone, sampler.num_source_classes, 2)
    model.compile(keras.optimizers.Adam(1e-3), **joint_compile_args())
    model.fit(joint_ds, validation_data=val_ds, epochs=10, callbacks=[sampler])
    classifier = target_model(model)
    ```
    """
    if int(num_source_classes) < 1:
        raise ValueError(
            f"`num_source_classes` must be at least 1. Received: {num_source_classes}"
        )
    if int(num_target_classes) < 2:
        raise ValueError(
            f"`num_target_classes` must be at least 2. Received: {num_target_classes}"
        )
    if source_head == target_head:
        raise ValueError("The two heads need different names.")
    x = head_input(backbone, dropout, "heads_dropout")
    target = keras.layers.Dense(
        int(num_target_classes), activation="softmax", dtype="float32", name=target_head
    )(x)
    source = keras.layers.Dense(
        int(num_source_classes), activation="softmax", dtype="float32", name=source_head
    )(x)
    inputs = backbone.inputs[0] if len(backbone.inputs) == 1 else backbone.inputs
    return keras.Model(inputs, {TARGET: target, SOURCE: source}, name=name)


def target_model(model, head="target_head", name=None):
    """The backbone and the target head as a standalone classifier.

    The returned model shares its layers (and weights) with `model`; save or
    export it like any classifier of `build_classifier`.

    Example:

    >>> from keras_seltransfer import models
    >>> backbone = models.small_cnn((16, 16, 1), widths=(4, 8))
    >>> model = models.build_multitask_model(backbone, 5, 3)
    >>> classifier = models.target_model(model)
    >>> classifier.name, classifier.output_shape
    ('multitask_target', (None, 3))
    """
    try:
        output = model.get_layer(head).output
    except ValueError as e:
        raise ValueError(
            f"Model {model.name!r} has no layer named {head!r}; expected a model of "
            "build_multitask_model."
        ) from e
    inputs = model.inputs[0] if len(model.inputs) == 1 else model.inputs
    return keras.Model(inputs, output, name=name or f"{model.name}_{TARGET}")


def joint_compile_args(target_weight=0.5, source_weight=0.5):
    """`compile` keyword arguments for the joint loss.

    loss = target_weight * CE(target) + source_weight * CE(source), each
    cross-entropy averaged over its own half of a `make_joint_dataset` batch
    (through the sample weights the pipeline provides). The target head
    reports `target_accuracy` and `target_crossentropy` (and `val_` versions),
    weighted so only target images count.

    Example:

    >>> from keras_seltransfer import models
    >>> args = models.joint_compile_args(target_weight=0.7, source_weight=0.3)
    >>> sorted(args), args["loss_weights"]
    (['loss', 'loss_weights', 'weighted_metrics'], {'target': 0.7, 'source': 0.3})

    ```python
    model.compile(keras.optimizers.Adam(1e-3), **args)
    ```
    """
    for label, value in (("target_weight", target_weight), ("source_weight", source_weight)):
        if float(value) < 0:
            raise ValueError(f"`{label}` must be >= 0. Received: {label}={value}")
    if float(target_weight) == 0:
        raise ValueError("`target_weight` must be > 0: the target task is what is learnt.")
    return {
        "loss": {
            TARGET: keras.losses.SparseCategoricalCrossentropy(),
            SOURCE: keras.losses.SparseCategoricalCrossentropy(),
        },
        "loss_weights": {TARGET: float(target_weight), SOURCE: float(source_weight)},
        "weighted_metrics": {
            TARGET: [
                keras.metrics.SparseCategoricalAccuracy(name="accuracy"),
                keras.metrics.SparseCategoricalCrossentropy(name="crossentropy"),
            ]
        },
    }


__all__ = ["build_multitask_model", "joint_compile_args", "target_model"]
