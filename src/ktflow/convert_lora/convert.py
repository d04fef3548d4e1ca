"""The format-blind driver: plan from headers, pick a converter, write the output dir atomically."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from ktflow.atomic import atomic_dir
from ktflow.convert_lora.converters import CONVERTERS, IMPLEMENTATIONS, choose_converter
from ktflow.convert_lora.plan import plan_conversion
from ktflow.errors import KtflowInputError
from ktflow.provenance import PROVENANCE_NAME, recorded


@dataclasses.dataclass(frozen=True)
class ConvertReport:
    out_dir: Path
    implementation: str
    backend: str  # which trainer wrote the adapter: "kt" (fused experts) or "hf"
    rank: int
    lora_alpha: float
    target_modules: tuple[str, ...]
    tensor_count: int
    expert_tensor_count: int
    manifest_checked: bool

    def as_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["out_dir"] = str(self.out_dir)
        data["target_modules"] = list(self.target_modules)
        return data


def _check_paths(adapter_dir: Path, out_dir: Path) -> None:
    if not adapter_dir.is_dir():
        raise KtflowInputError(adapter_dir, None, "adapter directory not found")
    inp, out = adapter_dir.resolve(), out_dir.resolve()
    if inp == out or inp in out.parents or out in inp.parents:
        raise KtflowInputError(
            out_dir, None, f"output must lie outside the adapter dir {adapter_dir} and vice versa"
        )


def convert_adapter(
    adapter_dir: Path,
    out_dir: Path,
    base_model: str,
    lora_alpha: float | None = None,
    implementation: str = "auto",
) -> ConvertReport:
    """Write ``out_dir`` (atomically, with provenance.json): the adapter as one PEFT dir SGLang loads."""
    adapter_dir, out_dir = Path(adapter_dir), Path(out_dir)
    if implementation not in IMPLEMENTATIONS:
        raise KtflowInputError(None, "--implementation", f"{implementation!r} not in {IMPLEMENTATIONS}")
    _check_paths(adapter_dir, out_dir)
    plan = plan_conversion(adapter_dir, base_model, lora_alpha)
    converter = choose_converter(implementation, plan)
    settings = {"base_model": base_model, "lora_alpha": lora_alpha, "implementation": converter.name}
    with (
        atomic_dir(out_dir) as tmp,
        recorded(tmp / PROVENANCE_NAME, "convert-lora", settings, [adapter_dir]) as extra,
    ):
        count = converter.write(plan, tmp, base_model, lora_alpha)
        report = ConvertReport(
            out_dir=out_dir,
            implementation=converter.name,
            backend="kt" if plan.fused_keys else "hf",
            rank=plan.rank,
            lora_alpha=plan.alpha,
            target_modules=tuple(plan.config["target_modules"]),
            tensor_count=count,
            expert_tensor_count=plan.expert_tensor_count,
            manifest_checked=plan.manifest_checked,
        )
        extra.update(report.as_dict())
        for candidate in CONVERTERS.values():
            extra.update(candidate.installed())
    return report
