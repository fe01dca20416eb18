"""Keras callbacks of keras_seltransfer."""

from keras_seltransfer.callbacks.batchnorm_recalibration import BatchNormRecalibration
from keras_seltransfer.callbacks.neighbour_growth import AdaptiveNeighbourGrowth
from keras_seltransfer.callbacks.neighbour_growth import grow_neighbour_counts
from keras_seltransfer.callbacks.neighbour_growth import prediction_entropy
from keras_seltransfer.callbacks.relevance_pruning import RelevancePruning
from keras_seltransfer.callbacks.relevance_pruning import pruning_fraction
from keras_seltransfer.callbacks.training_checkpoint import TrainingCheckpoint
from keras_seltransfer.callbacks.validation_collapse import ValidationCollapseMonitor
from keras_seltransfer.callbacks.validation_collapse import validation_collapse

__all__ = [
    "AdaptiveNeighbourGrowth",
    "BatchNormRecalibration",
    "RelevancePruning",
    "TrainingCheckpoint",
    "ValidationCollapseMonitor",
    "grow_neighbour_counts",
    "prediction_entropy",
    "pruning_fraction",
    "validation_collapse",
]
