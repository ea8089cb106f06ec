"""Training: one loop for every stage, EMA, atomic checkpoints, resumable data order."""

from unclip.train.loop import Trainer, TrainingDiverged, TrainResult

__all__ = ["TrainResult", "Trainer", "TrainingDiverged"]
