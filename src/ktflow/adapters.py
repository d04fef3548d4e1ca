"""``ktflow convert-lora``: turn an HF- or KT-backend LoRA adapter into one PEFT dir SGLang loads.

SGLang reads plain PEFT keys (no ``base_model.model.`` prefix) and wants routed
expert LoRA as one A/B pair per expert, while KT's trainer saves expert LoRA as
fused 3-D tensors ``layers.{L}.experts.{gate,up,down}_lora_{a,b}`` of shape
``[E, r, in]`` (A) and ``[E, out, r]`` (B) in ``fused_expert_lora.safetensors``.
Everything is validated from safetensors headers before any tensor is read, so a
bad adapter fails in milliseconds with the file and key at fault.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.metadata
import importlib.util
import json
import logging
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ktflow.atomic import atomic_dir, sha256_file, write_json
from ktflow.errors import KtflowInputError
from ktflow.provenance import PROVENANCE_NAME, recorded

log = logging.getLogger(__name__)

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
FUSED_WEIGHTS = "fused_expert_lora.safetensors"
KT_MANIFEST = "kt_adapter_manifest.json"
IMPLEMENTATIONS = ("auto", "kt_kernel", "builtin")
KT_CONVERTER_FILE = ("sft", "convert_kt_to_sglang_adapter.py")

_FUSED_KEY = re.compile(r"^layers\.(\d+)\.experts\.([a-z_]+)$")
# fused name -> (projection, PEFT matrix, meaning of the two dims after the expert dim)
_FUSED_LAYOUT: dict[str, tuple[str, str, tuple[str, str]]] = {
    "gate_lora_a": ("gate_proj", "lora_A", ("rank", "hidden")),
    "gate_lora_b": ("gate_proj", "lora_B", ("intermediate", "rank")),
    "up_lora_a": ("up_proj", "lora_A", ("rank", "hidden")),
    "up_lora_b": ("up_proj", "lora_B", ("intermediate", "rank")),
    "down_lora_a": ("down_proj", "lora_A", ("rank", "intermediate")),
    "down_lora_b": ("down_proj", "lora_B", ("hidden", "rank")),
}
# SGLang's usual module order first, anything else sorted after (matches kt_kernel's converter).
# fmt: off
_MODULE_ORDER = (
    "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
    "in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a", "out_proj", "embed_tokens", "lm_head",
)
# fmt: on
# adapter_config.json fields that make an adapter more than plain LoRA A/B matrices
_UNSERVABLE = (
    ("use_dora", "DoRA"),
    ("target_parameters", "LoRA on fused 3-D parameters (peft >= 0.19 does this to MoE experts)"),
    ("modules_to_save", "fully trained modules"),
    ("trainable_token_indices", "trained token embeddings"),
)
_RANK_AXIS = {"lora_A": 0, "lora_embedding_A": 0, "lora_B": 1, "lora_embedding_B": 1}
_LORA_MATRIX = re.compile(r"\.(lora_A|lora_B|lora_embedding_A|lora_embedding_B)(?:\.|$)")


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


@dataclasses.dataclass(frozen=True)
class AdapterPlan:
    """The validated adapter and the exact output, derived from headers only."""

    adapter_dir: Path
    config: dict[str, Any]
    plain_keys: dict[str, str]  # output key -> key in adapter_model.safetensors
    fused_keys: tuple[str, ...]
    rank: int
    alpha: float
    expert_tensor_count: int
    manifest_checked: bool


def expert_key(layer: int, expert: int, projection: str, matrix: str) -> str:
    return f"model.layers.{layer}.mlp.experts.{expert}.{projection}.{matrix}.weight"


def clean_key(key: str) -> str:
    return key.replace("base_model.model.", "").replace(".orig_module", "")


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


def read_json_object(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise KtflowInputError(path, None, "file not found") from None
    except (OSError, ValueError) as error:
        raise KtflowInputError(path, None, f"not readable JSON: {error}") from None
    if not isinstance(data, dict):
        raise KtflowInputError(path, None, "expected a JSON object")
    return data


def safetensors_headers(path: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """key -> (shape, dtype) from the safetensors header, without reading tensor data."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            return {
                key: (tuple(handle.get_slice(key).get_shape()), handle.get_slice(key).get_dtype())
                for key in handle.keys()  # noqa: SIM118 - safe_open handles are not mappings
            }
    except FileNotFoundError:
        raise KtflowInputError(path, None, "file not found") from None
    except Exception as error:
        raise KtflowInputError(path, None, f"not a readable safetensors file: {error}") from None


def _base_dims(base_model: str) -> dict[str, int]:
    """Expert geometry from a local base checkpoint's config.json (empty for a hub id)."""
    path = Path(base_model) / "config.json"
    if not path.is_file():
        return {}
    config = read_json_object(path)
    text = config.get("text_config", config)
    found = {
        "experts": text.get("n_routed_experts", text.get("num_experts")),
        "hidden": text.get("hidden_size"),
        "intermediate": text.get("moe_intermediate_size"),
        "layers": text.get("num_hidden_layers"),
    }
    return {name: value for name, value in found.items() if isinstance(value, int)}


def _fused_plan(path: Path, dims: dict[str, int]) -> tuple[tuple[str, ...], int, set[str], int]:
    """Validate the fused file's keys and shapes; return (keys, rank, projections, per-expert count)."""
    headers = safetensors_headers(path)
    if not headers:
        raise KtflowInputError(path, None, "holds no tensors")
    bound = dict(dims)
    origin = {name: "the base model's config.json" for name in bound}
    layers: dict[int, set[str]] = {}
    for key, (shape, _dtype) in sorted(headers.items()):
        match = _FUSED_KEY.match(key)
        if match is None or match.group(2) not in _FUSED_LAYOUT:
            raise KtflowInputError(
                path, key, "unexpected key (want layers.{L}.experts.{gate,up,down}_lora_{a,b})"
            )
        layer = int(match.group(1))
        if "layers" in bound and layer >= bound["layers"]:
            raise KtflowInputError(
                path, key, f"layer {layer} but the base model has {bound['layers']} layers"
            )
        layers.setdefault(layer, set()).add(match.group(2))
        meaning = ("experts", *_FUSED_LAYOUT[match.group(2)][2])
        if len(shape) != 3:
            raise KtflowInputError(
                path, key, f"expected a 3-D [{', '.join(meaning)}] tensor, got {list(shape)}"
            )
        for name, size in zip(meaning, shape, strict=True):
            if bound.setdefault(name, size) != size:
                raise KtflowInputError(
                    path,
                    key,
                    f"shape {list(shape)} = [{', '.join(meaning)}] gives {name}={size}, "
                    f"but {origin[name]} gives {name}={bound[name]}",
                )
            origin.setdefault(name, key)
    for layer, names in sorted(layers.items()):
        if missing := sorted(set(_FUSED_LAYOUT) - names):
            raise KtflowInputError(path, f"layers.{layer}.experts.{missing[0]}", "missing")
    projections = {_FUSED_LAYOUT[name][0] for name in _FUSED_LAYOUT}
    return tuple(sorted(headers)), bound["rank"], projections, len(headers) * bound["experts"]


def _check_manifest(adapter_dir: Path, rank: int, alpha: float) -> bool:
    """Check kt_adapter_manifest.json against the files beside it; False when there is none."""
    path = adapter_dir / KT_MANIFEST
    if not path.exists():
        log.warning("%s: no %s; converting without checking the KT artifact hashes", adapter_dir, KT_MANIFEST)
        return False
    manifest = read_json_object(path)
    for field, want in (("version", 1), ("status", "ready")):
        if manifest.get(field) != want:
            raise KtflowInputError(path, field, f"expected {want!r}, got {manifest.get(field)!r}")
    lora = manifest.get("lora", {})
    if isinstance(lora, dict) and lora.get("rank", rank) != rank:
        raise KtflowInputError(path, "lora.rank", f"{lora['rank']} but {FUSED_WEIGHTS} has rank {rank}")
    if isinstance(lora, dict) and float(lora.get("alpha", alpha)) != alpha:
        raise KtflowInputError(path, "lora.alpha", f"{lora['alpha']} but the adapter's lora_alpha is {alpha}")
    artifacts = manifest.get("artifacts")
    if not isinstance(artifacts, dict) or FUSED_WEIGHTS not in artifacts:
        raise KtflowInputError(path, "artifacts", f"must be an object listing {FUSED_WEIGHTS}")
    for name, record in sorted(artifacts.items()):
        target = adapter_dir / name
        if not isinstance(record, dict) or Path(name).name != name or not target.is_file():
            raise KtflowInputError(path, f"artifacts.{name}", "listed but missing beside the manifest")
        if record.get("size") != target.stat().st_size or record.get("sha256") != sha256_file(target):
            raise KtflowInputError(path, f"artifacts.{name}", "size/sha256 do not match the file (edited?)")
    contract = artifacts[FUSED_WEIGHTS].get("tensors")
    if isinstance(contract, dict):
        actual = safetensors_headers(adapter_dir / FUSED_WEIGHTS)
        for key in sorted(set(contract) | set(actual)):
            want, have = contract.get(key, {}), actual.get(key)
            if (
                have is None
                or not isinstance(want, dict)
                or [list(have[0]), have[1]] != [want.get("shape"), want.get("dtype")]
            ):
                raise KtflowInputError(
                    path,
                    f"artifacts.{FUSED_WEIGHTS}.tensors.{key}",
                    f"manifest says {want or 'nothing'}, file has {have and [list(have[0]), have[1]]}",
                )
    return True


def _module_name(key: str) -> str:
    if "lora_embedding_" in key:
        return "embed_tokens" if "embed_tokens" in key else "lm_head"
    return key.split(".lora_", 1)[0].rsplit(".", 1)[-1]


def _ordered(modules: set[str]) -> list[str]:
    return [m for m in _MODULE_ORDER if m in modules] + sorted(modules - set(_MODULE_ORDER))


def plan_conversion(adapter_dir: Path, base_model: str, lora_alpha: float | None = None) -> AdapterPlan:
    """Validate an adapter dir (headers and JSON only) and derive the SGLang adapter it becomes."""
    config_path, weights_path, fused_path = (
        adapter_dir / n for n in (ADAPTER_CONFIG, ADAPTER_WEIGHTS, FUSED_WEIGHTS)
    )
    if not weights_path.is_file():
        raise KtflowInputError(
            weights_path, None, "missing (PEFT adapter weights; .bin adapters are not supported)"
        )
    config = read_json_object(config_path)
    config_rank = config.get("r")
    if isinstance(config_rank, bool) or not isinstance(config_rank, int) or config_rank <= 0:
        raise KtflowInputError(config_path, "r", f"missing or not a positive integer: {config_rank!r}")
    if config.get("peft_type", "LORA") != "LORA":
        raise KtflowInputError(config_path, "peft_type", f"{config['peft_type']!r}: only LORA converts")
    for field, why in _UNSERVABLE:
        if config.get(field):
            raise KtflowInputError(config_path, field, f"{why}: SGLang cannot load it")
    alpha = config.get("lora_alpha", lora_alpha)
    if alpha is None:
        raise KtflowInputError(
            config_path, "lora_alpha", "missing; pass --lora-alpha (the value used in training)"
        )
    if lora_alpha is not None and float(alpha) != float(lora_alpha):
        raise KtflowInputError(config_path, "lora_alpha", f"{alpha} conflicts with --lora-alpha {lora_alpha}")

    fused_keys: tuple[str, ...] = ()
    rank, expert_count, targets = config_rank, 0, set[str]()
    if fused_path.exists():
        fused_keys, rank, targets, expert_count = _fused_plan(fused_path, _base_dims(base_model))
        if rank != config_rank:
            raise KtflowInputError(config_path, "r", f"{config_rank} but {FUSED_WEIGHTS} has rank {rank}")
    plain_keys: dict[str, str] = {}
    for key, (shape, _dtype) in sorted(safetensors_headers(weights_path).items()):
        out_key = clean_key(key)
        matrix = _LORA_MATRIX.search(out_key)
        if matrix is None:
            raise KtflowInputError(weights_path, key, "not a LoRA A/B matrix (SGLang loads nothing else)")
        if out_key in plain_keys:
            raise KtflowInputError(weights_path, key, f"collides with {plain_keys[out_key]} once cleaned")
        if len(shape) != 2 or shape[_RANK_AXIS[matrix.group(1)]] != rank:
            raise KtflowInputError(weights_path, key, f"shape {list(shape)} does not have rank {rank}")
        plain_keys[out_key] = key
        targets.add(_module_name(out_key))
    listed = config.get("target_modules")
    if isinstance(listed, list):  # a regex string or "all-linear" names nothing by itself
        targets.update(str(name).rsplit(".", 1)[-1] for name in listed)
    manifest_checked = bool(fused_keys) and _check_manifest(adapter_dir, rank, float(alpha))
    out_config = {
        **config,
        "peft_type": config.get("peft_type", "LORA"),
        "r": rank,
        "lora_alpha": alpha,
        "target_modules": _ordered(targets),
        "bias": config.get("bias", "none"),
        "task_type": config.get("task_type", "CAUSAL_LM"),
        "base_model_name_or_path": base_model,
    }
    return AdapterPlan(
        adapter_dir, out_config, plain_keys, fused_keys, rank, float(alpha), expert_count, manifest_checked
    )


def _write_builtin(plan: AdapterPlan, out: Path) -> int:
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    plain = load_file(str(plan.adapter_dir / ADAPTER_WEIGHTS))
    tensors = {out_key: plain[key] for out_key, key in plan.plain_keys.items()}
    if plan.fused_keys:
        with safe_open(str(plan.adapter_dir / FUSED_WEIGHTS), framework="pt") as handle:
            for key in plan.fused_keys:
                match = _FUSED_KEY.match(key)
                assert match is not None  # validated by plan_conversion
                projection, matrix, _dims = _FUSED_LAYOUT[match.group(2)]
                fused = handle.get_tensor(key).contiguous()
                for expert in range(fused.shape[0]):
                    # a dim-0 slice of a contiguous tensor is itself contiguous: no copy needed
                    tensors[expert_key(int(match.group(1)), expert, projection, matrix)] = fused[expert]
    save_file(tensors, str(out / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    write_json(out / ADAPTER_CONFIG, plan.config)
    return len(tensors)


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
    converter, chosen = None, "builtin"
    if implementation != "builtin" and plan.fused_keys:
        try:
            converter, chosen = load_kt_converter(), "kt_kernel"
        except ImportError as error:
            if implementation == "kt_kernel":
                raise KtflowInputError(None, "--implementation", f"kt_kernel's converter: {error}") from None
            log.info("kt_kernel converter unavailable (%s); using the built-in one", error)
    elif implementation == "kt_kernel":
        raise KtflowInputError(
            adapter_dir / FUSED_WEIGHTS, None, "missing: kt_kernel converts KT adapters only"
        )
    settings = {"base_model": base_model, "lora_alpha": lora_alpha, "implementation": chosen}
    with (
        atomic_dir(out_dir) as tmp,
        recorded(tmp / PROVENANCE_NAME, "convert-lora", settings, [adapter_dir]) as extra,
    ):
        if converter is not None:
            # tmp is empty here (provenance is written on exit), which kt_kernel accepts as output
            summary = converter(adapter_dir, tmp, base_model_name_or_path=base_model, lora_alpha=lora_alpha)
            count = int(summary["tensor_count"])
            if count != len(plan.plain_keys) + plan.expert_tensor_count or summary["rank"] != plan.rank:
                raise RuntimeError(f"kt_kernel's converter disagrees with ktflow's plan: {summary}")
        else:
            count = _write_builtin(plan, tmp)
        report = ConvertReport(
            out_dir=out_dir,
            implementation=chosen,
            backend="kt" if plan.fused_keys else "hf",
            rank=plan.rank,
            lora_alpha=plan.alpha,
            target_modules=tuple(plan.config["target_modules"]),
            tensor_count=count,
            expert_tensor_count=plan.expert_tensor_count,
            manifest_checked=plan.manifest_checked,
        )
        extra.update(report.as_dict())
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            extra["kt_kernel_version"] = importlib.metadata.version("kt-kernel")
    return report


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("adapter_dir", type=Path, help="LoRA output of LLaMA-Factory (HF or KT backend)")
    parser.add_argument("out_dir", type=Path, help="PEFT adapter dir to write for SGLang --lora-paths")
    parser.add_argument(
        "--base-model", required=True, help="base model dir (or id) recorded in adapter_config.json"
    )
    parser.add_argument("--lora-alpha", type=float, default=None, help="only if adapter_config.json lacks it")
    parser.add_argument(
        "--implementation",
        choices=IMPLEMENTATIONS,
        default="auto",
        help="auto: kt_kernel's converter for KT adapters when importable, else built-in",
    )


def main(args: argparse.Namespace) -> int:
    report = convert_adapter(
        args.adapter_dir, args.out_dir, args.base_model, args.lora_alpha, args.implementation
    )
    print(json.dumps(report.as_dict(), indent=2))
    return 0
