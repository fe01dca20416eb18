"""`--method=l2sp`: fine-tuning with the L2-SP penalty (Li, Grandvalet and
Davoine, ICML 2018): an L2 pull of every pretrained weight toward its
starting point (`l2sp_alpha`) and plain weight decay of the new head
(`l2sp_beta`), added as Keras regularizers (`regularizers.apply_l2sp`)."""

import dataclasses

from keras_seltransfer.methods.base import Method
from keras_seltransfer.methods.base import MethodSetup
from keras_seltransfer.utils.options import option
from keras_seltransfer.methods.registry import register
from keras_seltransfer.regularizers import apply_l2sp


@dataclasses.dataclass
class L2SPOptions:
    """Options of `--method=l2sp`."""

    l2sp_alpha: float = option(
        0.1, "l2sp: pull toward the pretrained weights (alpha of L2-SP).", lower=0.0
    )
    l2sp_beta: float = option(0.01, "l2sp: weight decay of the new head (beta of L2-SP).", lower=0.0)


class L2SP(Method):
    """Fine-tuning regularised toward the pretrained weights."""

    name = "l2sp"
    summary = (
        "fine-tuning with the L2-SP penalty toward the pretrained weights (Li, Grandvalet "
        "and Davoine, ICML 2018)"
    )
    options = (L2SPOptions,)
    order = 1

    def setup(self, config, model, context):
        with context.strategy.scope():
            apply_l2sp(model, alpha=config.l2sp_alpha, beta=config.l2sp_beta)
        return MethodSetup(model=model)


register(L2SP())
