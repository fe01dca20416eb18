"""Whole workflows: pretrain a backbone on a source set, fine-tune it on a target set.

`finetune(FinetuneConfig(...))` runs any registered method
(`keras_seltransfer.methods`) through one general loop: data loading and
low-data subsetting, the strategy, the method's model and transforms,
`model.fit` with early stopping, resumable checkpoints and TensorBoard logs,
the evaluation report and the exports; `method="auto"` chooses the method
by cross-validation (`keras_seltransfer.training.auto`). `pretrain` makes a backbone the same
way. The absl apps (`keras_seltransfer.apps`) map flags onto these configs.

Example:

```python
from keras_seltransfer import training

outputs = training.finetune(training.FinetuneConfig(target="elpv", fraction=0.15))
```
"""

from keras_seltransfer.data.protocol import load_train_test
from keras_seltransfer.training.config import FinetuneConfig
from keras_seltransfer.training.config import PretrainConfig
from keras_seltransfer.training.defaults import DEFAULT_BACKBONE
from keras_seltransfer.training.defaults import DEFAULT_PRETRAIN_DIR
from keras_seltransfer.training.finetuning import finetune
from keras_seltransfer.training.finetuning import finetune_split
from keras_seltransfer.training.finetuning import fit_and_score
from keras_seltransfer.training.loop import evaluate_model
from keras_seltransfer.training.pretraining import pretrain
from keras_seltransfer.training.reporting import mean_std
from keras_seltransfer.training.reporting import run_environment

__all__ = [
    "DEFAULT_BACKBONE",
    "DEFAULT_PRETRAIN_DIR",
    "FinetuneConfig",
    "PretrainConfig",
    "evaluate_model",
    "finetune",
    "finetune_split",
    "fit_and_score",
    "load_train_test",
    "mean_std",
    "pretrain",
    "run_environment",
]
