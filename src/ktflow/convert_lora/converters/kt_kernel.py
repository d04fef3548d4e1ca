"""kt_kernel's own ``convert_kt_to_sglang_adapter``, for KT adapters (fused expert LoRA) only."""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ktflow.convert_lora.converters.base import LoraConverter
from ktflow.convert_lora.layout import FUSED_WEIGHTS
from ktflow.convert_lora.plan import AdapterPlan
from ktflow.errors import KtflowInputError

KT_CONVERTER_FILE = ("sft", "convert_kt_to_sglang_adapter.py")


def load_kt_converter() -> Callable[..., dict[str, Any]]:
    """kt_kernel's ``convert_kt_to_sglang_adapter``, loaded without importing the kt_kernel package.

    The converter is pure torch, but ``import kt_kernel`` loads a compiled CPU
    extension chosen by CPU detection and imports ``gguf`` (kt-kernel 0.7.2 fails
    with "No module named 'gguf'" where that is missing), so the module file is
    executed on its own. Raises ImportError saying what is missing.
    """
    spec = importlib.util.find_spec("kt_kernel")  # top-level lookup: does not run __init__
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("kt_kernel is not installed")
    path = Path(next(iter(spec.submodule_search_locations))).joinpath(*KT_CONVERTER_FILE)
    if not path.is_file():
        raise ImportError(f"{path} not found (kt-kernel older than 0.7?)")
    module_spec = importlib.util.spec_from_file_location("_ktflow_kt_sglang_converter", path)
    if module_spec is None or module_spec.loader is None:
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_spec.name] = module  # dataclasses and pickling look modules up by name
    try:
        module_spec.loader.exec_module(module)
    except Exception as error:
        sys.modules.pop(module_spec.name, None)
        raise ImportError(f"{path}: {type(error).__name__}: {error}") from error
    converter = getattr(module, "convert_kt_to_sglang_adapter", None)
    if not callable(converter):
        raise ImportError(f"{path} has no convert_kt_to_sglang_adapter")
    return converter  # type: ignore[no-any-return]


class KtKernelConverter(LoraConverter):
    name = "kt_kernel"

    def __init__(self) -> None:
        self.converter: Callable[..., dict[str, Any]] | None = None

    def check(self, plan: AdapterPlan) -> None:
        if not plan.fused_keys:
            raise KtflowInputError(
                plan.adapter_dir / FUSED_WEIGHTS, None, "missing: kt_kernel converts KT adapters only"
            )

    def load(self) -> None:
        self.converter = load_kt_converter()

    def write(self, plan: AdapterPlan, out: Path, base_model: str, lora_alpha: float | None) -> int:
        converter = self.converter or load_kt_converter()
        # out is empty here (provenance is written on exit), which kt_kernel accepts as output
        summary = converter(plan.adapter_dir, out, base_model_name_or_path=base_model, lora_alpha=lora_alpha)
        count = int(summary["tensor_count"])
        if count != len(plan.plain_keys) + plan.expert_tensor_count or summary["rank"] != plan.rank:
            raise RuntimeError(f"kt_kernel's converter disagrees with ktflow's plan: {summary}")
        return count

    @classmethod
    def installed(cls) -> dict[str, Any]:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            return {"kt_kernel_version": importlib.metadata.version("kt-kernel")}
        return {}
