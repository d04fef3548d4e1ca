"""Can a training backend run on this host? The checks ``ktflow doctor`` and ``ktflow train`` share.

:func:`check_backend` lists what stops (errors) or hampers (warnings) one backend on a
:class:`~ktflow.host.report.HostReport`, optionally for one model's estimated needs. The
checks every backend shares are here; each backend's own are in its file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from pathlib import Path

from ktflow.errors import HardwareError, KtflowInputError
from ktflow.estimate import Requirements, estimate_requirements, read_model_config
from ktflow.host.packages import lf_version
from ktflow.host.python_env import EnvReport
from ktflow.host.report import HostReport, collect_host
from ktflow.train.backends import BACKENDS, backend_for
from ktflow.train.backends.base import Problem, shortfall
from ktflow.train.spec import TrainSpec

# kt-kernel's CPU extension links no libtorch, so its torch pin is advisory (upstream.md).
ADVISORY_PINS = ("kt-kernel", "accelerate-kt")


def _installed(host: HostReport, name: str) -> bool:
    return bool(lf_version(host.packages) if name == "llamafactory" else host.packages.get(name))


def check_backend(host: HostReport, backend: str, requirements: Requirements | None) -> list[Problem]:
    """What stops (errors) or hampers (warnings) ``backend`` training this model on this host."""
    if backend not in BACKENDS:
        raise KtflowInputError(None, "backend", f"unknown backend {backend!r} (one of {', '.join(BACKENDS)})")
    chosen = backend_for(backend)
    where = f" in {host.executable}" if host.executable else ""
    missing = [name for name in chosen.packages if not _installed(host, name)]
    problems = [Problem(backend, "error", f"{name} is not installed{where}") for name in missing]
    if not host.ktflow:
        message = f"ktflow is not importable by {host.executable} (pip install --no-deps -e <ktflow repo>)"
        problems.append(Problem(backend, "error", message))
    for pin in host.pins:
        if pin.owner in chosen.pin_owners and pin.owner_version and not pin.ok:
            # DISABLE_VERSION_CHECK=1 is LLaMA-Factory's own switch for the same pins.
            advisory = pin.owner in ADVISORY_PINS or os.environ.get("DISABLE_VERSION_CHECK") in ("1", "true")
            severity = "warning" if advisory else "error"
            message = (
                f"{pin.owner} {pin.owner_version} wants {pin.requirement}, installed {pin.installed or '-'}"
            )
            problems.append(Problem(backend, severity, message))
    problems += chosen.host_problems(host)
    if not host.gpus:
        if chosen.gpu_reason:
            message = f"no CUDA GPU visible to torch{where} ({chosen.gpu_reason})"
            problems.append(Problem(backend, "error", message))
        else:
            problems.append(
                Problem(backend, "warning", "no CUDA GPU: training runs on the CPU (tiny models only)")
            )
    if requirements is not None:
        what = f"disk at {host.disk_path} for the BF16 cast:"
        problems += shortfall(backend, requirements, host.disk_free, requirements.bf16_disk_bytes, what)
        problems += chosen.memory_problems(host, requirements)
    return problems


def verdict(backend: str, problems: list[Problem]) -> str:
    title = BACKENDS[backend].title
    errors = [p.message for p in problems if p.severity == "error"]
    warnings = sum(p.severity == "warning" for p in problems)
    if errors:
        return f"{title} backend: cannot run here: " + "; ".join(errors)
    return f"{title} backend: can run here" + (f" ({warnings} warning(s))" if warnings else "")


def preflight(spec: TrainSpec, env: EnvReport, results_dir: Path) -> str:
    """Doctor's verdict for this run; HardwareError (before any work) if it cannot run here."""
    requirements: Requirements | None = None
    # An architecture without an estimate (a dense model) gets the host checks only.
    with contextlib.suppress(KtflowInputError):
        requirements = estimate_requirements(
            read_model_config(spec.model_dir),
            source=spec.model_dir / "config.json",
            lora_rank=spec.lora_rank,
            seq_len=spec.cutoff_len,
            batch_size=spec.batch_size,
            hf_weight_bytes=2 if spec.bf16 else 4,
        )
    if requirements is not None:
        # The cast is done by now: its disk need is not training's (a full disk is reported
        # where a write fails, as a storage error naming the path).
        requirements = dataclasses.replace(requirements, bf16_disk_bytes=0)
    label = backend_for(spec.backend).label(spec, env)
    problems = check_backend(collect_host(results_dir, env), label, requirements)
    line = verdict(label, problems)
    if any(p.severity == "error" for p in problems):
        raise HardwareError(f"{line} (see `ktflow doctor --backend {label}`)")
    return line
