"""What ``ktflow doctor`` reports: the host, the models' estimated needs, a verdict per backend.

It answers, per training backend (hf, kt, kt-legacy, unsloth), "can this run here?",
from what the host has (CPU ISA, NUMA, RAM, disk) and what the *training
environment* has (package versions and their pins, torch and the GPUs it sees,
kt_kernel's CPU build), and what the model needs (estimated from its config.json:
:mod:`ktflow.estimate`). The training environment is this interpreter unless
``--python`` or the config's ``training.python`` names another (a venv per backend).

The pipeline runs it as the ``doctor`` rule before training with a GPU backend
(``workflow/rules/doctor.smk``), and ``ktflow train`` runs the same checks
(:mod:`ktflow.train.preflight`) before it starts LLaMA-Factory, so a run that cannot
work stops first, saying what to fix.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

from ktflow.atomic import write_json
from ktflow.errors import HardwareError, KtflowInputError
from ktflow.estimate import (
    Requirements,
    describe,
    estimate_requirements,
    gib,
    model_config_paths,
    read_model_config,
)
from ktflow.host.packages import KNOWN_PINS, PACKAGES
from ktflow.host.python_env import inspect_env, resolve_python
from ktflow.host.report import HostReport, collect_host
from ktflow.provenance import recorded
from ktflow.train.backends import BACKENDS, backend_for
from ktflow.train.backends.base import Problem
from ktflow.train.interpreter import python_for
from ktflow.train.preflight import check_backend, verdict
from ktflow.train.spec import training_block


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


def load_workflow_config(path: Path) -> dict[str, Any]:
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as error:
        raise KtflowInputError(path, None, f"cannot read the workflow config ({error})") from None
    if not isinstance(data, dict):
        raise KtflowInputError(path, None, "the workflow config must be a mapping")
    return data


def doctor(
    config_path: Path | None,
    training_json: str | None,
    *,
    backend: str | None = None,
    python: str | None = None,
    results_dir: Path | None = None,
    model_configs: list[Path] | None = None,
    lora_rank: int | None = None,
    seq_len: int | None = None,
    json_out: Path | None = None,
) -> int:
    """Print the report; HardwareError if ``backend`` (or the config's) cannot run here.

    ``training_json`` (the training block as the pipeline passes it) wins over the config's.
    """
    config = load_workflow_config(config_path) if config_path else {}
    training = (
        dict(config.get("training") or {})
        if training_json is None
        else training_block(training_json, "--training")
    )
    requested = backend or training.get("backend")
    if requested not in (None, *BACKENDS):
        raise KtflowInputError(config_path, "training.backend", f"unknown backend {requested!r}")
    interpreter = resolve_python(python, "--python") if python else None
    interpreter = interpreter or python_for(training.get("python"), requested or "hf")
    results = results_dir or Path(config.get("results") or "results")
    sources = model_config_paths(config, results)
    sources.update({str(p): p for p in model_configs or []})
    settings = {
        "lora_rank": lora_rank or (training.get("lora") or {}).get("rank") or 8,
        "seq_len": seq_len or training.get("cutoff_len") or 512,
        "batch_size": training.get("batch_size") or 1,
        "hf_weight_bytes": 4 if training.get("bf16") is False else 2,
    }
    models = {
        name: estimate_requirements(read_model_config(path), source=path, **settings)
        for name, path in sources.items()
    }
    host = collect_host(results, inspect_env(interpreter, PACKAGES))
    if requested:  # the generation the training environment has decides which checks apply (kt)
        requested = backend_for(requested).checked_as(training.get("kt") or {}, host.packages)
    targets: list[Requirements | None] = [*models.values()] or [None]
    verdicts = {b: [p for r in targets for p in check_backend(host, b, r)] for b in BACKENDS}
    print(render(host, models, verdicts))
    if json_out:
        report = {
            "host": asdict(host),
            "models": {name: asdict(r) for name, r in models.items()},
            "backends": {b: {"ok": not any(p.severity == "error" for p in ps), "verdict": verdict(b, ps),
                             "problems": [asdict(p) for p in ps]} for b, ps in verdicts.items()},
            "requested": requested,
        }  # fmt: skip
        inputs: list[str | Path] = [p for p in sources.values() if p.is_file()]
        with recorded(f"{json_out}.provenance.json", "doctor", {"backend": requested, **settings}, inputs):
            write_json(json_out, report)
    if requested and any(p.severity == "error" for p in verdicts[requested]):
        raise HardwareError(verdict(requested, verdicts[requested]))
    return 0
