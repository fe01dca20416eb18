"""Anti-aliasing surgery: insert BlurPool into a pretrained functional model.

Zhang (ICML 2019) makes a pretrained CNN more shift-invariant by splitting
every subsampling layer into a dense (stride-1) evaluation and an
anti-aliased subsampling (`BlurPool`). No trainable parameter is added, so
the pretrained weights carry over layer by layer; `antialias` rebuilds a
functional Keras model that way with `keras_seltransfer.models.surgery`.
"""

import re

import keras

from keras_seltransfer.layers.base_blur_pool import BaseBlurPool
from keras_seltransfer.layers.base_blur_pool import check_filt_size
from keras_seltransfer.layers.base_blur_pool import check_pad_type
from keras_seltransfer.layers.blur_pool import BlurPool
from keras_seltransfer.models import surgery
from keras_seltransfer.models.graph import inner_layers

# Names of the layers `antialias` adds, derived from the layer they serve.
# `<layer>_blurpool` takes the place of `<layer>`'s output (see
# `aligned_layer_name`); `<conv>_input_blurpool` subsamples a 1x1 conv's input.
BLUR_SUFFIX = "_blurpool"
INPUT_BLUR_SUFFIX = "_input_blurpool"
PAD_SUFFIX = "_aa_pad"
CROP_SUFFIX = "_aa_crop"

_POOLS = (keras.layers.MaxPooling2D, keras.layers.AveragePooling2D)
_CONVS = (keras.layers.Conv2D, keras.layers.DepthwiseConv2D, keras.layers.SeparableConv2D)


def _pair(value):
    return tuple(int(v) for v in value) if isinstance(value, (tuple, list)) else (int(value),) * 2


def _spatial_input_size(layer):
    """`(height, width)` of a layer's input, None where not static."""
    shape = layer.input.shape
    return shape[1], shape[2]


def _same_padding(size, kernel, stride):
    """TensorFlow's 'same' padding before the first sample, or None when the
    size is not static."""
    if size is None:
        return None
    out = -(-size // stride)
    return max((out - 1) * stride + kernel - size, 0) // 2


def _cannot(layer, why):
    return ValueError(
        f"antialias cannot convert layer {layer.name!r} ({type(layer).__name__}): {why}. "
        f"To leave it as it is, pass `exclude` a regular expression matching its name, "
        f"e.g. exclude={'^' + layer.name + '$'!r}."
    )


def _activation_after(name, graph):
    """The node that ends the activation following conv `name` through
    per-channel layers (BatchNormalization), or None when the output
    branches or ends first (see `ModelGraph.activation_after`)."""
    current = name
    while True:
        end = graph.activation_after(current)
        if end is not None:
            last = graph.nodes[end]
            if isinstance(last, keras.layers.PReLU) and not set(
                _pair_axes(last.shared_axes)
            ) >= {1, 2}:
                raise _cannot(
                    last,
                    "a PReLU after a strided layer must share its slopes over the spatial "
                    "axes (shared_axes=[1, 2]) to run on the denser map",
                )
            return end
        following = graph.consumers[current]
        if len(following) != 1 or graph.calls[following[0]] != 1:
            return None
        layer = graph.nodes[following[0]]
        is_per_channel = isinstance(layer, keras.layers.BatchNormalization) and layer.axis in (
            -1,
            3,
            [-1],
            [3],
        )
        is_linear = (
            isinstance(layer, keras.layers.Activation)
            and layer.activation is keras.activations.linear
        )
        if not (is_per_channel or is_linear):
            return None
        current = layer.name


def _pair_axes(axes):
    if axes is None:
        return ()
    return tuple(axes) if isinstance(axes, (list, tuple)) else (axes,)


def _dense_padding(layer, kernel, strides):
    """How a 'same'-padded strided layer keeps its sampling grid at stride 1.

    Returns `(padding, zero_pad, crop)`: the padding argument of the stride-1
    layer, explicit zero padding to insert before it (convolutions) and a
    crop of its output (pools), so that every s-th sample of the dense map is
    exactly a sample of the strided layer.
    """
    if layer.padding == "valid":
        return "valid", None, None
    sizes = _spatial_input_size(layer)
    befores = [_same_padding(n, k, s) for n, k, s in zip(sizes, kernel, strides)]
    if None in befores or all(b == (k - 1) // 2 for b, k in zip(befores, kernel)):
        # A stride-1 'same' layer already pads (k-1)//2 before; with dynamic
        # sizes the strided layer's padding is not known here.
        return "same", None, None
    if isinstance(layer, _CONVS):
        zero_pad = tuple((b, k - 1 - b) for b, k in zip(befores, kernel))
        return "valid", zero_pad, None
    crop = tuple(((k - 1) // 2 - b, 0) for b, k in zip(befores, kernel))
    return "same", None, crop


def _stem_layers(graph):
    """Strided convolutions that see the input through weight-free layers only
    (preprocessing, input normalisation, padding): the network's first
    downsampling."""
    # Nodes come in topological order, so producers are settled first.
    weighted_ancestor = {}
    for name, op in graph.nodes.items():
        weighted_ancestor[name] = any(
            weighted_ancestor[p]
            or (
                bool(getattr(graph.nodes[p], "weights", None))
                and not isinstance(graph.nodes[p], keras.layers.Normalization)
            )
            for p in graph.producers[name]
        )
    return {
        name
        for name, op in graph.nodes.items()
        if isinstance(op, _CONVS)
        and any(s > 1 for s in _pair(op.strides))
        and not weighted_ancestor[name]
    }


def _plan(graph, filt_size, keep_stem=False, exclude=None):
    """What happens to each layer: `{name: action}` and `{name: blur after}`."""
    keep = _stem_layers(graph) if keep_stem else set()
    actions, blur_after = {}, {}
    for layer in graph.model.layers:
        if layer.name in keep or (exclude is not None and exclude.search(layer.name)):
            continue
        if isinstance(layer, BaseBlurPool):
            continue
        strides = getattr(layer, "strides", None)
        if strides is None:
            hidden = [
                inner.name
                for inner in inner_layers(layer)
                if isinstance(inner, _CONVS + _POOLS)
                and any(s > 1 for s in _pair(getattr(inner, "strides", 1)))
            ]
            if hidden:
                raise _cannot(
                    layer,
                    f"it subsamples inside its own call, with strided layers {hidden} that "
                    "graph surgery cannot reach",
                )
            continue
        strides = _pair(strides)
        if all(s == 1 for s in strides):
            continue
        if isinstance(layer, keras.layers.Conv2DTranspose):
            continue  # upsampling does not alias
        if not isinstance(layer, _CONVS + _POOLS):
            raise _cannot(
                layer,
                f"strided layers of this type (strides={strides}) are not supported; "
                "supported: Conv2D, DepthwiseConv2D, SeparableConv2D, MaxPooling2D, "
                "AveragePooling2D",
            )
        if graph.calls[layer.name] > 1:
            raise _cannot(layer, "it is called more than once (a shared layer)")
        if getattr(layer, "data_format", "channels_last") != "channels_last":
            raise _cannot(layer, "BlurPool works on channels-last feature maps")
        if isinstance(layer, _CONVS):
            if any(d != 1 for d in _pair(layer.dilation_rate)):
                raise _cannot(
                    layer,
                    f"strided convolutions with dilation (dilation_rate={layer.dilation_rate}) "
                    "are not converted",
                )
            kernel = _pair(layer.kernel_size)
            padding, zero_pad, _ = _dense_padding(layer, kernel, strides)
            activation = (
                layer.name
                if layer.activation is not keras.activations.linear
                else _activation_after(layer.name, graph)
            )
            if activation is not None:
                # Zhang: conv at stride 1, its activation, then the blur.
                actions[layer.name] = {"kind": "dense", "padding": padding, "zero_pad": zero_pad}
                blur_after[activation] = {"strides": strides, "crop": None, "source": layer.name}
            elif kernel == (1, 1):
                # No activation follows (a ResNet shortcut): blur, then the 1x1
                # conv at stride 1, as in Zhang's anti-aliased ResNet; a 1x1
                # conv commutes with the blur, and runs on the smaller map.
                actions[layer.name] = {"kind": "input_blur", "strides": strides}
            else:
                # A linear conv commutes with the blur: blur right after it,
                # which keeps its sampling grid.
                actions[layer.name] = {"kind": "dense", "padding": padding, "zero_pad": zero_pad}
                blur_after[layer.name] = {"strides": strides, "crop": None, "source": layer.name}
            continue
        pool_size = _pair(layer.pool_size)
        if isinstance(layer, keras.layers.AveragePooling2D) and pool_size == strides:
            # A non-overlapping box filter is a (poor) blur already: Zhang
            # replaces it by BlurPool, and keeps it when filt_size is 1.
            if filt_size == 1:
                continue
            crop = None
            if layer.padding == "valid":
                sizes = _spatial_input_size(layer)
                if None not in sizes:
                    # 'valid' box pooling drops the last rows when the size is
                    # not a multiple of the stride; so does the crop.
                    crop = tuple((0, n % s) for n, s in zip(sizes, strides))
            actions[layer.name] = {"kind": "replace", "strides": strides, "crop": crop}
            continue
        padding, _, crop = _dense_padding(layer, pool_size, strides)
        actions[layer.name] = {"kind": "dense", "padding": padding, "zero_pad": None}
        blur_after[layer.name] = {"strides": strides, "crop": crop, "source": layer.name}
    return actions, blur_after


def antialias(model, filt_size=4, pad_type="reflect", keep_stem=False, name=None, exclude=None):
    """Rebuilds a pretrained functional model with anti-aliased subsampling.

    The swaps of Zhang (ICML 2019), made on every subsampling layer:

    - `MaxPooling2D(k, s)` -> `MaxPooling2D(k, 1)` + `BlurPool(s)`; the same
      for an overlapping `AveragePooling2D` (pool size != strides).
    - `AveragePooling2D(s, s)` (non-overlapping, e.g. DenseNet's
      transitions) -> `BlurPool(s)`; kept as it is when `filt_size=1`, as in
      Zhang's code.
    - a strided `Conv2D` / `DepthwiseConv2D` / `SeparableConv2D` followed
      by an activation (fused into the conv, or after BatchNormalization
      layers) -> the conv at stride 1, the BatchNormalization and activation
      on the dense map, then `BlurPool(s)`: the blur comes after the
      nonlinearity, never before. A separable conv (NASNet, Xception) is
      converted whole, like a depthwise one: its depthwise stage carries the
      stride, and the pointwise stage commutes with subsampling. The
      activation may be a layer or an elementwise expression of plain
      operations (MobileNetV3's hard-swish `x * relu6(x + 3) / 6`, see
      `ModelGraph.activation_after`); the blur then follows its last node.
    - a strided 1x1 conv not followed by an activation (a ResNet shortcut,
      conv -> BN -> Add) -> `BlurPool(s)` then the 1x1 conv at stride 1, as
      in Zhang's anti-aliased ResNet (the two commute; the conv then runs on
      the subsampled map).
    - a strided k x k conv (k > 1) not followed by an activation -> the conv
      at stride 1, then `BlurPool(s)` (a linear conv commutes with the blur).

    Every sample that a strided layer computed is a sample of its dense
    counterpart: 'valid' layers and the padding layers before them
    (`ZeroPadding2D` in keras.applications) stay as they are, and a 'same'
    layer whose padding differs between stride s and stride 1 gets explicit
    zero padding (convolutions, `<layer>_aa_pad`) or a crop (pools,
    `<layer>_aa_crop`). So every layer's output shape is unchanged, and with
    `filt_size=1` (plain subsampling) the new model computes exactly what
    the original did. With `filt_size > 1` the only difference is the
    low-pass filter before each subsampling, centred on the original grid
    for odd sizes (half a pixel off for even ones). This needs static
    spatial sizes; with dynamic ones 'same' layers keep 'same' padding at
    stride 1, which can shift their grid by one pixel.

    No trainable parameter is added (the blur kernels are non-trainable
    constants) and every pretrained weight, BatchNorm statistics included,
    is copied: layers keep their names. The added blur is named
    `<layer>_blurpool` after the layer whose output it replaces (see
    `aligned_layer_name`), or `<conv>_input_blurpool` before a 1x1 conv.
    Layers that already anti-alias (`BlurPool`, `MaxBlurPool`) and
    transposed convolutions (upsampling) are left alone.

    `keep_stem=True` leaves the stem strided: the strided convolutions that
    read the input through weight-free layers only (preprocessing, padding),
    such as ResNet50's `conv1_conv` or small_cnn's `block1_conv`. Zhang's
    released anti-aliased ResNets and MobileNetV2 do the same
    (`pool_only=True`), since the dense stem runs on the full-resolution
    input and is the costliest layer to anti-alias; the pooling after it is
    still anti-aliased.

    Args:
        model: a functional `keras.Model` (nested functional and Sequential
            models are inlined, plain operations kept); channels-last.
        filt_size: binomial filter size of every `BlurPool`, 1 to 7. Default 4.
        pad_type: `"reflect"`, `"replicate"` or `"zero"` (see `BlurPool`).
        keep_stem: leave the stem convolution strided (see above).
        name: name of the new model (default: the original's).
        exclude: regular expression; strided layers whose names match it
            (`re.search`) are left as they are, not anti-aliased. None (the
            default) converts every strided layer.

    Returns:
        The anti-aliased functional `keras.Model`, sharing no layer or weight
        with `model`.

    Raises:
        ValueError: for bad arguments, and naming any strided layer that
            cannot be converted (pass `exclude` to leave it as it is): a
            strided layer type other than Conv2D, DepthwiseConv2D,
            SeparableConv2D, MaxPooling2D and AveragePooling2D (a custom
            layer), a strided conv with dilation, a channels-first layer, or
            a strided layer called more than once.

    Example:

    ```python
    backbone = load_backbone("ResNet50", (224, 224, 3), weights="imagenet")
    model = antialias(build_classifier(backbone, 10), filt_size=4)
    ```

    Reference:
        Zhang. Making Convolutional Networks Shift-Invariant Again. ICML 2019.
    """
    filt_size = check_filt_size(filt_size)
    pad_type = check_pad_type(pad_type)
    if exclude is not None:
        try:
            exclude = re.compile(exclude)
        except (re.error, TypeError) as e:
            raise ValueError(
                f"`exclude` must be a regular expression or None ({e}). "
                f"Received: exclude={exclude!r}"
            ) from e
    graph = surgery.model_graph(model)
    flat = graph.model
    actions, blur_after = _plan(graph, filt_size, keep_stem=bool(keep_stem), exclude=exclude)
    taken = set(graph.nodes)
    blur_names = [n + BLUR_SUFFIX for n in blur_after]
    blur_names += [n + BLUR_SUFFIX for n, a in actions.items() if a["kind"] == "replace"]
    blur_names += [n + INPUT_BLUR_SUFFIX for n, a in actions.items() if a["kind"] == "input_blur"]
    for blur_name in blur_names:
        if blur_name in taken:
            raise ValueError(
                f"antialias would name a new BlurPool {blur_name!r}, but the model already "
                "has a layer of that name; rename that layer first."
            )
    taken.update(blur_names)

    def blur(x, strides, layer_name, source, suffix=BLUR_SUFFIX):
        return BlurPool(
            filt_size=filt_size,
            strides=strides,
            pad_type=pad_type,
            dtype=graph.nodes[source].dtype_policy,
            name=layer_name + suffix,
        )(x)

    def helper_name(base):
        candidate, i = base, 1
        while candidate in taken:
            candidate, i = f"{base}_{i}", i + 1
        taken.add(candidate)
        return candidate

    def call(layer, original, *args, **kwargs):
        action = actions.get(original.name)
        kind = None if action is None else action["kind"]
        if kind is None:
            outputs = layer(*args, **kwargs)
        elif kind == "replace":
            x = args[0]
            if action["crop"] and any(any(c) for c in action["crop"]):
                x = keras.layers.Cropping2D(
                    action["crop"], name=helper_name(original.name + CROP_SUFFIX)
                )(x)
            return blur(x, action["strides"], original.name, original.name)
        else:
            config = original.get_config()
            config["strides"] = (1, 1)
            x = args[0]
            if kind == "dense":
                config["padding"] = action["padding"]
                if action["zero_pad"] is not None:
                    x = keras.layers.ZeroPadding2D(
                        action["zero_pad"],
                        dtype=original.dtype_policy,
                        name=helper_name(original.name + PAD_SUFFIX),
                    )(x)
            else:
                x = blur(x, action["strides"], original.name, original.name, INPUT_BLUR_SUFFIX)
            outputs = type(original).from_config(config)(x, *args[1:], **kwargs)
        after = blur_after.get(original.name)
        if after is not None:
            if after["crop"] and any(any(c) for c in after["crop"]):
                outputs = keras.layers.Cropping2D(
                    after["crop"], name=helper_name(original.name + CROP_SUFFIX)
                )(outputs)
            outputs = blur(outputs, after["strides"], original.name, after["source"])
        return outputs

    new = surgery.rebuild(flat, call, name=name or model.name)
    _check_shapes(flat, new, blur_after, actions)
    return new


def _check_shapes(flat, new, blur_after, actions):
    """Every replaced output keeps its shape (a guard against unforeseen
    padding arithmetic)."""
    new_nodes = {op.name: op for op in new.operations}
    for layer in flat.operations:
        if layer.name in blur_after or (
            actions.get(layer.name, {}).get("kind") in ("replace", "input_blur")
        ):
            replacement = aligned_layer_name(new, layer.name)
            if replacement not in new_nodes:
                continue
            before = tuple(layer.output.shape)
            after = tuple(new_nodes[replacement].output.shape)
            if before != after:
                raise ValueError(
                    f"antialias could not keep the output shape of layer {layer.name!r}: "
                    f"{before} became {after}."
                )
    for old, out in zip(flat.outputs, new.outputs):
        if tuple(old.shape) != tuple(out.shape):
            raise ValueError(
                f"antialias changed an output shape from {tuple(old.shape)} to {tuple(out.shape)}."
            )


def aligned_layer_name(model, name):
    """The layer of an anti-aliased model whose output matches layer `name`
    of the original model (same position in the graph, same shape).

    That is `<name>_blurpool` when `antialias` put a blur after `name` (its
    own output is then the denser map), and `name` itself otherwise.

    Raises:
        ValueError: if neither layer exists in `model`.

    Example:

    >>> from keras_seltransfer import models
    >>> from keras_seltransfer.models.antialiasing import aligned_layer_name
    >>> model = models.antialias(models.small_cnn((16, 16, 1), widths=(4, 8)))
    >>> aligned_layer_name(model, "block1_pool"), aligned_layer_name(model, "block2_conv")
    ('block1_pool_blurpool', 'block2_conv')
    """
    names = set(surgery.operations(model))
    if name + BLUR_SUFFIX in names:
        return name + BLUR_SUFFIX
    if name in names:
        return name
    raise ValueError(
        f"Model {model.name!r} has no layer {name!r} (nor {name + BLUR_SUFFIX!r}). "
        f"Received: name={name!r}"
    )


def blur_layers(model):
    """Names of the `BlurPool` / `MaxBlurPool` layers of `model`.

    Example:

    >>> from keras_seltransfer import models
    >>> model = models.antialias(models.small_cnn((16, 16, 1), widths=(4, 8)))
    >>> models.blur_layers(model)
    ['block1_relu_blurpool', 'block1_pool_blurpool']
    """
    return [
        layer.name for layer in surgery.flatten(model).layers if isinstance(layer, BaseBlurPool)
    ]


__all__ = ["aligned_layer_name", "antialias", "blur_layers"]
