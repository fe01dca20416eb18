"""Backbones by name: every `keras.applications` constructor and KerasHub presets.

Both kinds are wrapped the same way as the built-in backbones: the model
takes raw images (float pixel values in [0, 255], channels last) and holds
the normalisation its pretrained weights expect, so training, evaluation and
the exported SavedModel all feed it the same raw pixels.
`models.load_backbone` dispatches here for names.
"""

import os
import re
import zipfile

import keras

from keras_seltransfer.layers.image_preprocessing import ImagePreprocessing

# Every keras.applications constructor, with the input normalisation its
# ImageNet weights were trained with: the `ImagePreprocessing` mode equal to
# its module's `preprocess_input`. "none": the model normalises [0, 255]
# pixels itself (ConvNeXt, EfficientNet, EfficientNetV2 and MobileNetV3
# include their preprocessing layers).
APPLICATION_MODES = {
    "ConvNeXtTiny": "none",
    "ConvNeXtSmall": "none",
    "ConvNeXtBase": "none",
    "ConvNeXtLarge": "none",
    "ConvNeXtXLarge": "none",
    "DenseNet121": "torch",
    "DenseNet169": "torch",
    "DenseNet201": "torch",
    **{f"EfficientNetB{i}": "none" for i in range(8)},
    **{f"EfficientNetV2{v}": "none" for v in ("B0", "B1", "B2", "B3", "S", "M", "L")},
    "InceptionResNetV2": "tf",
    "InceptionV3": "tf",
    "MobileNet": "tf",
    "MobileNetV2": "tf",
    "MobileNetV3Small": "none",
    "MobileNetV3Large": "none",
    "NASNetMobile": "tf",
    "NASNetLarge": "tf",
    "ResNet50": "caffe",
    "ResNet101": "caffe",
    "ResNet152": "caffe",
    "ResNet50V2": "tf",
    "ResNet101V2": "tf",
    "ResNet152V2": "tf",
    "VGG16": "caffe",
    "VGG19": "caffe",
    "Xception": "tf",
}

# A backbone spec naming a KerasHub preset starts with this prefix.
HUB_PREFIX = "kerashub:"
# The `weights` value that loads a KerasHub preset's own weights.
HUB_PRESET_WEIGHTS = "preset"


def normalise_name(name):
    """A backbone name without case and punctuation, as names are matched.

    Example:

    >>> normalise_name("mobilenet_v2") == normalise_name("MobileNetV2")
    True
    """
    return re.sub(r"[^a-z0-9]", "", name.lower())


_APPLICATIONS = {normalise_name(name): name for name in APPLICATION_MODES}


def application_name(spec):
    """The `keras.applications` constructor a spec names, or None.

    Example:

    >>> application_name("resnet_50"), application_name("small_cnn")
    ('ResNet50', None)
    """
    return _APPLICATIONS.get(normalise_name(os.fspath(spec)))


def build_application(name, input_shape, weights=None, pooling="avg"):
    """A `keras.applications` model from raw images, as one flat graph.

    The application is built on top of an `ImagePreprocessing` layer with
    its family's normalisation (`APPLICATION_MODES`), with `input_tensor=`,
    so its layers sit in the returned model's own graph.

    Args:
        name: a constructor name (`application_name` resolves other
            spellings).
        input_shape: `(height, width, 3)`.
        weights: None (random initialisation), `"imagenet"` (downloaded by
            Keras on first use) or a weights file.
        pooling: `"avg"`, `"max"` or None (the last feature map).

    Returns:
        A functional `keras.Model` named after the application.

    Raises:
        ValueError: if the application cannot be built for `input_shape`.

    Example:

    >>> model = build_application("MobileNetV2", (32, 32, 3))
    >>> model.output_shape, model.get_layer("preprocess").mode
    ((None, 1280), 'tf')
    """
    constructor = getattr(keras.applications, name)
    inputs = keras.Input(shape=tuple(input_shape), name="image")
    x = ImagePreprocessing(APPLICATION_MODES[name], name="preprocess")(inputs)
    try:
        app = constructor(include_top=False, weights=weights, input_tensor=x, pooling=pooling)
    except ValueError as e:
        raise ValueError(
            f"keras.applications.{name} cannot be built for input_shape={tuple(input_shape)}: {e}"
        ) from e
    return keras.Model(inputs, app.output, name=normalise_name(name))


def is_hub_spec(spec):
    """Whether a backbone spec names a KerasHub preset (`"kerashub:<preset>"`).

    Example:

    >>> is_hub_spec("kerashub:resnet_50_imagenet"), is_hub_spec("ResNet50")
    (True, False)
    """
    return os.fspath(spec).startswith(HUB_PREFIX)


def _keras_hub(what):
    try:
        import keras_hub  # An optional dependency, needed only for its models.
    except ImportError as e:
        raise ValueError(
            f"{what} needs KerasHub, which is not installed: `pip install keras-hub`."
        ) from e
    return keras_hub


def build_hub_backbone(spec, input_shape, weights=None):
    """A KerasHub image backbone from raw images, pooled to a feature vector.

    The preset's `ImageConverter` (its scale and offset; resizing is left to
    the data pipeline) normalises the raw pixels inside the model, the
    preset's backbone follows as a nested model, and global average pooling
    (layer `"avg_pool"`) makes the feature vector.

    Args:
        spec: `"kerashub:<preset>"`, a KerasHub preset name or handle
            (downloaded by KerasHub) or a local preset directory (written by
            `backbone.save_to_preset` and `converter.save_to_preset`).
        input_shape: `(height, width, channels)`; channels None for 3.
        weights: None (the preset's architecture, randomly initialised) or
            `"preset"` (the preset's pretrained weights).

    Returns:
        A functional `keras.Model` from `[batch, height, width, channels]`
        raw pixels to `[batch, features]`.

    Raises:
        ValueError: without KerasHub, for other `weights`, a preset without
            an image converter, or a backbone whose output is not a feature
            map or vector.

    Example:

    ```python
    backbone = build_hub_backbone("kerashub:resnet_50_imagenet", (224, 224, 3), "preset")
    ```
    """
    preset = os.fspath(spec)[len(HUB_PREFIX):]
    if weights not in (None, HUB_PRESET_WEIGHTS):
        raise ValueError(
            f"A KerasHub backbone takes weights None (random initialisation) or "
            f"{HUB_PRESET_WEIGHTS!r} (the preset's). Received: weights={weights!r}"
        )
    keras_hub = _keras_hub(f"Backbone {spec!r}")
    backbone = keras_hub.models.Backbone.from_preset(
        preset, load_weights=weights == HUB_PRESET_WEIGHTS
    )
    try:
        converter = keras_hub.layers.ImageConverter.from_preset(preset)
    except ValueError as e:
        raise ValueError(
            f"KerasHub preset {preset!r} has no image converter, so the normalisation its "
            f"backbone expects is unknown; expected an image backbone preset: {e}"
        ) from e
    # The data pipeline resizes; the converter keeps only its normalisation.
    converter = type(converter).from_config(
        {**converter.get_config(), "image_size": None, "name": "preprocess"}
    )
    channels = 3 if input_shape[-1] is None else input_shape[-1]
    inputs = keras.Input(shape=(*input_shape[:2], channels), name="image")
    outputs = backbone(converter(inputs))
    if len(outputs.shape) == 4:
        outputs = keras.layers.GlobalAveragePooling2D(name="avg_pool")(outputs)
    elif len(outputs.shape) != 2:
        raise ValueError(
            f"KerasHub backbone {preset!r} outputs {tuple(outputs.shape)}; expected a "
            "feature map [batch, height, width, channels] or a feature vector."
        )
    return keras.Model(inputs, outputs, name=normalise_name(os.path.basename(preset)) or "hub")


def import_hub_for_file(path):
    """Imports KerasHub when a `.keras` file holds KerasHub objects.

    KerasHub registers its layers and models with Keras when imported, so a
    saved model containing them loads only after that import; this reads
    the archive's `config.json` and imports KerasHub only when it is named.

    Args:
        path: a `.keras` zip archive.

    Raises:
        ValueError: if the file needs KerasHub and it is not installed.

    Example:

    ```python
    import_hub_for_file("run/model.keras")
    model = keras.saving.load_model("run/model.keras")
    ```
    """
    try:
        with zipfile.ZipFile(path) as archive:
            config = archive.read("config.json")
    except (OSError, KeyError, zipfile.BadZipFile):
        # Not an archive with a config: loading reports that.
        return
    if b'"keras_hub' in config:
        _keras_hub(f"The model file {os.fspath(path)!r}")


__all__ = [
    "APPLICATION_MODES",
    "HUB_PREFIX",
    "HUB_PRESET_WEIGHTS",
    "application_name",
    "build_application",
    "build_hub_backbone",
    "import_hub_for_file",
    "is_hub_spec",
    "normalise_name",
]
