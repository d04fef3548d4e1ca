"""``kt``: KTransformers experts on the CPU, in whichever YAML generation the environment has.

One ktflow ``training.kt`` block maps to either generation (``num_threads`` is
``kt_config.kt_num_threads`` in one and ``cpu_infer`` in the other):

- ``current`` (this file): kt-kernel >= 0.6.1 with LLaMA-Factory >= 0.9.5 (upstream 0.9.5 plus
  transformers-kt / accelerate-kt, or llamafactory-kt 0.9.6.dev0 from ``ktransformers[sft]``).
  Top-level ``use_kt`` and ``kt_*`` model arguments, a ``kt_config`` mapping of kt-kernel's
  ``KTConfig`` fields, launched with ``accelerate launch`` and an FSDP2 accelerate config.
- ``legacy`` (:mod:`ktflow.train.backends.kt_legacy`, also the ``kt-legacy`` backend).

``generation: auto`` (the default) picks by the LLaMA-Factory version installed in the
training environment; ``current`` or ``legacy`` forces one; the ``kt-legacy`` backend forces legacy.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from packaging.version import InvalidVersion, Version

from ktflow.errors import KtflowInputError
from ktflow.estimate import Requirements
from ktflow.host.kt_kernel import KT_VARIANTS
from ktflow.host.packages import lf_version
from ktflow.host.python_env import EnvReport
from ktflow.host.report import HostReport
from ktflow.train.backends.base import LAUNCH, Problem, TrainingBackend, shortfall

if TYPE_CHECKING:
    from ktflow.train.spec import TrainSpec

LEGACY_BELOW = Version("0.9.5")
# ktflow key -> the kt_-prefixed LLaMA-Factory model argument (current generation).
MODEL_KEYS = (
    "weight_path",
    "expert_checkpoint_path",
    "non_expert_weight_path",  # llamafactory-kt only
    "cpu_activation",  # llamafactory-kt only
    "use_lora_experts",
    "lora_expert_num",
    "lora_expert_intermediate_size",
)
# ktflow key -> kt_config.kt_<key>: the user-settable KTConfig fields of kt-kernel 0.7.2
# (kt_kernel/sft/config.py) that LLaMA-Factory does not derive from its own arguments.
CONFIG_KEYS = (
    "backend",
    "num_threads",
    "tp_enabled",
    "threadpool_count",
    "expert_weight_format",
    "weight_lifecycle",
    "num_gpu_experts",
    "share_backward_bb",
    "force_fused_expert_lora",
    "max_cache_depth",
    "model_max_length",
)
LEGACY_KEYS = ("optimize_rule", "cpu_infer", "chunk_size")
OWN_KEYS = ("generation", "accelerate_config", "gpus")
KNOWN_KEYS = frozenset((*MODEL_KEYS, *CONFIG_KEYS, *LEGACY_KEYS, *OWN_KEYS))
# Only kt-kernel's amx and avx512_bf16 CPU builds export the *_SFT_MOE classes LoRA training
# needs (checked in the wheel's extensions); avx512_bf16 runs them without AMX tiles, slower.
KT_SFT_VARIANTS = ("amx", "avx512_bf16")
SFT_FLOOR = dict(KT_VARIANTS)["avx512_bf16"]
KT_GPU = "KT trains the non-expert layers on a GPU"


def resolve_generation(requested: str | None, packages: dict[str, str | None]) -> str:
    if requested in ("current", "legacy"):
        return requested
    if requested not in (None, "auto"):
        raise KtflowInputError(
            "config", "training.kt.generation", f"{requested!r}: use auto, current or legacy"
        )
    installed = lf_version(packages)
    return "legacy" if installed and Version(installed) < LEGACY_BELOW else "current"


def installed_lf(host: HostReport) -> Version | None:
    installed = lf_version(host.packages)
    try:
        return Version(installed) if installed else None
    except InvalidVersion:
        return None


def check_keys(kt: dict[str, Any]) -> None:
    unknown = sorted(set(kt) - KNOWN_KEYS)
    if unknown:
        raise KtflowInputError(
            "config",
            f"training.kt.{unknown[0]}",
            f"unknown KT setting (known: {', '.join(sorted(KNOWN_KEYS))}); "
            "put raw LLaMA-Factory keys under training.llamafactory_args",
        )


def accelerate_config(processes: int) -> dict[str, Any]:
    """FSDP2 for KT, as upstream's examples/ktransformers/accelerate/fsdp2_kt_*.yaml: the
    accelerate file holds FSDP settings only, every KT setting lives in the training YAML."""
    return {
        "compute_environment": "LOCAL_MACHINE",
        "distributed_type": "FSDP",
        "fsdp_config": {
            "fsdp_version": 2,
            "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
            "fsdp_cpu_ram_efficient_loading": True,
            "fsdp_offload_params": False,
            "fsdp_reshard_after_forward": True,
            "fsdp_state_dict_type": "FULL_STATE_DICT",
        },
        "mixed_precision": "bf16",
        "num_machines": 1,
        "num_processes": processes,
        "rdzv_backend": "static",
        "same_network": True,
        "use_cpu": False,
    }


class KTBackend(TrainingBackend):
    """The public methods pick the generation; the ``generation_*`` ones are one generation's."""

    name = "kt"
    title = "KT"
    conda_env = "kt"
    # LLaMA-Factory >= 0.9.5 checks kt-kernel, transformers-kt and accelerate-kt when use_kt is set.
    packages: ClassVar[tuple[str, ...]] = (
        "torch",
        "llamafactory",
        "kt-kernel",
        "transformers-kt",
        "accelerate-kt",
    )
    pin_owners: ClassVar[tuple[str, ...]] = ("llamafactory", "llamafactory-kt", "kt-kernel")
    gpu_reason = KT_GPU
    kt_architectures_only = True
    generation: ClassVar[str] = "current"
    forced_generation: ClassVar[str | None] = None  # None: training.kt.generation decides
    # Each KT backend by its config name and by its generation (subclasses add themselves).
    by_name: ClassVar[dict[str, type[KTBackend]]] = {}
    by_generation: ClassVar[dict[str, type[KTBackend]]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        KTBackend.by_name[cls.name] = KTBackend.by_generation[cls.generation] = cls

    # ---- which generation
    def _generation_of(self, backend: str, kt: dict[str, Any], packages: dict[str, str | None]) -> KTBackend:
        forced = KTBackend.by_name.get(backend, type(self)).forced_generation
        return KTBackend.by_generation[resolve_generation(forced or kt.get("generation"), packages)]()

    def for_env(self, spec: TrainSpec, env: EnvReport) -> KTBackend:
        """The KT backend of the generation ``spec`` gets in ``env`` (its backend may force one)."""
        return self._generation_of(spec.backend, spec.kt, env.packages)

    def checked_as(self, kt: dict[str, Any], packages: dict[str, str | None]) -> str:
        return self._generation_of(self.name, kt, packages).name

    def label(self, spec: TrainSpec, env: EnvReport) -> str:
        return self.for_env(spec, env).name

    def env_name(self, kt: dict[str, Any]) -> str:
        # The environment is chosen before anything is installed: only a forced generation counts.
        forced = self.forced_generation or kt.get("generation")
        return KTBackend.by_generation["legacy" if forced == "legacy" else "current"].conda_env

    # ---- the TrainingBackend interface, delegating to the generation
    def base_args(self, spec: TrainSpec, env: EnvReport) -> dict[str, Any]:
        check_keys(spec.kt)
        return self.for_env(spec, env).generation_args(spec, spec.llamafactory_yaml())

    def command(self, spec: TrainSpec, env: EnvReport, yaml_path: Path) -> list[str]:
        accelerate_yaml = Path(spec.kt.get("accelerate_config") or yaml_path.parent / "accelerate_kt.yaml")
        return self.for_env(spec, env).generation_command(env.executable, yaml_path, accelerate_yaml)

    def extra_files(self, spec: TrainSpec, env: EnvReport) -> dict[str, dict[str, Any]]:
        return self.for_env(spec, env).generation_files(spec, env)

    def environment(self, spec: TrainSpec, env: EnvReport) -> dict[str, str]:
        variables = self.for_env(spec, env).generation_environment()
        if spec.kt.get("num_threads"):
            # kt-kernel sizes its CPU tensor pool from this (kt_kernel.sft.config.configure_omp_threads).
            variables["ACCELERATE_KT_OMP_NUM_THREADS"] = str(spec.kt["num_threads"])
        return variables

    # ---- the current generation
    def generation_args(self, spec: TrainSpec, args: dict[str, Any]) -> dict[str, Any]:
        """``args`` (the backend-independent YAML) with this generation's KT keys."""
        kt = spec.kt
        args = {**args, "use_kt": True, "bf16": True}
        args.update({f"kt_{key}": kt[key] for key in MODEL_KEYS if kt.get(key) is not None})
        if "kt_weight_path" not in args and "kt_expert_checkpoint_path" not in args:
            # Online conversion from the BF16 checkpoint when no pre-converted weights are named.
            args["kt_expert_checkpoint_path"] = str(spec.model_dir)
        config = {f"kt_{key}": kt[key] for key in CONFIG_KEYS if kt.get(key) is not None}
        if config:
            args["kt_config"] = config
        return args

    def generation_command(self, python: str, yaml_path: Path, accelerate_yaml: Path) -> list[str]:
        launch = [python, "-m", "accelerate.commands.launch", "--config_file", str(accelerate_yaml)]
        return [*launch, *LAUNCH, str(yaml_path)]

    def generation_files(self, spec: TrainSpec, env: EnvReport) -> dict[str, dict[str, Any]]:
        if spec.kt.get("accelerate_config"):
            return {}
        return {"accelerate_kt.yaml": accelerate_config(self.gpu_processes(spec, env))}

    def generation_environment(self) -> dict[str, str]:
        return {"ACCELERATE_USE_KT": "true", "USE_KT": "1"}

    def gpu_processes(self, spec: TrainSpec, env: EnvReport) -> int:
        return int(spec.kt.get("gpus") or len(env.gpus) or 1)

    # ---- what the host must have
    def host_problems(self, host: HostReport) -> list[Problem]:
        variant = host.kt_variant
        if variant not in KT_SFT_VARIANTS:
            lacking = ", ".join(f for f in SFT_FLOOR if not host.flags.get(f))
            return [Problem(self.name, "error", (
                f"CPU lacks AMX/AVX512-BF16 ({lacking} missing; kt-kernel would load its {variant or 'no'} "
                "build, which has no SFT kernels): KT LoRA needs avx512f+avx512bw+avx512_vnni+avx512_vbmi+"
                "avx512_bf16 at least, and AMX (amx_tile/amx_bf16/amx_int8) for the AMX BF16/INT8 kernels"
            ))]  # fmt: skip
        problems = []
        if variant != "amx":
            message = (
                "no AMX: kt-kernel runs its AVX512-BF16 SFT kernels (slower than the AMX ones in the paper)"
            )
            problems.append(Problem(self.name, "warning", message))
        probe = host.kt_probe or {}
        if probe.get("error"):
            problems.append(Problem(self.name, "error", str(probe["error"])))
        elif probe and not probe.get("sft"):
            message = f"the installed kt_kernel ({probe.get('variant')}) has no SFT kernels"
            problems.append(Problem(self.name, "error", message))
        lf = installed_lf(host)
        if lf is not None and lf < LEGACY_BELOW:
            problems.append(Problem(self.name, "error", (
                f"llamafactory {lf} predates the current KT keys (use_kt + kt_config need >= 0.9.5): "
                "install ktransformers[sft], or set training.kt.generation: legacy"
            )))  # fmt: skip
        return problems

    def memory_problems(self, host: HostReport, req: Requirements) -> list[Problem]:
        what = "host RAM (routed experts, BF16):"
        problems = shortfall(self.name, req, host.ram_available, req.kt_train_host_bytes, what)
        if host.gpus:
            total = sum(g.memory_bytes for g in host.gpus)
            problems += shortfall(self.name, req, total, req.kt_train_gpu_bytes, "GPU memory (all GPUs):")
        return problems


KTBackend.by_name[KTBackend.name] = KTBackend.by_generation[KTBackend.generation] = KTBackend
