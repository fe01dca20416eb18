"""Classification heads on a backbone, and BatchNorm handling for fine-tuning."""

import keras

from keras_seltransfer.utils.validation import check_choice

BATCHNORM_MODES = ("frozen", "train")


def build_classifier(backbone, num_classes, dropout=0.0, head_name="target_head", name=None):
    """Attaches a softmax classification head to a backbone.

    The head reuses the backbone's layers (one flat functional graph, weights
    shared with `backbone`), so later model surgery sees every layer. The
    head computes in float32 even under a mixed-precision policy, keeping the
    softmax and the loss numerically safe.

    Args:
        backbone: a `keras.Model` from images to `[batch, features]`.
        num_classes: number of output classes (at least 2).
        dropout: dropout rate before the dense layer, in [0, 1).
        head_name: name of the dense output layer (`"target_head"` for the
            target task; the multi-task builder adds a `"source_head"`).
        name: model name; defaults to `"<backbone>_classifier"`.

    Returns:
        A `keras.Model` from raw images to class probabilities.

    Example:

    >>> from keras_seltransfer import models
    >>> backbone = models.small_cnn((16, 16, 1), widths=(4, 8))
    >>> classifier = models.build_classifier(backbone, 3, dropout=0.2)
    >>> classifier.name, classifier.output_shape, classifier.layers[-1].name
    ('small_cnn_classifier', (None, 3), 'target_head')
    """
    if int(num_classes) < 2:
        raise ValueError(
            f"`num_classes` must be at least 2. Received: num_classes={num_classes}"
        )
    x = head_input(backbone, dropout, f"{head_name}_dropout")
    outputs = keras.layers.Dense(
        int(num_classes), activation="softmax", dtype="float32", name=head_name
    )(x)
    inputs = backbone.inputs[0] if len(backbone.inputs) == 1 else backbone.inputs
    return keras.Model(inputs, outputs, name=name or f"{backbone.name}_classifier")


def head_input(backbone, dropout, dropout_name):
    """The backbone's pooled features, after dropout when `dropout` > 0: what
    classification heads are attached to (checks both arguments)."""
    if not 0.0 <= float(dropout) < 1.0:
        raise ValueError(f"`dropout` must be in [0, 1). Received: dropout={dropout}")
    features = backbone.outputs[0]
    if len(features.shape) != 2:
        raise ValueError(
            "The backbone must output pooled features [batch, features]; cut it "
            "with `cut_backbone(model, layer, pooling='avg')`. "
            f"Received: backbone output shape={tuple(features.shape)}"
        )
    if dropout:
        return keras.layers.Dropout(float(dropout), name=dropout_name)(features)
    return features


def iter_layers(model):
    """Yields every layer of `model`, descending into nested models."""
    for layer in model.layers:
        yield layer
        if isinstance(layer, keras.Model):
            yield from iter_layers(layer)


def set_batchnorm_mode(model, mode):
    """Sets how BatchNormalization layers behave during fine-tuning.

    The Keras pitfall: a BatchNormalization layer in training mode replaces
    its pretrained moving statistics with ones estimated from small, shifted
    target batches, and with few steps per epoch the moving averages lag
    behind the weights, so validation loss swings. With `"frozen"` every
    BatchNormalization layer is made non-trainable, which in Keras 3 also
    makes it run in inference mode (pretrained statistics, fixed scale and
    offset) while the convolutions around it fine-tune. `"train"` updates
    statistics and affine parameters from the batches (needed when training
    from scratch).

    Args:
        model: the model to change in place (before `compile`).
        mode: `"frozen"` or `"train"`.

    Returns:
        The number of BatchNormalization layers changed.

    Example:

    >>> from keras_seltransfer import models
    >>> classifier = models.build_classifier(models.small_cnn((16, 16, 1), widths=(4, 8)), 3)
    >>> models.set_batchnorm_mode(classifier, "frozen")
    2
    >>> classifier.get_layer("block1_bn").trainable
    False
    """
    check_choice(mode, "mode", BATCHNORM_MODES)
    count = 0
    for layer in iter_layers(model):
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.trainable = mode == "train"
            count += 1
    return count
