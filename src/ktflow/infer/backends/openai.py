"""``openai``: a running OpenAI-compatible server at ``base_url``, which ktflow neither starts nor stops."""

from __future__ import annotations

from typing import Any

from ktflow.errors import KtflowInputError
from ktflow.infer.backends.base import Backend, InferInputs
from ktflow.infer.base import InferenceBackend, Sampling
from ktflow.infer.client import CLIENT_KEYS, OpenAIClient, client_options


class OpenAIBackend(Backend):
    name = "openai"
    spec_keys = CLIENT_KEYS | {"base_url", "model", "adapter_model"}
    operational_keys = CLIENT_KEYS | {"base_url"}
    loads_local_weights = False  # the server loads its own copy

    def check(self, spec: dict[str, Any]) -> None:
        if not isinstance(spec.get("base_url"), str):
            raise KtflowInputError(
                "config", "inference.base_url", "the openai backend needs the server's URL"
            )

    def create(self, spec: dict[str, Any], sampling: Sampling, inputs: InferInputs) -> InferenceBackend:
        models: dict[str | None, str] | None = {None: spec["model"]} if spec.get("model") else None
        client = OpenAIClient(spec["base_url"], sampling, models, **client_options(spec, sampling))
        if inputs.adapter is not None:
            # SGLang's "BASE:ADAPTER" unless the server names the adapter's model otherwise.
            client.model_names[inputs.adapter_name] = (
                spec.get("adapter_model") or f"{client.model_names[None]}:{inputs.adapter_name}"
            )
        return client
