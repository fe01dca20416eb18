"""Recipe of `finetune --method=adafilter`: per-example gated filter fine-tuning.

The classifier (backbone and target head, BatchNorm mode already applied)
is rebuilt by `keras_seltransfer.models.adafilter.adafilter` and trained as a
whole: fine-tuned kernels, the fine-tuned path's batch norms (unless
`gated_batchnorm="frozen"`), the gate network (at `gate_lr_multiplier` times
the learning rate) and the head. The trained model is what is saved
(`model.keras`) and exported; at inference and in the SavedModel its gates
are the deterministic hard gates.
"""

from keras_seltransfer import data as data_lib
from keras_seltransfer.models.adafilter import gate_usage
from keras_seltransfer.models.adafilter import gated_layers
from keras_seltransfer.recipes import MethodSetup
from keras_seltransfer.recipes import adafilter_model
from keras_seltransfer.recipes import lr_multipliers


def setup(config, classifier, context):
    """The `MethodSetup` of an AdaFilter run.

    Uses the config fields `gated_layers`, `gate_estimator`,
    `gate_temperature`, `gate_units`, `gate_usage_target`,
    `gate_usage_weight`, `gate_input_norm`, `gated_batchnorm` (whether the fine-tuned path's
    batch norms train; the pretrained path's never do), `first_gate_input`
    and `gate_lr_multiplier` (the gate network's learning-rate multiplier,
    returned as the setup's `lr_multipliers`). The Gumbel noise is
    seeded with `config.seed`. The gate network's only state outside the
    model weights is the position of that noise generator, which
    `TrainingCheckpoint` saves with the model's other seed-generator states,
    so a resumed run draws the same gates as an uninterrupted one.

    The report gains `"adafilter"`: the gated layers, the estimator and the
    final gate usage (overall and per layer) with hard gates on the
    validation images. The fit history (and TensorBoard) holds the gate
    usage, entropy and input dependence of every epoch (see
    `GateController`).
    """
    with context.strategy.scope():
        model = adafilter_model(config, classifier)

    def report():
        val = data_lib.make_dataset(
            context.val, config.image_size, config.batch_size, channels=context.channels
        )
        usage = gate_usage(model, val)
        return {
            "adafilter": {
                "gated_layers": [layer.name for layer in gated_layers(model)],
                "estimator": config.gate_estimator,
                "fine_tuned_batchnorm": config.gated_batchnorm == "train",
                "gate_lr_multiplier": config.gate_lr_multiplier,
                "first_gate_input": config.first_gate_input,
                "gate_input_norm": config.gate_input_norm,
                "val_gate_usage": usage["overall"],
                "val_gate_usage_per_layer": usage["layers"],
            }
        }

    return MethodSetup(
        model=model, report=report, lr_multipliers=lr_multipliers(config, model)
    )


__all__ = ["setup"]
