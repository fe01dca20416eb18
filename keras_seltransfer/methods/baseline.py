"""`--method=baseline`: plain fine-tuning of every layer.

The "ERM" row of the Transfer-Learning-Library benchmarks: the backbone with
a new target head, every weight trained with the run's optimizer, BatchNorm
statistics frozen unless `FinetuneConfig.batchnorm="train"`.
"""

from keras_seltransfer.methods.base import Method
from keras_seltransfer.methods.registry import register


class Baseline(Method):
    """Plain fine-tuning: the general training loop with nothing added."""

    name = "baseline"
    summary = (
        "plain fine-tuning of every layer (the \"ERM\" row of the Transfer-Learning-Library "
        "benchmarks), BatchNorm statistics frozen"
    )
    order = 0


register(Baseline())
