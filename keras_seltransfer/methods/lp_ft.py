"""`--method=lp_ft`: linear probing, then fine-tuning of every layer
(Kumar, Raghunathan, Jones, Ma and Liang, ICLR 2022, "Fine-Tuning can
Distort Pretrained Features and Underperform Out-of-Distribution").

Fine-tuning from a random head distorts the pretrained features: while the
head is still wrong, large gradients flow into the backbone. LP-FT first
fits the head alone as a linear probe, so fine-tuning starts near an
optimum of the head and changes the features less. Here:

1. the probe stage is `linear_probe`'s, on the backbone's output (the
   input of `target_head`): features in inference mode, standardised,
   L-BFGS logistic regression with C chosen on validation cross-entropy
   (`probe_c_grid`), the standardisation folded into the weights;
2. those weights are installed in the classifier's `target_head`;
3. every layer is fine-tuned with the run's optimizer and cosine schedule,
   at `lp_ft_lr_scale` times `learning_rate`, the head at the same rate as
   the backbone (the paper's LP-FT uses one learning rate for the whole
   network in the fine-tuning stage, swept on validation; a probed head
   starts near a minimum, so the stage is usually run at a smaller rate
   than fine-tuning from a random head).

BatchNorm stays frozen by default (pretrained statistics, inference-mode
normalisation), so the first training step sees exactly the features the
probe was fit on; `--batchnorm=train` trains it. Dropout
(`--dropout`) only acts in training, so the probe's features are the same
with it.
"""

import dataclasses

import keras

from keras_seltransfer.methods.base import Method
from keras_seltransfer.methods.base import MethodSetup
from keras_seltransfer.methods.linear_probe import HEAD_NAME
from keras_seltransfer.methods.linear_probe import ProbeOptions
from keras_seltransfer.methods.linear_probe import probe
from keras_seltransfer.methods.linear_probe import probe_features_model
from keras_seltransfer.methods.linear_probe import set_head
from keras_seltransfer.methods.registry import register
from keras_seltransfer.utils.options import option


@dataclasses.dataclass
class LPFTOptions:
    """Options of `--method=lp_ft` (besides the probe's `probe_c_grid`)."""

    lp_ft_lr_scale: float = option(
        0.1,
        "lp_ft: learning rate of the fine-tuning stage as a multiple of --learning_rate "
        "(every layer, head included; cosine-decayed over the run).",
        above=0.0,
    )


def scaled_cosine_schedule(scale):
    """A `MethodSetup.learning_rate_schedule`: cosine decay of
    `scale * config.learning_rate` to zero over the run's steps.

    Example:

    >>> schedule = scaled_cosine_schedule(0.1)(FinetuneConfig(learning_rate=1e-3), 10)  # doctest: +SKIP
    >>> float(schedule(0))  # doctest: +SKIP
    0.0001
    """

    def make(config, steps_per_epoch):
        return keras.optimizers.schedules.CosineDecay(
            config.learning_rate * scale, decay_steps=max(1, config.epochs * steps_per_epoch)
        )

    return make


class LinearProbeThenFinetune(Method):
    """Linear probe of the head, then fine-tuning of every layer from it."""

    name = "lp_ft"
    summary = (
        "LP-FT (Kumar et al., ICLR 2022): a linear probe of the head (as linear_probe, on the "
        "backbone output), then fine-tuning of every layer from it at a smaller learning rate"
    )
    options = (ProbeOptions, LPFTOptions)
    order = 3

    def setup(self, config, model, context):
        """The report gains `"lp_ft"` (the probe's C grid and scores, the
        fine-tuning learning rate)."""
        with context.strategy.scope():
            features_model = probe_features_model(model)
        fit = probe(config, features_model, context)
        kernel, bias = fit.folded()
        with context.strategy.scope():
            set_head(model.get_layer(HEAD_NAME), kernel, bias)
        report = {
            "lp_ft": {
                "probe": fit.report(),
                "finetune_learning_rate": config.learning_rate * config.lp_ft_lr_scale,
            }
        }
        return MethodSetup(
            model=model,
            learning_rate_schedule=scaled_cosine_schedule(config.lp_ft_lr_scale),
            report=lambda fit_info: report,
        )


register(LinearProbeThenFinetune())
