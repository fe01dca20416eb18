"""Models and model transforms.

Builders (backbones, classification and two-head models, the knowledge
transfer trainer, the DELTA and BSS training models) and transforms of a
built model (anti-aliasing, AdaFilter gating, selective filter transfer and
filter masks, BatchNorm modes and recalibration), with the functions that
inspect what a transform did. The graph surgery they share is
`keras_seltransfer.models.surgery`.
"""

from keras_seltransfer.models.gating import adafilter
from keras_seltransfer.models.gating import gate_usage
from keras_seltransfer.models.gating import gated_layers
from keras_seltransfer.models.antialiasing import antialias
from keras_seltransfer.models.antialiasing import blur_layers
from keras_seltransfer.models.backbones import available_backbones
from keras_seltransfer.models.backbones import FEATURES_LAYER
from keras_seltransfer.models.backbones import is_backbone_path
from keras_seltransfer.models.backbones import is_builtin_backbone
from keras_seltransfer.models.backbones import load_backbone
from keras_seltransfer.models.backbones import load_keras_file
from keras_seltransfer.models.backbones import reinitialize
from keras_seltransfer.models.backbones import small_cnn
from keras_seltransfer.models.batchnorm import batchnorm_layers
from keras_seltransfer.models.batchnorm import recalibrate_batchnorm
from keras_seltransfer.models.channel_attention import channel_loss_increases
from keras_seltransfer.models.classifier import build_classifier
from keras_seltransfer.models.classifier import set_batchnorm_mode
from keras_seltransfer.models.filter_masking import add_filter_masks
from keras_seltransfer.models.filter_masking import filter_masks
from keras_seltransfer.models.filter_masking import fold_filter_masks
from keras_seltransfer.models.filter_reinit import reinitialize_filters
from keras_seltransfer.models.filter_transfer import batchnorm_statistics_gap
from keras_seltransfer.models.filter_transfer import filter_transfer_summary
from keras_seltransfer.models.filter_transfer import selective_filter_transfer
from keras_seltransfer.models.filter_transfer import set_reinitialized_batchnorm
from keras_seltransfer.models.knowledge_transfer import KnowledgeTransferModel
from keras_seltransfer.models.knowledge_transfer import stage_outputs
from keras_seltransfer.models.multitask import build_multitask_model
from keras_seltransfer.models.multitask import joint_compile_args
from keras_seltransfer.models.multitask import target_model
from keras_seltransfer.models.regularized_training import BatchSpectralShrinkageModel
from keras_seltransfer.models.regularized_training import DeltaModel

__all__ = [
    "BatchSpectralShrinkageModel",
    "DeltaModel",
    "FEATURES_LAYER",
    "KnowledgeTransferModel",
    "adafilter",
    "add_filter_masks",
    "batchnorm_statistics_gap",
    "antialias",
    "available_backbones",
    "batchnorm_layers",
    "blur_layers",
    "build_classifier",
    "build_multitask_model",
    "channel_loss_increases",
    "filter_masks",
    "filter_transfer_summary",
    "fold_filter_masks",
    "gate_usage",
    "gated_layers",
    "is_backbone_path",
    "is_builtin_backbone",
    "joint_compile_args",
    "load_backbone",
    "load_keras_file",
    "recalibrate_batchnorm",
    "reinitialize",
    "reinitialize_filters",
    "selective_filter_transfer",
    "set_batchnorm_mode",
    "set_reinitialized_batchnorm",
    "small_cnn",
    "stage_outputs",
    "target_model",
]
