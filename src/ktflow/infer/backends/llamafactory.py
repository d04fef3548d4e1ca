"""``llamafactory``: ktflow launches LLaMA-Factory's OpenAI-style api and always stops it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ktflow.errors import KtflowInputError
from ktflow.infer.backends.base import Backend, InferInputs
from ktflow.infer.base import InferenceBackend, Sampling
from ktflow.infer.client import CLIENT_KEYS
from ktflow.infer.server import HOST, MANAGED_KEYS, ManagedServer, flag_args, managed_backend


class LlamaFactoryBackend(Backend):
    name = "llamafactory"
    spec_keys = operational_keys = CLIENT_KEYS | MANAGED_KEYS

    def create(self, spec: dict[str, Any], sampling: Sampling, inputs: InferInputs) -> InferenceBackend:
        if inputs.int8_dir is not None:
            raise KtflowInputError("config", "inference.backend", "--int8 weights need the sglang backend")
        served = (inputs.adapter_name, inputs.adapter) if inputs.adapter is not None else None
        server = LlamaFactoryServer(inputs.model_dir, spec, served, inputs.server_log)
        return managed_backend(server, spec, sampling)


class LlamaFactoryServer(ManagedServer):
    """LLaMA-Factory's OpenAI-style ``api`` (base + adapter merged, one model per server)."""

    name = "llamafactory"
    reserved = ("model_name_or_path", "adapter_name_or_path")

    def model_names(self) -> dict[str | None, str]:
        # The api serves exactly what it loaded and ignores the request's model field.
        return {self.adapter[0] if self.adapter else None: self.served_name}

    def command(self, port: int) -> list[str]:
        args: dict[str, Any] = {
            "model_name_or_path": str(self.model_dir),
            "infer_backend": "huggingface",
            "infer_dtype": self.spec.get("dtype", "auto"),
            "trust_remote_code": bool(self.spec.get("trust_remote_code", False)),
            **self.flags,
        }
        if self.adapter is not None:
            args["adapter_name_or_path"] = str(Path(self.adapter[1]).resolve())
        return [self.python, "-m", "ktflow.lf_launch", "api", *flag_args(args, dashes=False)]

    def environment(self, port: int) -> dict[str, str]:
        env = super().environment(port)
        env.update(API_HOST=HOST, API_PORT=str(port), API_MODEL_NAME=self.served_name, API_VERBOSE="0")
        return env
