import keras
import numpy as np
import pytest

from keras_seltransfer.models import backbones
from keras_seltransfer.models import build_classifier
from keras_seltransfer.models import build_multitask_model
from keras_seltransfer.models import surgery
from keras_seltransfer.models.graph import inner_layers


def _classifier():
    return build_classifier(backbones.small_cnn((16, 16, 1), widths=(4, 8)), 3)


def _images(n=2, size=16, channels=1):
    return np.random.default_rng(0).uniform(0, 255, (n, size, size, channels)).astype("float32")


def test_consumers_and_producers_follow_the_graph():
    model = _classifier()
    after = surgery.consumers(model)
    before = surgery.producers(model)
    assert after["block1_conv"] == ["block1_bn"]
    assert after["block1_relu"] == ["block1_pool"]
    assert after["target_head"] == []
    assert before["block2_conv"] == ["block1_pool"]
    assert before["image"] == []
    # Branches: a residual add has two producers, its input two consumers.
    inputs = keras.Input((8, 8, 2), name="x")
    a = keras.layers.Conv2D(2, 1, name="a")(inputs)
    out = keras.layers.Add(name="add")([a, inputs])
    branched = keras.Model(inputs, out)
    assert surgery.producers(branched)["add"] == ["a", "x"]
    assert surgery.consumers(branched)["x"] == ["a", "add"]


def test_rebuild_copies_every_weight_into_new_layers():
    model = _classifier()
    copy = surgery.rebuild(model)
    assert copy.name == model.name
    assert [layer.name for layer in copy.layers] == [layer.name for layer in model.layers]
    assert not any(a is b for a, b in zip(copy.layers, model.layers))
    np.testing.assert_array_equal(copy(_images()), model(_images()))
    # Independent weights: changing the copy leaves the original alone.
    kernel = copy.get_layer("block1_conv").kernel
    kernel.assign(np.zeros(kernel.shape, "float32"))
    assert np.abs(model.get_layer("block1_conv").kernel.numpy()).sum() > 0
    assert surgery.rebuild(model, name="renamed").name == "renamed"


def test_rebuild_with_dict_outputs():
    model = build_multitask_model(backbones.small_cnn((16, 16, 1), widths=(4,)), 5, 2)
    copy = surgery.rebuild(model)
    expected, got = model(_images()), copy(_images())
    assert set(got) == {"target", "source"}
    for key in got:
        np.testing.assert_array_equal(got[key], expected[key])


def test_call_function_inserts_layers_and_sees_the_original():
    model = _classifier()
    seen = []

    def call(layer, original, *args, **kwargs):
        seen.append((layer.name, original is model.get_layer(layer.name)))
        out = layer(*args, **kwargs)
        if isinstance(layer, keras.layers.ReLU):
            out = keras.layers.Rescaling(2.0, name=layer.name + "_x2")(out)
        return out

    new = surgery.rebuild(model, call)
    assert all(ok for _, ok in seen)
    assert "block1_relu_x2" in [layer.name for layer in new.layers]
    # The inserted scalings change the output: the hook really ran in the graph.
    assert np.abs(np.asarray(new(_images())) - np.asarray(model(_images()))).max() > 1e-4


def test_flatten_inlines_nested_applications():
    app = keras.applications.MobileNetV2(
        include_top=False, weights=None, input_shape=(32, 32, 3), pooling="avg"
    )
    inputs = keras.Input((32, 32, 3))
    nested = keras.Model(inputs, keras.layers.Dense(2, name="head")(app(inputs)))
    flat = surgery.flatten(nested)
    assert not any(isinstance(layer, keras.Model) for layer in flat.layers)
    assert len(flat.layers) > 100
    x = _images(2, 32, 3) / 255.0
    np.testing.assert_array_equal(flat(x), nested(x))
    assert "Conv1" in surgery.matching_layers(nested, keras.layers.Conv2D)
    assert surgery.matching_layers(nested, keras.layers.Conv2D, r"^Conv1$") == ["Conv1"]


def test_errors_name_what_is_wrong():
    unbuilt = keras.Sequential([keras.layers.Dense(2)])
    with pytest.raises(ValueError, match="Sequential.*build it"):
        surgery.rebuild(unbuilt)

    class Subclassed(keras.Model):
        def call(self, x):
            return x

    with pytest.raises(ValueError, match="layer graph is unknown"):
        surgery.flatten(Subclassed())
    with pytest.raises(ValueError, match="keras.Model"):
        surgery.consumers("not a model")
    with pytest.raises(ValueError, match="regular expression"):
        surgery.matching_layers(_classifier(), keras.layers.Conv2D, "(")


def _hard_swish_model():
    # MobileNetV3 style: an activation built from plain operations.
    inputs = keras.Input((8, 8, 3), name="x")
    y = keras.layers.Conv2D(4, 3, padding="same", name="conv")(inputs)
    y = y * keras.layers.ReLU(6.0, name="relu6")(y + 3.0) * (1.0 / 6.0)
    return keras.Model(inputs, keras.layers.Conv2D(2, 1, name="head")(y))


def test_plain_operations_are_graph_nodes_and_are_rebuilt():
    model = _hard_swish_model()
    nodes = surgery.operations(model)
    plain = [name for name, op in nodes.items() if not surgery.is_layer(op)]
    # Their names come from Keras' global counters: x + 3, then two products.
    assert [type(nodes[n]).__name__ for n in plain] == ["Add", "Multiply", "Multiply"]
    graph = surgery.model_graph(model)
    add, first, second = plain
    assert graph.consumers["conv"] == [add, first]
    assert graph.producers[first] == ["conv", "relu6"]
    # The activation after the conv ends at the product x * relu6(x + 3).
    assert graph.activation_after("conv") == first
    seen = []

    def call(layer, original, *args, **kwargs):
        seen.append((type(layer).__name__, original.name))
        outputs = layer(*args, **kwargs)
        if original.name == second:  # insert a layer after a plain operation
            outputs = keras.layers.Rescaling(2.0, name="doubled")(outputs)
        return outputs

    new = surgery.rebuild(model, call)
    assert ("Multiply", second) in seen and ("Add", add) in seen
    x = _images(2, 8, 3)
    # head(2 h) = 2 head(h) - bias, with h the hard-swish output.
    head = model.get_layer("head")
    h = keras.Model(model.input, head.input)(x)
    expected = 2.0 * np.asarray(head(h)) - head.bias.numpy()
    np.testing.assert_allclose(new(x), expected, rtol=1e-5, atol=1e-4)
    assert new.get_layer("x").name == "x"  # input layers keep their names


def test_nested_sequential_and_functional_models_are_flattened():
    inputs = keras.Input((8, 8, 3), name="x")
    stem = keras.Sequential(
        [keras.layers.Conv2D(4, 3, strides=2, name="stem_conv"), keras.layers.ReLU(name="stem_relu")],
        name="stem",
    )
    inner_in = keras.Input((3, 3, 4))
    block = keras.Model(inner_in, keras.layers.Conv2D(4, 1, name="block_conv")(inner_in), name="block")
    y = stem(inputs)
    y = keras.layers.Add(name="residual")([block(y), y])
    model = keras.Model(inputs, y)
    flat = surgery.flatten(model)
    assert [layer.name for layer in flat.layers] == [
        "x", "stem_conv", "stem_relu", "block_conv", "residual"
    ]
    x = _images(2, 8, 3)
    np.testing.assert_array_equal(flat(x), model(x))
    # Every layer's output is a tensor of the flattened graph.
    taps = keras.Model(flat.input, [flat.get_layer(n).output for n in ("stem_relu", "block_conv")])
    np.testing.assert_array_equal(taps(x)[0], stem(x))
    np.testing.assert_array_equal(surgery.rebuild(model)(x), model(x))
    # A model called twice is inlined twice: its layers become shared layers.
    twice = keras.Model(inputs, block(block(stem(inputs))))
    graph = surgery.model_graph(twice)
    assert graph.calls["block_conv"] == 2
    rebuilt = surgery.rebuild(twice)
    np.testing.assert_allclose(rebuilt(x), twice(x), rtol=1e-6)
    assert graph.model.get_layer("block_conv") is not None


def test_subclassed_graph_models_are_accepted():
    # KerasHub backbones are keras.Model subclasses built from a graph, with
    # their own get_config.
    class Backbone(keras.Model):
        def __init__(self, width=4, **kwargs):
            inputs = keras.Input((8, 8, 3))
            outputs = keras.layers.Conv2D(width, 3, strides=2, name="conv")(inputs)
            super().__init__(inputs, outputs, **kwargs)
            self.width = width

        def get_config(self):
            return {"width": self.width, "name": self.name}

    backbone = Backbone()
    x = _images(2, 8, 3)
    flat = surgery.flatten(backbone)
    assert flat.get_layer("conv") is backbone.get_layer("conv")
    np.testing.assert_array_equal(surgery.rebuild(backbone)(x), backbone(x))
    inputs = keras.Input((8, 8, 3))
    wrapped = keras.Model(inputs, backbone(inputs))
    np.testing.assert_array_equal(surgery.rebuild(wrapped)(x), backbone(x))


def test_rebuild_copies_weights_of_layers_whose_config_renames_them():
    class Renaming(keras.layers.Layer):
        # Like some KerasHub blocks: the config does not give the name back.
        def build(self, shape):
            self.w = self.add_weight(shape=(shape[-1],), initializer="random_normal")

        def call(self, x):
            return x * self.w

        def get_config(self):
            config = super().get_config()
            config["name"] = config["name"] + "_0"
            return config

    inputs = keras.Input((4,))
    model = keras.Model(inputs, Renaming(name="scale")(inputs))
    new = surgery.rebuild(model)
    assert new.layers[1].name == "scale_0"
    np.testing.assert_array_equal(new.layers[1].w.numpy(), model.layers[1].w.numpy())


def test_inner_layers_of_custom_layers():
    class Block(keras.layers.Layer):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.convs = [keras.layers.Conv2D(2, 1, name="a"), keras.layers.Conv2D(2, 1, name="b")]

    assert [layer.name for layer in inner_layers(Block())] == ["a", "b"]
    assert inner_layers(keras.layers.Conv2D(2, 1)) == []


def test_rebuild_handles_graphs_deeper_than_the_recursion_limit():
    # Keras maps a functional graph recursively; inserting a layer after
    # each of 700 layers (as filter masks after every conv of
    # EfficientNetV2L) makes the longest path exceed Python's default limit.
    import sys

    inputs = keras.Input((4,))
    x = inputs
    for i in range(700):
        x = keras.layers.Activation("linear", name=f"a{i}")(x)
    model = keras.Model(inputs, x)
    limit = sys.getrecursionlimit()

    def insert(layer, original, *args, **kwargs):
        out = layer(*args, **kwargs)
        return keras.layers.Activation("linear", name=f"{original.name}_after")(out)

    new = surgery.rebuild(model, insert, name="deeper")
    assert len(new.layers) == 1 + 2 * 700
    assert sys.getrecursionlimit() == limit
    x = np.arange(8, dtype="float32").reshape(2, 4)
    np.testing.assert_array_equal(np.asarray(new(x)), x)
