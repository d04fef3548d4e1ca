"""A Python environment (an interpreter or venv) and what is installed there.

The KT backend and upstream transformers cannot share an environment, so each
training backend may run in its own: a conda env (``snakemake --software-deployment-method
conda``) or, without conda, an interpreter or venv named per backend in the config
(``training.python: {kt: /opt/kt-venv}``). ktflow itself runs in its own env and
only starts LLaMA-Factory with the backend's interpreter, so everything it learns
about that environment (package versions, their pins, torch and its GPUs) comes
from asking that interpreter, never from the env ktflow happens to run in.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ktflow.errors import KtflowInputError

# Runs inside the probed interpreter: stdlib only (plus torch if that env has it), so it
# works before ktflow is installed there and reports that ktflow is missing.
PROBE_CODE = r"""
import importlib.metadata as md, importlib.util, json, platform, sys

def probe(names):
    packages, requires = {}, {}
    for name in names:
        # KTransformers' forks (transformers-kt, accelerate-kt, ...) provide the same import
        # package under another distribution name and shadow the upstream one; their base
        # release is the upstream version they stand in for.
        for dist, fork in ((name + "-kt", True), (name, False)):
            try:
                version = md.version(dist)
            except md.PackageNotFoundError:
                continue
            packages[name] = version.split(".post")[0] if fork else version
            requires[name] = md.requires(dist) or []
            break
        else:
            packages[name] = None
    report = {"python": platform.python_version(), "executable": sys.executable, "packages": packages,
              "requires": requires, "ktflow": importlib.util.find_spec("ktflow") is not None,
              "torch": None, "torch_cuda": None, "gpus": []}
    try:
        import torch
    except Exception:
        return report
    report["torch"], report["torch_cuda"] = torch.__version__, torch.version.cuda
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            report["gpus"].append([props.name, int(props.total_memory)])
    return report
"""


@dataclass
class EnvReport:
    """What one Python environment has; ``packages[name]`` is None where not installed."""

    executable: str
    python: str
    packages: dict[str, str | None]
    requires: dict[str, list[str]] = field(default_factory=dict)
    torch: str | None = None
    torch_cuda: str | None = None
    gpus: list[tuple[str, int]] = field(default_factory=list)
    ktflow: bool = True


def resolve_python(value: str | Path | None, field_name: str = "training.python") -> Path | None:
    """An interpreter path, or a venv / conda-env directory holding ``bin/python``; None: this one."""
    if value is None or str(value) == "":
        return None
    path = Path(value).expanduser()
    candidate = path / "bin" / "python" if path.is_dir() else path
    if not candidate.is_file():
        raise KtflowInputError(
            "config", field_name, f"{value!r} is neither a Python interpreter nor a venv with bin/python"
        )
    return candidate.absolute()


def inspect_env(python: Path | None, names: tuple[str, ...], timeout: float = 180) -> EnvReport:
    """Versions, pins, torch and GPUs of ``python`` (None: the running interpreter, in-process)."""
    # Compared unresolved: a venv's python is a symlink to the base interpreter, yet its own env.
    if python is None or python.absolute() == Path(sys.executable).absolute():
        namespace: dict[str, Any] = {}
        exec(PROBE_CODE, namespace)  # the same code the foreign interpreter runs
        raw = namespace["probe"](list(names))
    else:
        code = PROBE_CODE + f"\nprint(json.dumps(probe({list(names)!r})))\n"
        try:
            done = subprocess.run(
                [str(python), "-c", code], capture_output=True, text=True, timeout=timeout, check=False
            )
        except (OSError, subprocess.TimeoutExpired) as error:
            raise KtflowInputError(python, None, f"cannot run this interpreter ({error})") from None
        if done.returncode != 0:
            raise KtflowInputError(python, None, f"interpreter failed: {done.stderr.strip()[-500:]}")
        raw = json.loads(done.stdout.strip().splitlines()[-1])
    return EnvReport(
        executable=raw["executable"],
        python=raw["python"],
        packages=raw["packages"],
        requires=raw["requires"],
        torch=raw["torch"],
        torch_cuda=raw["torch_cuda"],
        gpus=[(name, int(size)) for name, size in raw["gpus"]],
        ktflow=bool(raw["ktflow"]),
    )
