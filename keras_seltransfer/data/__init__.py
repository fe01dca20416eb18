"""Data sources, stratified splits and tf.data input pipelines.

`readers` (arrays, image folders, TFDS splits), `builtin` (the offline real
data sets: Fashion-MNIST, ELPV, scikit-image's textures) and `sources`
(`load_dataset`, the spec strings of the apps) make `ImageSource` records
(`image_source`); `splits` makes the held-out, low-data and validation index
sets; `pipeline` builds batched `tf.data` pipelines from a source, also per
replica under a strategy; `joint` mixes target images with their selected
source neighbours for selective joint fine-tuning.
"""

from keras_seltransfer.data.builtin import load_elpv
from keras_seltransfer.data.builtin import load_fashion_mnist
from keras_seltransfer.data.builtin import load_textures
from keras_seltransfer.data.image_source import ImageSource
from keras_seltransfer.data.joint import joint_steps_per_epoch
from keras_seltransfer.data.joint import joint_validation_dataset
from keras_seltransfer.data.joint import make_joint_dataset
from keras_seltransfer.data.joint import prepared_images
from keras_seltransfer.data.joint_sampler import TARGET_DRAWS
from keras_seltransfer.data.joint_sampler import JointSampler
from keras_seltransfer.data.joint_variants import make_sampler
from keras_seltransfer.data.pipeline import augment_batch
from keras_seltransfer.data.pipeline import distributed_dataset
from keras_seltransfer.data.pipeline import make_dataset
from keras_seltransfer.data.pipeline import steps_per_epoch
from keras_seltransfer.data.protocol import load_train_test
from keras_seltransfer.data.readers import from_image_folder
from keras_seltransfer.data.readers import from_numpy
from keras_seltransfer.data.readers import from_tfds
from keras_seltransfer.data.sources import load_dataset
from keras_seltransfer.data.splits import holdout_split
from keras_seltransfer.data.splits import low_data_subset
from keras_seltransfer.data.splits import train_val_split

__all__ = [
    "ImageSource",
    "JointSampler",
    "augment_batch",
    "distributed_dataset",
    "TARGET_DRAWS",
    "from_image_folder",
    "from_numpy",
    "from_tfds",
    "holdout_split",
    "joint_steps_per_epoch",
    "joint_validation_dataset",
    "load_dataset",
    "load_elpv",
    "load_fashion_mnist",
    "load_textures",
    "load_train_test",
    "low_data_subset",
    "make_dataset",
    "make_joint_dataset",
    "make_sampler",
    "prepared_images",
    "steps_per_epoch",
    "train_val_split",
]
