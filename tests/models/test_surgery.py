import keras
import numpy as np
import pytest

from keras_seltransfer.models import backbones
from keras_seltransfer.models import build_classifier
from keras_seltransfer.models import build_multitask_model
from keras_seltransfer.models import surgery


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
