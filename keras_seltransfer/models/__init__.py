"""Backbones, classification heads and model transformations."""

from keras_seltransfer.models import surgery
from keras_seltransfer.models.adafilter import adafilter
from keras_seltransfer.models.adafilter import gate_controller
from keras_seltransfer.models.adafilter import gate_usage
from keras_seltransfer.models.adafilter import gated_layers
from keras_seltransfer.models.antialias import aligned_layer_name
from keras_seltransfer.models.antialias import antialias
from keras_seltransfer.models.antialias import blur_layers
from keras_seltransfer.models.backbones import available_backbones
from keras_seltransfer.models.backbones import cut_backbone
from keras_seltransfer.models.backbones import FEATURES_LAYER
from keras_seltransfer.models.backbones import is_backbone_path
from keras_seltransfer.models.backbones import is_builtin_backbone
from keras_seltransfer.models.backbones import load_backbone
from keras_seltransfer.models.backbones import load_keras_file
from keras_seltransfer.models.backbones import reinitialize
from keras_seltransfer.models.backbones import small_cnn
from keras_seltransfer.models.backbones import with_dtype_policy
from keras_seltransfer.models.batchnorm import batchnorm_layers
from keras_seltransfer.models.batchnorm import recalibrate_batchnorm
from keras_seltransfer.models.classifier import BATCHNORM_MODES
from keras_seltransfer.models.classifier import build_classifier
from keras_seltransfer.models.classifier import iter_layers
from keras_seltransfer.models.classifier import set_batchnorm_mode
from keras_seltransfer.models.filter_masking import add_filter_masks
from keras_seltransfer.models.filter_masking import filter_masks
from keras_seltransfer.models.filter_masking import fold_filter_masks
from keras_seltransfer.models.filter_masking import next_layers
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

__all__ = [
    "BATCHNORM_MODES",
    "FEATURES_LAYER",
    "KnowledgeTransferModel",
    "adafilter",
    "add_filter_masks",
    "batchnorm_statistics_gap",
    "aligned_layer_name",
    "antialias",
    "available_backbones",
    "batchnorm_layers",
    "blur_layers",
    "build_classifier",
    "build_multitask_model",
    "cut_backbone",
    "filter_masks",
    "filter_transfer_summary",
    "fold_filter_masks",
    "gate_controller",
    "gate_usage",
    "gated_layers",
    "is_backbone_path",
    "is_builtin_backbone",
    "iter_layers",
    "joint_compile_args",
    "load_backbone",
    "load_keras_file",
    "next_layers",
    "recalibrate_batchnorm",
    "reinitialize",
    "reinitialize_filters",
    "selective_filter_transfer",
    "set_batchnorm_mode",
    "set_reinitialized_batchnorm",
    "small_cnn",
    "stage_outputs",
    "surgery",
    "target_model",
    "with_dtype_policy",
]
