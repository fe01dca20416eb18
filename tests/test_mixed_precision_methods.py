"""Every fine-tuning method trains and exports under mixed precision.

`--precision=mixed_bfloat16` (the CPU form; `mixed_float16` on GPUs takes
the same code path with a loss scale) builds the backbone in bfloat16 and
keeps the heads, the losses and the variables in float32. Each method's own
layers (gated convolutions, filter masks, blurs, the knowledge-transfer
teacher) have to follow the policy: a layer computing in float32 inside a
bfloat16 network, or an op without a bfloat16 kernel, fails here.

The default run checks anti-aliasing (a custom gradient in its blur); every
registered method runs with `pytest -m slow`.
"""

import math

import keras
import numpy as np
import pytest

from keras_seltransfer import methods
from keras_seltransfer import training
from tests import helpers

OPTIONS = {
    "l2sp": {"l2sp_alpha": 1.0},
    "sjft": {"k0": 2, "k_max": 8, "growth_period": 1},
    "sjft_nogrowth": {"k0": 2, "k_max": 8},
    "sjft_all": {"k0": 2, "k_max": 8},
    "sjft_random": {"k0": 2, "k_max": 8},
    "sjft_random_neighbours": {"k0": 2, "k_max": 8},
    "adafilter": {"gate_units": 4},
    "filter_transfer": {"transfer_ratio": 0.5, "prune_period": 1, "prune_fraction": 0.25},
    "ktft": {"ktft_logit_weight": 0.5},
    "delta": {"delta_alpha": 1.0},
    "bss": {"bss_eta": 0.01},
}
DEFAULT = ("antialias_ft",)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return helpers.method_world(tmp_path_factory.mktemp("mixed_precision"), num_per_class=24)


@pytest.mark.parametrize(
    "method",
    [pytest.param(m, marks=() if m in DEFAULT else pytest.mark.slow) for m in methods.names()],
)
def test_method_trains_in_mixed_bfloat16(data, method, tmp_path):
    out = training.finetune(
        training.FinetuneConfig(
            **dict(helpers.SMALL_RUN, epochs=2, patience=2, batch_size=8),
            target=data["target"],
            source=data["source"],
            backbone=data["backbone"],
            index_dir=data["index_dir"],
            method=method,
            precision="mixed_bfloat16",
            augment="none",
            output_dir=str(tmp_path / method),
            export=False,
            **OPTIONS.get(method, {}),
        )
    )
    assert keras.config.dtype_policy().name == "float32"
    history = out["report"]["history"]
    losses = [v for key, values in history.items() if key.endswith("loss") for v in values]
    # The linear probe fits its head outside `fit` (no Keras history).
    assert method == "linear_probe" or losses, history
    assert all(math.isfinite(v) for v in losses), history
    model = keras.saving.load_model(out["model"])
    convs = [
        layer
        for layer in model._flatten_layers(include_self=False)
        if isinstance(layer, keras.layers.Conv2D) or type(layer).__name__ == "GatedConv"
    ]
    assert convs and all(layer.compute_dtype == "bfloat16" for layer in convs), [
        (layer.name, layer.compute_dtype) for layer in convs
    ]
    assert all(v.dtype == "float32" for v in model.weights)
    images, _ = helpers.easy_images(4, 16, seed=9)
    predictions = np.asarray(model.predict(images.astype("float32"), verbose=0))
    assert predictions.dtype == np.float32 and np.isfinite(predictions).all()
    np.testing.assert_allclose(predictions.sum(axis=-1), 1.0, atol=1e-5)
