"""Methods compose: model transforms applied before a method's own setup."""

import json

import keras
import pytest

from keras_seltransfer import layers
from keras_seltransfer import methods
from keras_seltransfer import training
from keras_seltransfer.methods.antialias import antialias_model
from tests import helpers


def _config(tmp_path, **overrides):
    return helpers.small_run_config(
        **{
            "target": "numpy:" + helpers.write_npz(tmp_path / "target.npz", num_per_class=24),
            "source": "numpy:"
            + helpers.write_npz(tmp_path / "source.npz", num_per_class=12, num_classes=3, seed=4),
            "backbone": helpers.saved_backbone(tmp_path / "backbone.keras", pretrain_epochs=1),
            "index_dir": str(tmp_path / "index"),
            "output_dir": str(tmp_path / "run"),
            "batch_size": 8,
            "epochs": 1,
            "k0": 2,
            "k_max": 4,
            "gate_units": 4,
            "export": False,
            **overrides,
        }
    )


def _layer_types(path):
    model = keras.saving.load_model(path)
    return {type(layer) for layer in model.layers}


@pytest.mark.slow
def test_sjft_on_an_adafilter_backbone(tmp_path):
    out = training.finetune(_config(tmp_path, method="sjft_nogrowth", compose="adafilter"))
    history = out["report"]["history"]
    assert "gate_usage" in history and "val_target_crossentropy" in history
    types = _layer_types(out["model"])
    assert layers.GatedConv in types and layers.GateController in types
    assert json.load(open(tmp_path / "run" / "config.json"))["compose"] == "adafilter"


def test_adafilter_on_the_antialiased_network(tmp_path):
    out = training.finetune(_config(tmp_path, method="adafilter", compose="antialias"))
    types = _layer_types(out["model"])
    assert layers.GatedConv in types and layers.BlurPool in types
    assert "adafilter" in out["report"]


def test_bad_compose_specs_are_refused(tmp_path):
    with pytest.raises(ValueError, match="takes transforms from"):
        methods.check_compose("baseline", "antialias,magic")
    with pytest.raises(ValueError, match="already applies 'antialias'"):
        methods.check_compose("ktft", "antialias")
    with pytest.raises(ValueError, match="already applies 'adafilter'"):
        methods.check_compose("adafilter", "adafilter")
    with pytest.raises(ValueError, match="Anti-aliasing must come before AdaFilter"):
        methods.check_compose("ktft", "adafilter")
    with pytest.raises(ValueError, match="Anti-aliasing must come before AdaFilter"):
        methods.check_compose("baseline", "adafilter,antialias")
    methods.check_compose("baseline", "antialias,adafilter")
    with pytest.raises(ValueError, match="twice"):
        methods.check_compose("baseline", "adafilter, adafilter")
    assert methods.compose_names(" antialias ,adafilter") == ["antialias", "adafilter"]
    with pytest.raises(ValueError, match="compose"):
        training.FinetuneConfig(method="antialias_ft", compose="antialias")


def test_antialias_settings_reach_the_surgery():
    from keras_seltransfer.models import build_classifier
    from keras_seltransfer.models import small_cnn

    classifier = build_classifier(small_cnn((16, 16, 1), widths=(4, 8)), 2)
    full = antialias_model(training.FinetuneConfig(blur_filt_size=3), classifier)
    kept = antialias_model(training.FinetuneConfig(blur_keep_stem=True), classifier)
    assert full.get_layer("block1_conv").strides == (1, 1)
    assert kept.get_layer("block1_conv").strides == (2, 2)
    blurs = [layer for layer in full.layers if isinstance(layer, layers.BlurPool)]
    assert blurs and all(layer.filt_size == 3 for layer in blurs)
