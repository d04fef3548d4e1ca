"""LoRA training through LLaMA-Factory: one backend class per engine (HF, KT, Unsloth)."""

from ktflow.train.backends import BACKENDS, TrainingBackend, backend_for
from ktflow.train.spec import TrainSpec

__all__ = ["BACKENDS", "TrainSpec", "TrainingBackend", "backend_for"]
