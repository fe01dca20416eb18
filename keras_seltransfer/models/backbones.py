"""Backbones: built-in CPU-sized CNNs, names (keras.applications, KerasHub), `.keras` files.

Every backbone returned here maps raw images (float pixel values in [0, 255],
channels last) to a pooled feature vector `[batch, features]`, with the
backbone's own input normalisation inside the model (`ImagePreprocessing`), so
the same raw pixels serve training, evaluation and the exported SavedModel.
"""

import difflib
import json
import os
import zipfile

import keras

from keras_seltransfer.layers.image_preprocessing import ImagePreprocessing
from keras_seltransfer.models.named_backbones import APPLICATION_MODES
from keras_seltransfer.models.named_backbones import application_name
from keras_seltransfer.models.named_backbones import build_application
from keras_seltransfer.models.named_backbones import build_hub_backbone
from keras_seltransfer.models.named_backbones import import_hub_for_file
from keras_seltransfer.models.named_backbones import is_hub_spec
from keras_seltransfer.models.named_backbones import normalise_name
from keras_seltransfer.models.surgery import recursion_allowance

# Where the `pretrain` app saves its default backbone (Fashion-MNIST,
# small_cnn, 64 px), relative to the working directory: the backbone that
# fine-tuning and a conv filter bank use when none is named.
DEFAULT_PRETRAIN_DIR = os.path.join("runs", "pretrain", "fashion_mnist-small_cnn-64")
DEFAULT_BACKBONE = os.path.join(DEFAULT_PRETRAIN_DIR, "model.keras")

# Layer name at which models saved by the `pretrain` app are cut.
FEATURES_LAYER = "features"

def small_cnn(
    input_shape=(64, 64, 1), widths=(32, 64, 128, 128), stem_stride=2, name="small_cnn"
):
    """The built-in CPU-sized backbone: conv-BN-ReLU blocks with max pooling.

    Each block is a 3x3 convolution (no bias), batch normalisation and ReLU;
    the first convolution has stride `stem_stride`, all blocks but the last
    end with a 2x2 max pool, and global average pooling gives the feature
    vector (layer `"features"`). With the default widths and one input
    channel it has 241,312 parameters. The strided stem keeps full-resolution
    feature maps out of the network: at 64x64 on two CPU cores it trains
    several times faster than the same network with a stride-1 stem, for the
    same parameters. Being fully convolutional it accepts any input size, so
    a backbone pretrained at one size transfers to another.

    Args:
        input_shape: `(height, width, channels)` of the raw images.
        widths: output channels of each block.
        stem_stride: stride of the first convolution (1 or 2).
        name: model name.

    Returns:
        A functional `keras.Model` from raw images in [0, 255] to
        `[batch, widths[-1]]` features.

    Example:

    >>> from keras_seltransfer import models
    >>> models.small_cnn((16, 16, 1), widths=(4, 8)).output_shape
    (None, 8)
    >>> models.small_cnn().count_params()
    241312
    """
    if len(input_shape) != 3:
        raise ValueError(
            "`input_shape` must be (height, width, channels). "
            f"Received: input_shape={input_shape}"
        )
    if stem_stride not in (1, 2):
        raise ValueError(f"`stem_stride` must be 1 or 2. Received: stem_stride={stem_stride}")
    if not widths or any(int(w) <= 0 for w in widths):
        raise ValueError(
            f"`widths` must be a non-empty list of positive ints. Received: widths={widths}"
        )
    inputs = keras.Input(shape=tuple(input_shape), name="image")
    x = ImagePreprocessing("rescale", name="preprocess")(inputs)
    for i, width in enumerate(widths, start=1):
        x = keras.layers.Conv2D(
            int(width),
            3,
            strides=stem_stride if i == 1 else 1,
            padding="same",
            use_bias=False,
            name=f"block{i}_conv",
        )(x)
        x = keras.layers.BatchNormalization(name=f"block{i}_bn")(x)
        x = keras.layers.ReLU(name=f"block{i}_relu")(x)
        if i < len(widths):
            x = keras.layers.MaxPooling2D(2, name=f"block{i}_pool")(x)
    outputs = keras.layers.GlobalAveragePooling2D(name=FEATURES_LAYER)(x)
    return keras.Model(inputs, outputs, name=name)


BUILTIN_BACKBONES = {"small_cnn": small_cnn}
_BUILTIN_BY_KEY = {normalise_name(k): v for k, v in BUILTIN_BACKBONES.items()}


def available_backbones():
    """Names accepted by `load_backbone` besides `.keras` paths and
    `"kerashub:<preset>"` specs: the built-in backbones and every
    `keras.applications` constructor.

    Example:

    >>> from keras_seltransfer import models
    >>> names = models.available_backbones()
    >>> names[0], "ResNet50" in names
    ('small_cnn', True)
    """
    return sorted(BUILTIN_BACKBONES) + sorted(APPLICATION_MODES)


def _unknown_backbone_message(spec):
    names = available_backbones()
    by_key = {normalise_name(name): name for name in names}
    close = [by_key[k] for k in difflib.get_close_matches(normalise_name(spec), by_key, n=3)]
    hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    return (
        f"Unknown backbone {spec!r}.{hint} Expected a path to a `.keras` file, "
        f"'kerashub:<preset>' or one of: {', '.join(names)}. Received: spec={spec!r}"
    )


def _single(tensors):
    # A one-element input list makes `model.input` a list; unwrap it.
    return tensors[0] if len(tensors) == 1 else tensors


def _saved_layer_count(path):
    """Number of layers in the config of a `.keras` archive, nested models
    included (0 for other formats or an unreadable config)."""
    try:
        with zipfile.ZipFile(path) as archive:
            config = json.loads(archive.read("config.json"))
    except (OSError, KeyError, ValueError, zipfile.BadZipFile):
        return 0
    count = 0
    stack = [config]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            # A layer of a functional graph lists the nodes it was called on.
            count += "inbound_nodes" in item
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return count


def load_keras_file(path, what="model"):
    """Loads a saved Keras model in safe mode, with errors that name the file.

    Safe mode refuses to deserialize Python code (a `Lambda` layer holding a
    Python function) or objects from modules outside Keras and the
    registered custom objects, so a file from an untrusted source cannot run
    code while it loads. Whatever makes a file unloadable (not a `.keras`
    zip archive, truncated, unknown classes, refused code) is reported as
    one `ValueError` naming the file.

    Deep graphs load too: Keras rebuilds a saved functional graph
    recursively, and a model with more than about a thousand layers on one
    path (EfficientNetV2L after `selective_filter_transfer`) passes
    Python's default recursion limit in `keras.saving.load_model`; the
    limit is raised while this function loads, by the size of the saved
    graph.

    Args:
        path: a `.keras` file (or a legacy `.h5` file, also loaded in safe
            mode).
        what: how the file is called in errors (`"backbone"`, `"model"`).

    Returns:
        The uncompiled `keras.Model`.

    Raises:
        FileNotFoundError: if `path` is not a file.
        ValueError: if the file cannot be loaded safely.

    Example:

    >>> import os
    >>> import tempfile
    >>> from keras_seltransfer import models
    >>> path = os.path.join(tempfile.mkdtemp(), "backbone.keras")
    >>> models.small_cnn((16, 16, 1), widths=(4, 8)).save(path)
    >>> models.load_keras_file(path).name
    'small_cnn'
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what.capitalize()} file not found: {path!r}.")
    if path.endswith(".keras") and not zipfile.is_zipfile(path):
        state = "empty" if os.path.getsize(path) == 0 else "truncated or in another format"
        raise ValueError(
            f"The {what} file {path!r} is not a Keras model archive: a .keras file is a "
            f"zip archive, and this one is {state}. Expected a file written by "
            "`model.save('....keras')`."
        )
    import_hub_for_file(path)
    try:
        with recursion_allowance(_saved_layer_count(path)):
            return keras.saving.load_model(path, compile=False, safe_mode=True)
    # Keras reports unloadable files with many types (ValueError, TypeError,
    # KeyError, OSError from h5py, zip errors); each means this file cannot
    # be used, and the caller gets one error naming it.
    except Exception as e:  # noqa: BLE001
        message = " ".join(str(e).split())
        if "safe_mode" in message or "unsafe_deserialization" in message:
            # Keras' advice is to turn safe mode off, which only the owner of
            # a trusted file may do; the refusal is reported without it.
            raise ValueError(
                f"Refused to load the {what} in {path!r}: it holds Python code "
                f"({message.split('. ')[0]}), which Keras never runs when loading with "
                "safe_mode=True. Expected a model of Keras and keras_seltransfer layers only."
            ) from e
        # Keras wraps the cause in the whole model config; the cause is what
        # tells the user what is wrong with the file.
        message = message.rsplit("Exception encountered:", 1)[-1].strip()
        message = message.split(" Full object config:")[0]
        if len(message) > 600:
            message = message[:600] + " ..."
        raise ValueError(
            f"Could not load the {what} in {path!r} (Keras safe mode): "
            f"{type(e).__name__}: {message}"
        ) from e


def is_backbone_path(spec):
    """Whether a backbone spec names a saved model file rather than a name.

    Example:

    >>> from keras_seltransfer import models
    >>> models.is_backbone_path("pretrained.keras"), models.is_backbone_path("ResNet50")
    (True, False)
    """
    spec = os.fspath(spec)
    return not is_hub_spec(spec) and (spec.endswith(".keras") or os.sep in spec)


def is_builtin_backbone(spec):
    """Whether a backbone spec names one of the built-in backbones.

    Example:

    >>> from keras_seltransfer import models
    >>> models.is_builtin_backbone("small_cnn"), models.is_builtin_backbone("ResNet50")
    (True, False)
    """
    return normalise_name(os.fspath(spec)) in _BUILTIN_BY_KEY


def cut_backbone(model, layer_name, pooling="avg"):
    """Cuts `model` at `layer_name` and returns the trunk up to that layer.

    Args:
        model: a functional `keras.Model`.
        layer_name: name of the layer whose output becomes the features.
        pooling: `"avg"` or `"max"` global pooling added when the layer's
            output is a feature map, or `None` to keep the map.

    Returns:
        A `keras.Model` sharing layers (and weights) with `model`.

    Raises:
        ValueError: if the layer does not exist or pooling is unknown.
    """
    names = [layer.name for layer in model.layers]
    if layer_name not in names:
        shown = ", ".join(names[-12:])
        raise ValueError(
            f"Model {model.name!r} has no layer named {layer_name!r}; its last "
            f"layers are: {shown}. Received: layer_name={layer_name!r}"
        )
    if pooling not in ("avg", "max", None):
        raise ValueError(
            f"`pooling` must be 'avg', 'max' or None. Received: pooling={pooling!r}"
        )
    outputs = model.get_layer(layer_name).output
    if pooling and len(outputs.shape) == 4:
        pool = (
            keras.layers.GlobalAveragePooling2D
            if pooling == "avg"
            else keras.layers.GlobalMaxPooling2D
        )
        outputs = pool(name=f"{layer_name}_{pooling}pool")(outputs)
    return keras.Model(_single(model.inputs), outputs, name=f"{model.name}_trunk")


def _resize_input(model, input_shape):
    """Rebuilds a fully-convolutional model for another input size."""
    clone = keras.models.clone_model(
        model, input_tensors=keras.Input(shape=tuple(input_shape), name="image")
    )
    clone.set_weights(model.get_weights())
    return clone


def with_dtype_policy(model, policy, keep_float32=None):
    """Returns a copy of `model` whose layers compute in `policy`.

    Models loaded from `.keras` files keep the dtype policy they were saved
    with, so a global mixed-precision policy does not reach them; this clones
    every layer with the new policy and copies the weights. The layers that
    produce the model's outputs (classification heads) stay in float32 so
    the softmax and the loss stay numerically safe.

    Args:
        model: a functional model.
        policy: a dtype policy name such as `"mixed_bfloat16"`.
        keep_float32: names of layers to leave in float32; defaults to the
            layers producing the model's outputs.
    """
    if keep_float32 is None:
        keep_float32 = {
            layer.name
            for layer in model.layers
            if any(layer.output is out for out in model.outputs)
        }

    def clone_layer(layer):
        config = layer.get_config()
        if not isinstance(layer, keras.layers.InputLayer) and layer.name not in keep_float32:
            config["dtype"] = policy
        return layer.__class__.from_config(config)

    clone = keras.models.clone_model(model, clone_function=clone_layer)
    clone.set_weights(model.get_weights())
    return clone


def load_backbone(spec, input_shape, weights=None, cut_layer=None):
    """Returns a backbone from a name or a saved `.keras` file.

    Args:
        spec: one of
            - a built-in name (`"small_cnn"`);
            - a `keras.applications` name, any case or punctuation
              (`"ResNet50"`, `"mobilenet_v2"`); built without its top and
              with global average pooling, its family's `preprocess_input`
              inside the model (`named_backbones.build_application`);
            - `"kerashub:<preset>"`: a KerasHub preset name or local preset
              directory (`named_backbones.build_hub_backbone`);
            - a path to a `.keras` model (for example one written by the
              `pretrain` app), loaded in safe mode. It is cut at
              `cut_layer`, or at its `"features"` layer when it has one.
        input_shape: `(height, width, channels)` of the raw input images. A
            saved model built for another size is rebuilt for this one
            (fully convolutional models only). `channels` may be None for a
            saved model (its own count) or an application (3).
        weights: for built-in and application backbones: `None` (random
            initialisation), `"imagenet"` (applications only; needs
            internet on first use) or a path to a weights file; for a
            KerasHub preset: `None` or `"preset"` (its own weights).
        cut_layer: layer name to cut a saved or application model at.

    Returns:
        A functional `keras.Model` from raw images in [0, 255] to
        `[batch, features]`.

    Raises:
        FileNotFoundError: if a path (model or weights file) does not exist.
        ValueError: for an unknown name, an incompatible input shape, or a
            file that cannot be loaded safely (see `load_keras_file`).

    Example:

    >>> from keras_seltransfer import models
    >>> backbone = models.load_backbone("small_cnn", (64, 64, 1))
    >>> backbone.output_shape
    (None, 128)

    A saved model (for example the `pretrain` app's) or an application:

    ```python
    backbone = models.load_backbone("pretrained.keras", (64, 64, 1))
    resnet = models.load_backbone("ResNet50", (224, 224, 3), weights="imagenet")
    ```
    """
    if len(input_shape) != 3:
        raise ValueError(
            "`input_shape` must be (height, width, channels). "
            f"Received: input_shape={input_shape}"
        )
    input_shape = tuple(None if d is None else int(d) for d in input_shape)
    spec = os.fspath(spec)
    if is_backbone_path(spec):
        if not os.path.isfile(spec):
            raise FileNotFoundError(
                f"Backbone file not found: {spec!r}. Expected a `.keras` file "
                "(for example one written by `python -m apps.pretrain`)."
            )
        if weights is not None:
            raise ValueError(
                "`weights` applies to named backbones only; a `.keras` file "
                f"carries its own. Received: weights={weights!r}"
            )
        model = load_keras_file(spec, what="backbone")
        layer_names = [layer.name for layer in model.layers]
        if cut_layer is None and FEATURES_LAYER in layer_names:
            cut_layer = FEATURES_LAYER
        if cut_layer is not None:
            model = cut_backbone(model, cut_layer)
        elif len(model.outputs) != 1 or len(model.outputs[0].shape) not in (2, 4):
            raise ValueError(
                f"Cannot tell where to cut the model in {spec!r}: pass "
                "`cut_layer` naming the layer whose output are the features."
            )
        elif len(model.outputs[0].shape) == 4:
            model = cut_backbone(model, model.layers[-1].name)
        saved_shape = tuple(model.inputs[0].shape[1:])
        if input_shape[-1] is None:
            input_shape = input_shape[:2] + saved_shape[-1:]
        if saved_shape != input_shape:
            if saved_shape[-1] != input_shape[-1]:
                raise ValueError(
                    f"The backbone in {spec!r} takes {saved_shape[-1]}-channel "
                    f"images but input_shape asks for {input_shape[-1]}. "
                    f"Received: input_shape={input_shape}"
                )
            try:
                model = _resize_input(model, input_shape)
            except Exception as e:
                raise ValueError(
                    f"The backbone in {spec!r} was built for inputs "
                    f"{saved_shape} and cannot be rebuilt for {input_shape}: {e}"
                ) from e
        return model

    if is_hub_spec(spec):
        if cut_layer is not None:
            raise ValueError(
                f"`cut_layer` is not used with KerasHub backbones. Received: cut_layer={cut_layer!r}"
            )
        return build_hub_backbone(spec, input_shape, weights=weights)
    key = normalise_name(spec)
    if key not in _BUILTIN_BY_KEY and application_name(spec) is None:
        raise ValueError(_unknown_backbone_message(spec))
    if weights not in (None, "imagenet"):
        weights = os.fspath(weights)
        if not os.path.isfile(weights):
            raise FileNotFoundError(
                f"Backbone weights file not found: {weights!r}. Expected None, 'imagenet' "
                f"or a weights file (.weights.h5). Received: weights={weights!r}"
            )
    if input_shape[-1] is None:
        if key in _BUILTIN_BY_KEY:
            raise ValueError(
                f"The channel count of backbone {spec!r} must be given. "
                f"Received: input_shape={input_shape}"
            )
        input_shape = input_shape[:2] + (3,)
    if key in _BUILTIN_BY_KEY:
        if cut_layer is not None:
            raise ValueError(
                f"`cut_layer` is not used with built-in backbones. Received: cut_layer={cut_layer!r}"
            )
        if weights == "imagenet":
            raise ValueError(
                f"Built-in backbone {spec!r} has no ImageNet weights: pretrain "
                "it with `python -m apps.pretrain` and pass the `.keras` file. "
                f"Received: weights={weights!r}"
            )
        model = _BUILTIN_BY_KEY[key](input_shape=input_shape)
        if weights is not None:
            try:
                model.load_weights(weights)
            # As for model files: every failure means this file does not fit.
            except Exception as e:  # noqa: BLE001
                raise ValueError(
                    f"Could not load the weights file {weights!r} into backbone {spec!r} "
                    f"with input_shape={input_shape}: {type(e).__name__}: "
                    f"{' '.join(str(e).split())[:600]}"
                ) from e
        return model

    # What is left is a keras.applications name.
    model = build_application(
        application_name(spec), input_shape, weights=weights,
        pooling=None if cut_layer else "avg",
    )
    if cut_layer is not None:
        model = cut_backbone(model, cut_layer)
    return model


def reinitialize(model, seed=None):
    """Returns a copy of `model` with the same architecture and fresh weights.

    Used for the "from scratch" rows: the same network as the pretrained
    backbone, with every weight drawn again from its layer's initializer.

    Example:

    >>> from keras_seltransfer import models
    >>> backbone = models.small_cnn((16, 16, 1), widths=(4, 8))
    >>> scratch = models.reinitialize(backbone, seed=0)
    >>> scratch.count_params() == backbone.count_params()
    True
    """
    if seed is not None:
        keras.utils.set_random_seed(seed)
    return keras.models.clone_model(model)
