"""What each training backend needs from a host, and the verdicts ``ktflow doctor`` prints.

:class:`HostReport` is what a host and its training environment have (collected by
:func:`ktflow.doctor.collect_host`); :func:`check_backend` lists what stops (errors) or
hampers (warnings) one backend there, optionally for one model's estimated needs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from packaging.version import InvalidVersion, Version

from ktflow import cpuinfo
from ktflow.errors import KtflowInputError
from ktflow.estimate import Requirements, gib
from ktflow.train.kt import LEGACY_BELOW, lf_version
from ktflow.train.spec import BACKEND_NAMES

BACKENDS = BACKEND_NAMES
KT_FLAGS = ("amx_tile", "amx_bf16", "amx_int8", "avx512f", "avx512bw", "avx512_vnni", "avx512_vbmi",
            "avx512_bf16", "avx2")  # fmt: skip
# kt-kernel 0.7.2 ships one CPU build per row and loads the first whose flags the host has
# (kt_kernel/_cpu_detect.py). Only the amx and avx512_bf16 builds export the *_SFT_MOE
# classes LoRA training needs (checked in the wheel's extensions); avx512_bf16 runs them
# without AMX tiles, slower.
KT_VARIANTS = (
    ("amx", ("amx_tile", "amx_int8", "amx_bf16", "avx512f", "avx512bw", "avx512_vnni", "avx512_vbmi",
             "avx512_bf16")),
    ("avx512_bf16", ("avx512f", "avx512bw", "avx512_vnni", "avx512_vbmi", "avx512_bf16")),
    ("avx512_vbmi", ("avx512f", "avx512bw", "avx512_vnni", "avx512_vbmi")),
    ("avx512_vnni", ("avx512f", "avx512bw", "avx512_vnni")),
    ("avx512_base", ("avx512f", "avx512bw")),
    ("avx2", ("avx2",)),
)  # fmt: skip
KT_SFT_VARIANTS = ("amx", "avx512_bf16")


@dataclass
class GpuInfo:
    name: str
    memory_bytes: int


@dataclass
class PinCheck:
    owner: str
    owner_version: str | None  # None: owner not installed, pin taken from KNOWN_PINS
    requirement: str
    installed: str | None
    ok: bool


@dataclass
class HostReport:
    cpu_model: str
    flags: dict[str, bool]
    kt_variant: str | None  # the kt-kernel CPU build this host would load
    logical_cpus: int
    physical_cores: int | None
    numa_nodes: int
    ram_total: int
    ram_available: int
    disk_path: str
    disk_free: int
    gpus: list[GpuInfo]
    nvidia_smi: str | None
    glibc: str | None
    python: str
    torch: str | None
    torch_cuda: str | None
    packages: dict[str, str | None]
    pins: list[PinCheck] = field(default_factory=list)
    kt_probe: dict[str, Any] | None = None  # what an installed kt_kernel reports about itself
    executable: str = ""  # the training environment's interpreter (packages, GPUs: as it sees them)
    ktflow: bool = True  # whether that interpreter can import ktflow (its launcher runs there)


@dataclass
class Problem:
    backend: str
    severity: str  # "error": cannot run; "warning": runs, but read this
    message: str


def has_flag(flags: frozenset[str], flag: str) -> bool:
    # The kernel spells some AVX512 flags without the underscore (avx512vbmi).
    return flag in flags or flag.replace("_", "") in flags


def kt_variant(flags: frozenset[str]) -> str | None:
    return next((name for name, need in KT_VARIANTS if all(has_flag(flags, f) for f in need)), None)


@dataclass(frozen=True)
class _Backend:
    label: str
    packages: tuple[str, ...]  # must be installed ("llamafactory": upstream or the KT fork)
    pin_owners: tuple[str, ...]  # whose pins on torch/transformers/... must hold
    gpu: str | None  # why a CUDA GPU is required; None: optional


_KT_GPU = "KT trains the non-expert layers on a GPU"
_BACKENDS = {
    "hf": _Backend("HF", ("torch", "transformers", "peft", "trl", "llamafactory"), ("llamafactory",), None),
    # LLaMA-Factory >= 0.9.5 checks kt-kernel, transformers-kt and accelerate-kt when use_kt is set.
    "kt": _Backend("KT", ("torch", "llamafactory", "kt-kernel", "transformers-kt", "accelerate-kt"),
                   ("llamafactory", "llamafactory-kt", "kt-kernel"), _KT_GPU),
    "kt-legacy": _Backend("KT (legacy)", ("torch", "llamafactory", "ktransformers"),
                          ("llamafactory", "ktransformers"), _KT_GPU),
    "unsloth": _Backend("Unsloth", ("torch", "unsloth", "llamafactory"), ("unsloth", "llamafactory"),
                        "Unsloth trains on a GPU"),
}  # fmt: skip
# kt-kernel's CPU extension links no libtorch, so its torch pin is advisory (upstream.md).
_ADVISORY_PINS = ("kt-kernel", "accelerate-kt")


def _lf(host: HostReport) -> Version | None:
    installed = lf_version(host.packages)
    try:
        return Version(installed) if installed else None
    except InvalidVersion:
        return None


def _kt_cpu_problems(host: HostReport) -> list[Problem]:
    variant = host.kt_variant
    if variant not in KT_SFT_VARIANTS:
        lacking = ", ".join(f for f in KT_VARIANTS[1][1] if not host.flags.get(f))
        return [Problem("kt", "error", (
            f"CPU lacks AMX/AVX512-BF16 ({lacking} missing; kt-kernel would load its {variant or 'no'} "
            "build, which has no SFT kernels): KT LoRA needs avx512f+avx512bw+avx512_vnni+avx512_vbmi+"
            "avx512_bf16 at least, and AMX (amx_tile/amx_bf16/amx_int8) for the AMX BF16/INT8 kernels"
        ))]  # fmt: skip
    problems = []
    if variant != "amx":
        message = "no AMX: kt-kernel runs its AVX512-BF16 SFT kernels (slower than the AMX ones in the paper)"
        problems.append(Problem("kt", "warning", message))
    probe = host.kt_probe or {}
    if probe.get("error"):
        problems.append(Problem("kt", "error", str(probe["error"])))
    elif probe and not probe.get("sft"):
        problems.append(
            Problem("kt", "error", f"the installed kt_kernel ({probe.get('variant')}) has no SFT kernels")
        )
    lf = _lf(host)
    if lf is not None and lf < LEGACY_BELOW:
        problems.append(Problem("kt", "error", (
            f"llamafactory {lf} predates the current KT keys (use_kt + kt_config need >= 0.9.5): "
            "install ktransformers[sft], or set training.kt.generation: legacy"
        )))  # fmt: skip
    return problems


def _kt_legacy_problems(host: HostReport) -> list[Problem]:
    problems = []
    if not all(host.flags.get(f) for f in (*cpuinfo.AMX_FLAGS, *cpuinfo.AVX512_FLAGS)):
        problems.append(Problem("kt-legacy", "error", (
            "CPU lacks AMX: the legacy KT SFT rules (<Model>-sft-amx.yaml) run AMX kernels "
            "(amx_tile/amx_bf16/amx_int8 with avx512f/avx512bw)"
        )))  # fmt: skip
    lf = _lf(host)
    if lf is not None and lf >= LEGACY_BELOW:
        problems.append(Problem("kt-legacy", "error", (
            f"llamafactory {lf} rejects the legacy KT keys (use_kt + kt_optimize_rule need 0.9.4); "
            "use training.kt.generation: current (or auto)"
        )))  # fmt: skip
    return problems


def _installed(host: HostReport, name: str) -> bool:
    return bool(lf_version(host.packages) if name == "llamafactory" else host.packages.get(name))


def check_backend(host: HostReport, backend: str, requirements: Requirements | None) -> list[Problem]:
    """What stops (errors) or hampers (warnings) ``backend`` training this model on this host."""
    if backend not in _BACKENDS:
        raise KtflowInputError(None, "backend", f"unknown backend {backend!r} (one of {', '.join(BACKENDS)})")
    spec = _BACKENDS[backend]
    where = f" in {host.executable}" if host.executable else ""
    missing = [name for name in spec.packages if not _installed(host, name)]
    problems = [Problem(backend, "error", f"{name} is not installed{where}") for name in missing]
    if not host.ktflow:
        message = f"ktflow is not importable by {host.executable} (pip install --no-deps -e <ktflow repo>)"
        problems.append(Problem(backend, "error", message))
    for pin in host.pins:
        if pin.owner in spec.pin_owners and pin.owner_version and not pin.ok:
            # DISABLE_VERSION_CHECK=1 is LLaMA-Factory's own switch for the same pins.
            advisory = pin.owner in _ADVISORY_PINS or os.environ.get("DISABLE_VERSION_CHECK") in ("1", "true")
            severity = "warning" if advisory else "error"
            message = (
                f"{pin.owner} {pin.owner_version} wants {pin.requirement}, installed {pin.installed or '-'}"
            )
            problems.append(Problem(backend, severity, message))
    if backend == "kt":
        problems += _kt_cpu_problems(host)
    elif backend == "kt-legacy":
        problems += _kt_legacy_problems(host)
    if not host.gpus:
        if spec.gpu:
            problems.append(Problem(backend, "error", f"no CUDA GPU visible to torch{where} ({spec.gpu})"))
        else:
            problems.append(
                Problem(backend, "warning", "no CUDA GPU: training runs on the CPU (tiny models only)")
            )
    if requirements is not None:
        problems += _memory_problems(host, backend, requirements)
    return problems


def _memory_problems(host: HostReport, backend: str, req: Requirements) -> list[Problem]:
    problems: list[Problem] = []

    def need(have: int, want: int, what: str, severity: str = "error") -> None:
        if want > have:
            message = f"{req.model_type}: {what} {gib(want)} needed, {gib(have)} here"
            problems.append(Problem(backend, severity, message))

    need(host.disk_free, req.bf16_disk_bytes, f"disk at {host.disk_path} for the BF16 cast:")
    per_gpu = max((g.memory_bytes for g in host.gpus), default=0)
    if backend in ("kt", "kt-legacy"):
        need(host.ram_available, req.kt_train_host_bytes, "host RAM (routed experts, BF16):")
        if host.gpus:
            need(sum(g.memory_bytes for g in host.gpus), req.kt_train_gpu_bytes, "GPU memory (all GPUs):")
    elif backend == "unsloth" and host.gpus:
        # Unsloth can load 4-bit weights and need less than this BF16 figure: a warning only.
        need(per_gpu, req.hf_train_bytes, "GPU memory for BF16 LoRA (per GPU):", "warning")
    elif backend == "hf":
        if host.gpus:
            need(per_gpu, req.hf_train_bytes, "GPU memory (per GPU):")
        else:
            need(host.ram_available, req.hf_train_bytes, "host RAM for CPU training:")
    return problems


def verdict(backend: str, problems: list[Problem]) -> str:
    label = _BACKENDS[backend].label
    errors = [p.message for p in problems if p.severity == "error"]
    warnings = sum(p.severity == "warning" for p in problems)
    if errors:
        return f"{label} backend: cannot run here: " + "; ".join(errors)
    return f"{label} backend: can run here" + (f" ({warnings} warning(s))" if warnings else "")
