"""Training backends, one file each, keyed by the config's ``training.backend`` value.

- ``hf``: upstream LLaMA-Factory on transformers + PEFT (CPU or GPU).
- ``kt``: KTransformers experts on the CPU (the YAML generation the environment has).
- ``kt-legacy``: ``kt`` with the legacy generation forced.
- ``unsloth``: LLaMA-Factory's ``use_unsloth`` (one CUDA GPU).
"""

from __future__ import annotations

from ktflow.train.backends.base import TrainingBackend
from ktflow.train.backends.hf import HFBackend
from ktflow.train.backends.kt import KTBackend
from ktflow.train.backends.kt_legacy import KTLegacyBackend
from ktflow.train.backends.unsloth import UnslothBackend

BACKENDS: dict[str, type[TrainingBackend]] = {
    backend.name: backend for backend in (HFBackend, KTBackend, KTLegacyBackend, UnslothBackend)
}


def backend_for(name: str) -> TrainingBackend:
    return BACKENDS[name]()
