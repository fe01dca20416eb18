"""Data sources, stratified splits and tf.data input pipelines.

`sources` turns arrays, image folders, TFDS splits and the offline real data
sets (Fashion-MNIST, ELPV) into `ImageSource` records; `splits` makes the
held-out, low-data and validation index sets; `pipeline` builds batched
`tf.data` pipelines from a source, also per replica under a strategy.
"""

from keras_seltransfer.data.pipeline import distributed_dataset
from keras_seltransfer.data.pipeline import make_dataset
from keras_seltransfer.data.pipeline import steps_per_epoch
from keras_seltransfer.data.sources import ImageSource
from keras_seltransfer.data.sources import from_image_folder
from keras_seltransfer.data.sources import from_numpy
from keras_seltransfer.data.sources import from_tfds
from keras_seltransfer.data.sources import load_dataset
from keras_seltransfer.data.sources import load_elpv
from keras_seltransfer.data.sources import load_fashion_mnist
from keras_seltransfer.data.splits import holdout_split
from keras_seltransfer.data.splits import low_data_subset
from keras_seltransfer.data.splits import train_val_split

__all__ = [
    "ImageSource",
    "distributed_dataset",
    "from_image_folder",
    "from_numpy",
    "from_tfds",
    "holdout_split",
    "load_dataset",
    "load_elpv",
    "load_fashion_mnist",
    "low_data_subset",
    "make_dataset",
    "steps_per_epoch",
    "train_val_split",
]
