"""``sglang``: ktflow launches ``python -m sglang.launch_server`` and always stops it.

It serves convert-lora's adapter (``--lora-paths``) and, for a model with ``cpu_int8``,
KT's INT8 experts with the ``--kt-*`` flags that ``ktflow convert-int8`` recorded.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

from ktflow.convert_int8 import RECORD_NAME
from ktflow.errors import HardwareError, KtflowInputError
from ktflow.infer.backends.base import Backend, InferInputs
from ktflow.infer.base import InferenceBackend, Sampling
from ktflow.infer.client import CLIENT_KEYS
from ktflow.infer.server import HOST, MANAGED_KEYS, ManagedServer, flag_args, managed_backend


class SGLangBackend(Backend):
    name = "sglang"
    spec_keys = operational_keys = CLIENT_KEYS | MANAGED_KEYS
    adapter_input = "sglang"
    loads_int8 = True

    def create(self, spec: dict[str, Any], sampling: Sampling, inputs: InferInputs) -> InferenceBackend:
        served = (inputs.adapter_name, inputs.adapter) if inputs.adapter is not None else None
        kt_args = kt_server_args(inputs.int8_dir) if inputs.int8_dir is not None else None
        server = SGLangServer(inputs.model_dir, spec, served, inputs.server_log, kt_args=kt_args)
        return managed_backend(server, spec, sampling)


def kt_server_args(int8_dir: Path) -> list[str]:
    record = int8_dir / RECORD_NAME
    try:
        args = json.loads(record.read_text(encoding="utf-8"))["sglang_args"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise KtflowInputError(
            record, "sglang_args", f"unreadable ({error}); rerun ktflow convert-int8"
        ) from error
    if not isinstance(args, list) or not all(isinstance(arg, str) for arg in args):
        raise KtflowInputError(record, "sglang_args", "expected a list of strings")
    return args


class SGLangServer(ManagedServer):
    """``python -m sglang.launch_server`` with the adapter as ``--lora-paths NAME=DIR`` and, for KT
    CPU experts, the ``--kt-*`` flags from ``ktflow convert-int8``'s ``ktflow_int8.json``."""

    name = "sglang"
    health_path = "health"  # 200 only after SGLang's own warm-up request went through
    reserved = ("model_path", "host", "port", "lora_paths", "enable_lora")

    def __init__(self, *args: Any, kt_args: list[str] | None = None, **kwargs: Any) -> None:
        """ManagedServer's arguments, plus the ``--kt-*`` flags of the INT8 weights."""
        super().__init__(*args, **kwargs)
        self.kt_args = list(kt_args or [])
        for flag in self.kt_args:
            key = flag.removeprefix("--").replace("-", "_")
            if flag.startswith("--") and key in self.flags:
                raise KtflowInputError(
                    "config", f"inference.server.{key}", "also set by the INT8 weights dir"
                )
        self.served_name = str(self.flags.pop("served_model_name", self.served_name))

    def model_names(self) -> dict[str | None, str]:
        names = super().model_names()
        if self.adapter is not None:
            names[self.adapter[0]] = f"{self.served_name}:{self.adapter[0]}"  # SGLang's BASE:ADAPTER
        return names

    def preflight(self) -> None:
        probe = (
            "import importlib.util,sys\n"
            "if importlib.util.find_spec('sglang') is None: sys.exit(10)\n"
            "import torch\nsys.exit(0 if torch.cuda.is_available() else 11)"
        )
        try:
            code = subprocess.run([self.python, "-c", probe], timeout=300, check=False).returncode
        except (OSError, subprocess.TimeoutExpired) as error:
            raise KtflowInputError("config", "inference.python", f"{self.python}: {error}") from error
        if code == 10:
            raise KtflowInputError("config", "inference.python", f"{self.python} cannot import sglang")
        if code == 11:
            raise HardwareError(f"the sglang backend needs a CUDA GPU; {self.python} sees none")
        if code != 0:
            raise KtflowInputError(
                "config", "inference.python", f"{self.python} failed its check (exit {code})"
            )

    def command(self, port: int) -> list[str]:
        flags: dict[str, Any] = {
            "served_model_name": self.served_name,
            "random_seed": self.spec.get("seed", 42),
            "dtype": self.spec.get("dtype", "auto"),
            "max_running_requests": self.spec.get("batch_size"),
            "trust_remote_code": bool(self.spec.get("trust_remote_code", False)),
            **self.flags,
        }
        argv = [self.python, "-m", "sglang.launch_server", "--model-path", str(self.model_dir)]
        argv += ["--host", HOST, "--port", str(port)]
        if self.adapter is not None:
            argv += ["--enable-lora", "--lora-paths", f"{self.adapter[0]}={Path(self.adapter[1]).resolve()}"]
        return argv + self.kt_args + flag_args(flags)
