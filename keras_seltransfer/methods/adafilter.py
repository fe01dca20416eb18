"""AdaFilter (Guo et al., AAAI 2020): the `adafilter` transform and method.

`models.adafilter` rebuilds a network so that every gated convolution keeps
its frozen pretrained filters beside a fine-tuned copy, and a recurrent gate
network chooses, per example and per filter, which of the two each output
channel comes from. `--method=adafilter` fine-tunes the gated classifier as
a whole: fine-tuned kernels, the fine-tuned path's batch norms (unless
`gated_batchnorm="frozen"`), the gate network (at `gate_lr_multiplier` times
the learning rate) and the head; `--compose=adafilter` gates the backbone of
any other method (SJFT on an AdaFilter backbone). The trained model is what
is saved and exported; at inference its gates are the deterministic hard
gates.
"""

import dataclasses
import re

from keras_seltransfer import data as data_lib
from keras_seltransfer.layers.gates import ESTIMATORS
from keras_seltransfer.layers.gate_controller import GateController
from keras_seltransfer.methods.base import Method
from keras_seltransfer.methods.base import MethodSetup
from keras_seltransfer.methods.base import Transform
from keras_seltransfer.utils.options import option
from keras_seltransfer.methods.registry import register
from keras_seltransfer.methods.registry import register_transform
from keras_seltransfer.models.gating import FIRST_GATE_INPUTS
from keras_seltransfer.models.gating import adafilter
from keras_seltransfer.models.gating import gate_usage
from keras_seltransfer.models.gating import gated_layers

GATED_BATCHNORM_MODES = ("train", "frozen")


@dataclasses.dataclass
class AdaFilterOptions:
    """Options of AdaFilter (`--method=adafilter`, `--compose=adafilter`)."""

    gated_layers: str = option(
        None,
        "adafilter: regular expression selecting the conv layers to gate (by name, "
        "re.search). Unset: every Conv2D and DepthwiseConv2D of the backbone.",
    )
    gate_estimator: str = option(
        "ste",
        "adafilter: gradient estimator of the discrete gates: ste (hard threshold forward, "
        "sigmoid gradient backward) or gumbel (straight-through Gumbel-softmax).",
        choices=ESTIMATORS,
    )
    gate_temperature: float = option(
        1.0, "adafilter: Gumbel-softmax temperature.", above=0.0
    )
    gate_units: int = option(32, "adafilter: hidden units of the shared recurrent gate.", lower=1)
    gate_usage_target: float = option(
        None,
        "adafilter: target fraction of fine-tuned filters chosen (adds a sparsity loss). "
        "Unset: no sparsity loss.",
        type=float, lower=0.0, upper=1.0,
    )
    gate_usage_weight: float = option(0.1, "adafilter: weight of the sparsity loss.", lower=0.0)
    gated_batchnorm: str = option(
        "train",
        "adafilter: the fine-tuned path's batch norm (the paper's gated batch normalisation): "
        "train (batch statistics in training, its own moving averages and affine parameters, "
        "as in the paper) or frozen (a frozen copy of the pretrained one). Independent of "
        "--batchnorm, which governs every other batch norm, the pretrained path's always "
        "staying frozen. With frozen in a frozen-BatchNorm run both paths start as the same "
        "function and the gates get no gradient until the fine-tuned kernels have moved.",
        choices=GATED_BATCHNORM_MODES,
    )
    gate_lr_multiplier: float = option(
        10.0,
        "adafilter: learning rate of the gate network as a multiple of --learning_rate (same "
        "schedule, applied inside the Adam or SGD update). The gates' gradient is a difference "
        "of two nearly equal paths, so with the shared rate they hardly move in a short run. "
        "Default 10, chosen on validation (ELPV 15%, 6 seeds).",
        above=0.0,
    )
    first_gate_input: str = option(
        "features",
        "adafilter: what the first gate reads: features (the pooled output of the first gated "
        "layer's frozen pretrained filters) or input (its pooled input: one brightness value "
        "per grayscale image).",
        choices=FIRST_GATE_INPUTS,
    )
    gate_input_norm: bool = option(
        False,
        "adafilter: standardise each gate's pooled input per channel over the batch (moving "
        "averages at inference) before the gate network reads it (not in the paper).",
    )


def adafilter_model(config, model):
    """`models.adafilter` of `model` with the config's gate settings (the
    fine-tuned path's batch norms per `config.gated_batchnorm`, whatever the
    run's BatchNorm mode)."""
    return adafilter(
        model,
        layers=config.gated_layers,
        estimator=config.gate_estimator,
        temperature=config.gate_temperature,
        units=config.gate_units,
        usage_target=config.gate_usage_target,
        usage_weight=config.gate_usage_weight,
        train_batchnorm=config.gated_batchnorm == "train",
        first_gate_input=config.first_gate_input,
        normalize_gate_inputs=config.gate_input_norm,
        seed=config.seed,
    )


def lr_multipliers(config, model):
    """The optimizer's learning-rate multipliers for `model`: the gate
    network's `config.gate_lr_multiplier` when `model` has one, else None."""
    controllers = [layer for layer in model.layers if isinstance(layer, GateController)]
    if not controllers or config.gate_lr_multiplier == 1:
        return None
    return {f"^{re.escape(c.name)}/": float(config.gate_lr_multiplier) for c in controllers}


ADAFILTER = register_transform(
    Transform(
        name="adafilter",
        title="AdaFilter",
        apply=lambda config, model, context: adafilter_model(config, model),
        options=(AdaFilterOptions,),
        lr_multipliers=lr_multipliers,
    )
)


class AdaFilterMethod(Method):
    """Per-example gated filter fine-tuning."""

    name = "adafilter"
    summary = (
        "AdaFilter (Guo et al., AAAI 2020): per example and per conv filter, a recurrent "
        "gate chooses the frozen pretrained filter or its fine-tuned copy"
    )
    options = (AdaFilterOptions,)
    applies = ("adafilter",)
    order = 20

    def setup(self, config, model, context):
        """The report gains `"adafilter"`: the gated layers, the settings and
        the final gate usage (overall and per layer) with hard gates on the
        validation images. The fit history (and TensorBoard) holds the gate
        usage, entropy and input dependence of every epoch. The Gumbel noise
        is seeded with `config.seed`; its generator's position is saved with
        the checkpoint, so a resumed run draws the same gates."""
        with context.strategy.scope():
            gated = adafilter_model(config, model)
        channels = int(gated.inputs[0].shape[-1])

        def report(fit_info):
            val = data_lib.make_dataset(
                context.val, config.image_size, config.batch_size, channels=channels
            )
            usage = gate_usage(gated, val)
            return {
                "adafilter": {
                    "gated_layers": [layer.name for layer in gated_layers(gated)],
                    "estimator": config.gate_estimator,
                    "fine_tuned_batchnorm": config.gated_batchnorm == "train",
                    "gate_lr_multiplier": config.gate_lr_multiplier,
                    "first_gate_input": config.first_gate_input,
                    "gate_input_norm": config.gate_input_norm,
                    "val_gate_usage": usage["overall"],
                    "val_gate_usage_per_layer": usage["layers"],
                }
            }

        # The gate network's multiplier comes from the transform's
        # `lr_multipliers`, which the loop applies to every model.
        return MethodSetup(model=gated, report=report)


register(AdaFilterMethod())
