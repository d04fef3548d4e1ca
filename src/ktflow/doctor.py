"""``ktflow doctor``: preflight before any expensive step (host, versions, memory estimates, verdicts).

It answers, per training backend (hf, kt, kt-legacy, unsloth), "can this run here?",
from what the host has (CPU ISA, NUMA, RAM, disk) and what the *training
environment* has (package versions and their pins, torch and the GPUs it sees,
kt_kernel's CPU build), and what the model needs (estimated from its config.json:
:mod:`ktflow.estimate`). The training environment is this interpreter unless
``--python`` or the config's ``training.python`` names another (a venv per backend).

The pipeline runs it as the ``doctor`` rule before training with a GPU backend
(``workflow/rules/doctor.smk``), and ``ktflow train`` runs the same checks before it
starts LLaMA-Factory, so a run that cannot work stops first, saying what to fix.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ktflow import cpuinfo
from ktflow.atomic import write_json
from ktflow.errors import HardwareError, KtflowInputError
from ktflow.estimate import (
    GiB,
    Requirements,
    describe,
    estimate_requirements,
    gib,
    model_config_paths,
    read_model_config,
)
from ktflow.provenance import recorded
from ktflow.train.env import EnvReport, inspect_env, python_for, resolve_python
from ktflow.train.kt import resolve_generation
from ktflow.train.needs import (
    BACKENDS,
    KT_FLAGS,
    GpuInfo,
    HostReport,
    PinCheck,
    Problem,
    check_backend,
    has_flag,
    kt_variant,
    verdict,
)

__all__ = ["GiB", "GpuInfo", "HostReport", "check_backend", "collect_host", "estimate_requirements",
           "kt_variant", "verdict"]  # fmt: skip

PACKAGES = ("torch", "transformers", "peft", "trl", "accelerate", "datasets", "llamafactory",
            "llamafactory-kt", "transformers-kt", "accelerate-kt", "kt-kernel", "ktransformers", "sglang",
            "sglang-kt", "unsloth", "bitsandbytes")  # fmt: skip
PINNED = ("torch", "transformers", "peft", "trl", "accelerate", "datasets")
# The integration packages whose pins on PINNED decide whether a backend starts at all.
PIN_OWNERS = ("llamafactory", "llamafactory-kt", "kt-kernel", "ktransformers", "sglang-kt", "accelerate-kt",
              "sglang", "unsloth")  # fmt: skip
# Pins of distributions that are usually absent here (docs: upstream.md, "Packages on the registry").
# Installed distributions are checked against their own metadata instead.
KNOWN_PINS: dict[str, tuple[str, tuple[str, ...]]] = {
    "llamafactory": ("0.9.5", ("transformers>=4.55.0,<=5.6.0", "peft>=0.18.0,<=0.18.1",
                               "trl>=0.18.0,<=0.24.0", "accelerate>=1.3.0,<=1.11.0")),
    "kt-kernel": ("0.7.2", ("torch==2.9.1",)),
    "sglang-kt": ("0.7.2", ("torch==2.9.1",)),
    "accelerate-kt": ("0.7.2", ("torch==2.9.1",)),
    "sglang": ("0.5.23", ("torch==2.14.1",)),
}  # fmt: skip


# ---------------------------------------------------------------- host
def _numa_nodes() -> int:
    nodes = Path("/sys/devices/system/node")
    return max(1, sum(1 for p in nodes.glob("node[0-9]*"))) if nodes.is_dir() else 1


def _disk(path: Path) -> tuple[str, int]:
    probe = path.absolute()
    while not probe.exists():  # the results dir may not exist yet: measure where it will be
        probe = probe.parent
    return str(probe), shutil.disk_usage(probe).free


def _run(command: list[str], timeout: float = 30) -> str | None:
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def _kt_probe(python: str) -> dict[str, Any]:
    """Import kt_kernel in a child process (a wrong CPU build can kill its importer) and ask it."""
    code = (
        "import json, kt_kernel; ext = kt_kernel.kt_kernel_ext; moe = getattr(ext, 'moe', None)\n"
        "print(json.dumps({'variant': getattr(kt_kernel, '__cpu_variant__', None),"
        " 'sft': hasattr(moe, 'AMXBF16_SFT_MOE')}))"
    )
    output = _run([python, "-c", code], timeout=120)
    if output is None:
        return {"error": f"`import kt_kernel` failed in {python}"}
    parsed: dict[str, Any] = json.loads(output.splitlines()[-1])
    return parsed


def _pins(env: EnvReport) -> list[PinCheck]:
    from packaging.markers import default_environment
    from packaging.requirements import Requirement

    environment = {key: str(value) for key, value in default_environment().items()} | {"extra": ""}
    checks = []
    for owner in PIN_OWNERS:
        if env.packages.get(owner):
            raw = env.requires.get(owner) or []
        elif owner in KNOWN_PINS:
            raw = list(KNOWN_PINS[owner][1])
        else:
            continue
        for requirement in map(Requirement, raw):
            if requirement.name not in PINNED or (
                requirement.marker and not requirement.marker.evaluate(environment)
            ):
                continue
            installed = env.packages.get(requirement.name)
            ok = installed is not None and requirement.specifier.contains(installed, prereleases=True)
            checks.append(PinCheck(owner, env.packages.get(owner), str(requirement), installed, ok))
    return checks


def collect_host(results_dir: Path = Path("results"), env: EnvReport | None = None) -> HostReport:
    """This machine, and the training environment ``env`` (default: this interpreter's)."""
    import psutil

    env = env or inspect_env(None, PACKAGES)
    flags = cpuinfo.cpu_flags()
    memory = psutil.virtual_memory()
    disk_path, disk_free = _disk(results_dir)
    smi = _run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"])
    # "glibc 2.36" where the C library is glibc
    glibc = os.confstr("CS_GNU_LIBC_VERSION") if "CS_GNU_LIBC_VERSION" in os.confstr_names else None
    return HostReport(
        cpu_model=cpuinfo.cpu_model(),
        flags={flag: has_flag(flags, flag) for flag in KT_FLAGS},
        kt_variant=kt_variant(flags),
        logical_cpus=os.cpu_count() or 1,
        physical_cores=psutil.cpu_count(logical=False),
        numa_nodes=_numa_nodes(),
        ram_total=int(memory.total),
        ram_available=int(memory.available),
        disk_path=disk_path,
        disk_free=disk_free,
        gpus=[GpuInfo(name, size) for name, size in env.gpus],
        nvidia_smi=smi,
        glibc=glibc.split()[-1] if glibc else platform.libc_ver()[1] or None,
        python=env.python,
        torch=env.torch,
        torch_cuda=env.torch_cuda,
        packages=env.packages,
        pins=_pins(env),
        kt_probe=_kt_probe(env.executable) if env.packages.get("kt-kernel") else None,
        executable=env.executable,
        ktflow=env.ktflow,
    )


# ---------------------------------------------------------------- report and CLI
def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


def render(host: HostReport, models: dict[str, Requirements], verdicts: dict[str, list[Problem]]) -> str:
    gpus = ", ".join(f"{g.name} ({gib(g.memory_bytes)})" for g in host.gpus) or "none"
    pkgs = ", ".join(f"{name} {version or '-'}" for name, version in host.packages.items())
    lines = [
        f"CPU       {host.cpu_model}: {host.logical_cpus} logical CPUs, {host.physical_cores} cores, "
        f"{host.numa_nodes} NUMA node(s)",
        "ISA       " + ", ".join(f"{flag} {_yes(on)}" for flag, on in host.flags.items()),
        f"          kt-kernel CPU build for this host: {host.kt_variant or 'none'}"
        + (f"; installed kt_kernel reports {host.kt_probe}" if host.kt_probe else ""),
        f"Memory    {gib(host.ram_total)} total, {gib(host.ram_available)} available",
        f"Disk      {gib(host.disk_free)} free at {host.disk_path}",
        f"GPUs      {gpus} (torch {host.torch or '-'}, CUDA {host.torch_cuda or '-'}; "
        f"nvidia-smi: {host.nvidia_smi or 'absent'})",
        f"System    glibc {host.glibc or '-'}, Python {host.python} ({host.executable})",
        f"Packages  {pkgs}",
    ]
    for pin in host.pins:
        owner = f"{pin.owner} {pin.owner_version or KNOWN_PINS[pin.owner][0] + ' (not installed)'}"
        state = "ok" if pin.ok else ("CONFLICT" if pin.owner_version else "would conflict")
        lines.append(f"Pin       {owner} wants {pin.requirement}: installed {pin.installed or '-'}, {state}")
    for name, requirements in models.items():
        lines += describe(name, requirements)
    for backend, problems in verdicts.items():
        lines.append(verdict(backend, problems))
        lines += [f"  {p.severity}: {p.message}" for p in problems if p.severity == "warning"]
    return "\n".join(lines)


def _load_yaml(path: Path) -> dict[str, Any]:
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as error:
        raise KtflowInputError(path, None, f"cannot read the workflow config ({error})") from None
    if not isinstance(data, dict):
        raise KtflowInputError(path, None, "the workflow config must be a mapping")
    return data


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="workflow config (results dir, models, training)")
    parser.add_argument(
        "--training", metavar="JSON", help="a training block as the pipeline passes it; wins over --config"
    )
    parser.add_argument(
        "--model-config", type=Path, action="append", default=[], metavar="PATH",
        help="a model's config.json (or its directory) to estimate; repeatable",
    )  # fmt: skip
    parser.add_argument("--backend", choices=BACKENDS, help="fail (exit 3) unless this backend can run here")
    parser.add_argument(
        "--python", help="training environment: interpreter or venv (default: training.python, else this one)"
    )
    parser.add_argument("--results-dir", type=Path, help="where outputs go (disk check; default: results)")
    parser.add_argument("--lora-rank", type=int, help="LoRA rank for the estimates (default 8 / config)")
    parser.add_argument(
        "--seq-len", type=int, help="tokens per sequence for estimates (default 512 / config)"
    )
    parser.add_argument("--json", type=Path, metavar="OUT.json", help="also write the report as JSON")


def _training(args: argparse.Namespace, config: dict[str, Any]) -> dict[str, Any]:
    if args.training is None:
        return dict(config.get("training") or {})
    try:
        training = json.loads(args.training)
    except json.JSONDecodeError as error:
        raise KtflowInputError("--training", None, f"invalid JSON ({error.msg})") from None
    if not isinstance(training, dict):
        raise KtflowInputError("--training", None, "expected a JSON object")
    return training


def main(args: argparse.Namespace) -> int:
    config = _load_yaml(args.config) if args.config else {}
    training = _training(args, config)
    requested = args.backend or training.get("backend")
    if requested not in (None, *BACKENDS):
        raise KtflowInputError(args.config, "training.backend", f"unknown backend {requested!r}")
    python = resolve_python(args.python, "--python") if args.python else None
    python = python or python_for(training.get("python"), requested or "hf")
    results = args.results_dir or Path(config.get("results") or "results")
    sources = model_config_paths(config, results)
    sources.update({str(p): p for p in args.model_config})
    settings = {
        "lora_rank": args.lora_rank or (training.get("lora") or {}).get("rank") or 8,
        "seq_len": args.seq_len or training.get("cutoff_len") or 512,
        "batch_size": training.get("batch_size") or 1,
        "hf_weight_bytes": 4 if training.get("bf16") is False else 2,
    }
    models = {
        name: estimate_requirements(read_model_config(path), source=path, **settings)
        for name, path in sources.items()
    }
    host = collect_host(results, inspect_env(python, PACKAGES))
    if requested == "kt":  # the generation the training environment has decides which checks apply
        generation = resolve_generation((training.get("kt") or {}).get("generation"), host.packages)
        requested = "kt-legacy" if generation == "legacy" else "kt"
    targets: list[Requirements | None] = [*models.values()] or [None]
    verdicts = {b: [p for r in targets for p in check_backend(host, b, r)] for b in BACKENDS}
    print(render(host, models, verdicts))
    if args.json:
        report = {
            "host": asdict(host),
            "models": {name: asdict(r) for name, r in models.items()},
            "backends": {b: {"ok": not any(p.severity == "error" for p in ps), "verdict": verdict(b, ps),
                             "problems": [asdict(p) for p in ps]} for b, ps in verdicts.items()},
            "requested": requested,
        }  # fmt: skip
        inputs: list[str | Path] = [p for p in sources.values() if p.is_file()]
        with recorded(f"{args.json}.provenance.json", "doctor", {"backend": requested, **settings}, inputs):
            write_json(args.json, report)
    if requested and any(p.severity == "error" for p in verdicts[requested]):
        raise HardwareError(verdict(requested, verdicts[requested]))
    return 0
