"""`--method=bss`: fine-tuning with Batch Spectral Shrinkage (Chen, Wang, Fu,
Long and Wang, NeurIPS 2019).

The loss adds `bss_eta` times the sum of the `bss_k` smallest squared
singular values of each batch's matrix of pooled features, the features the
new head reads (`keras_seltransfer.models.BatchSpectralShrinkageModel`).
Small singular values are the feature directions that few target images
cannot estimate well; shrinking them keeps fine-tuning from relying on
pretrained knowledge that does not transfer. The defaults, eta = 0.001 and
k = 1, are the paper's and the authors' code's [code: thuml/Batch-Spectral-
Shrinkage `BSS.py`; Transfer-Learning-Library `bss.py`]. `model.keras` and
the SavedModel hold the classifier alone.
"""

import dataclasses

from keras_seltransfer.methods.base import Method
from keras_seltransfer.methods.base import MethodSetup
from keras_seltransfer.methods.registry import register
from keras_seltransfer.models.regularized_training import BatchSpectralShrinkageModel
from keras_seltransfer.utils.options import option


@dataclasses.dataclass
class BSSOptions:
    """Options of `--method=bss`."""

    bss_eta: float = option(
        0.001, "bss: weight of the batch spectral shrinkage penalty (eta).", lower=0.0
    )
    bss_k: int = option(
        1, "bss: how many of the smallest singular values of the batch features are shrunk.",
        lower=1,
    )


class BatchSpectralShrinkage(Method):
    """Fine-tuning with the smallest singular values of the batch features shrunk."""

    name = "bss"
    summary = (
        "BSS (Chen et al., NeurIPS 2019): fine-tuning with the smallest singular values of "
        "each batch's pooled features shrunk (batch spectral shrinkage)"
    )
    options = (BSSOptions,)
    order = 51

    def setup(self, config, model, context):
        """The report gains `"bss"`: eta, k and the features layer."""
        with context.strategy.scope():
            trainer = BatchSpectralShrinkageModel(
                model, eta=config.bss_eta, k=config.bss_k, name="bss"
            )
        report = {
            "bss": {"eta": trainer.eta, "k": trainer.k, "features_layer": trainer.features_layer}
        }
        return MethodSetup(model=trainer, classifier=model, report=lambda fit_info: report)


register(BatchSpectralShrinkage())
