"""Keras callbacks of keras_seltransfer."""

from keras_seltransfer.callbacks.neighbour_growth import AdaptiveNeighbourGrowth
from keras_seltransfer.callbacks.neighbour_growth import grow_neighbour_counts
from keras_seltransfer.callbacks.neighbour_growth import prediction_entropy
from keras_seltransfer.callbacks.relevance_pruning import RelevancePruning
from keras_seltransfer.callbacks.relevance_pruning import pruning_fraction
from keras_seltransfer.callbacks.training_checkpoint import TrainingCheckpoint

__all__ = [
    "AdaptiveNeighbourGrowth",
    "RelevancePruning",
    "TrainingCheckpoint",
    "grow_neighbour_counts",
    "prediction_entropy",
    "pruning_fraction",
]
