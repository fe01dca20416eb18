"""keras_seltransfer: selective transfer learning for small image data sets.

Keras 3 building blocks (layers, callbacks, losses, model transforms,
retrieval of similar source images) for fine-tuning a pretrained backbone
when the target data is small, the fine-tuning methods built from them
(`methods`, one module per method), the workflows that run them
(`training`), and absl apps (`keras_seltransfer.apps`) that run whole
workflows from the command line.

Importing the package registers every custom Keras object, so saved models
load with `keras.saving.load_model`.
"""

from keras_seltransfer import callbacks
from keras_seltransfer import data
from keras_seltransfer import distribute
from keras_seltransfer import evaluation
from keras_seltransfer import export
from keras_seltransfer import layers
from keras_seltransfer import losses
from keras_seltransfer import methods
from keras_seltransfer import models
from keras_seltransfer import optimizers
from keras_seltransfer import regularizers
from keras_seltransfer import relevance
from keras_seltransfer import retrieval
from keras_seltransfer import training
from keras_seltransfer.data import load_dataset
from keras_seltransfer.data import load_train_test
from keras_seltransfer.export import export_saved_model
from keras_seltransfer.regularizers import L2SP
from keras_seltransfer.regularizers import apply_l2sp
from keras_seltransfer.training import FinetuneConfig
from keras_seltransfer.training import PretrainConfig
from keras_seltransfer.training import finetune
from keras_seltransfer.training import finetune_split
from keras_seltransfer.training import pretrain

__version__ = "0.1.0"

__all__ = [
    "FinetuneConfig",
    "L2SP",
    "PretrainConfig",
    "__version__",
    "apply_l2sp",
    "callbacks",
    "data",
    "distribute",
    "evaluation",
    "export",
    "export_saved_model",
    "finetune",
    "finetune_split",
    "layers",
    "load_dataset",
    "load_train_test",
    "losses",
    "methods",
    "models",
    "optimizers",
    "pretrain",
    "regularizers",
    "relevance",
    "retrieval",
    "training",
]
