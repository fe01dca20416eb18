"""Keras callbacks of keras_seltransfer."""

from keras_seltransfer.callbacks.training_checkpoint import TrainingCheckpoint

__all__ = ["TrainingCheckpoint"]
