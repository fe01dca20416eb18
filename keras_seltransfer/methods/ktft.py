"""`--method=ktft`: knowledge-transferred fine-tuning (IEEE Access 2022).

The network is anti-aliased as in `antialias_ft`; the original classifier,
frozen and in inference mode, is the teacher of a `KnowledgeTransferModel`,
whose pixel-level, global-level and (optionally) logit losses pull the
student's stage outputs toward the teacher's. `model.keras` and the
SavedModel hold the anti-aliased classifier alone.
"""

import dataclasses

from keras_seltransfer.methods.antialias import AntialiasOptions
from keras_seltransfer.methods.antialias import antialiased_student
from keras_seltransfer.methods.base import Method
from keras_seltransfer.methods.base import MethodSetup
from keras_seltransfer.utils.naming import name_list
from keras_seltransfer.utils.options import option
from keras_seltransfer.methods.registry import register
from keras_seltransfer.models.knowledge_transfer import KnowledgeTransferModel


@dataclasses.dataclass
class KTFTOptions:
    """Options of `--method=ktft` (besides the anti-aliasing ones)."""

    ktft_pixel_weight: float = option(
        1.0,
        "ktft: weight of the pixel-level loss (mean squared difference of the stage feature "
        "maps to the original network's); 0 disables it.",
        lower=0.0,
    )
    ktft_global_weight: float = option(
        1.0,
        "ktft: weight of the global-level loss (on the globally pooled stage features); "
        "0 disables it.",
        lower=0.0,
    )
    ktft_logit_weight: float = option(
        0.0,
        "ktft: weight of the teacher-to-student KL divergence on the class probabilities; "
        "0 disables it.",
        lower=0.0,
    )
    ktft_layers: str = option(
        None,
        "ktft: comma-separated names of the stage outputs the losses compare. Unset: the "
        "output of every downsampling stage.",
    )

    @staticmethod
    def validate(config):
        """Raises ValueError for a `ktft_layers` that names no layer."""
        layer_names(config.ktft_layers)


def layer_names(spec):
    """The layer names of a `ktft_layers` spec (None: every stage output)."""
    return name_list(spec, "ktft_layers")


class KnowledgeTransferredFinetuning(Method):
    """Anti-aliased fine-tuning with the original network as the teacher."""

    name = "ktft"
    summary = (
        "knowledge-transferred fine-tuning (IEEE Access 2022): the anti-aliased network "
        "fine-tuned with pixel-level and global-level losses toward the original network"
    )
    options = (AntialiasOptions, KTFTOptions)
    applies = ("antialias",)
    order = 41

    def setup(self, config, model, context):
        """The report gains `"antialias"` and `"ktft"` (the compared layer
        pairs and the weights)."""
        student, antialias_report = antialiased_student(config, model, context)
        with context.strategy.scope():
            trainer = KnowledgeTransferModel(
                student,
                model,
                layer_names=layer_names(config.ktft_layers),
                pixel_weight=config.ktft_pixel_weight,
                global_weight=config.ktft_global_weight,
                logit_weight=config.ktft_logit_weight,
                name="ktft",
            )
        report = {
            "antialias": antialias_report,
            "ktft": {
                "layers": [list(pair) for pair in trainer.layer_names],
                "pixel_weight": trainer.pixel_weight,
                "global_weight": trainer.global_weight,
                "logit_weight": trainer.logit_weight,
            },
        }
        return MethodSetup(model=trainer, classifier=student, report=lambda fit_info: report)


register(KnowledgeTransferredFinetuning())
