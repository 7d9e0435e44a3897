"""Training: the built-in loop (``train_update``)."""

from trap2.training.loop import TrainResult, resolve_device, train_update

__all__ = ["TrainResult", "resolve_device", "train_update"]
