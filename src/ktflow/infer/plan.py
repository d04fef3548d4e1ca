"""What the workflow's ``infer`` job needs beyond the model and the test file, per backend.

Each backend says which adapter dir it loads (``Backend.adapter_input``: SGLang the PEFT dir
``ktflow convert-lora`` wrote, ``lora/<model>/<task>/sglang``; the others the adapter training
wrote) and whether it serves a ``cpu_int8`` model's INT8 experts (``models/<model>/int8``,
whose ``ktflow_int8.json`` holds the ``--kt-*`` flags). Kept here (not in the Snakefile) so
the rule stays declarative and this is testable without Snakemake.
"""

from __future__ import annotations

from typing import Any

from ktflow.config import effective_inference
from ktflow.infer.backends import DEFAULT_BACKEND, backend_named


def infer_inputs(config: dict[str, Any], model: str, task: str, variant: str) -> dict[str, str]:
    results = config.get("results", "results")
    backend = backend_named(effective_inference(config, model, task).get("backend", DEFAULT_BACKEND))
    inputs: dict[str, str] = {}
    if variant == "lora":
        inputs["adapter"] = f"{results}/lora/{model}/{task}/{backend.adapter_input}"
    if backend.loads_int8 and config["models"][model].get("cpu_int8", False):
        inputs["int8"] = f"{results}/models/{model}/int8"
    return inputs


def infer_flags(config: dict[str, Any], model: str, task: str, variant: str) -> list[str]:
    """``ktflow infer`` options for those inputs; the adapter is served under the task's name.

    A list of words: the rule's ``{params.flags:q}`` quotes each one for the shell.
    """
    inputs = infer_inputs(config, model, task, variant)
    flags: list[str] = []
    if "adapter" in inputs:
        flags += ["--adapter", inputs["adapter"], "--adapter-name", task]
    if "int8" in inputs:
        flags += ["--int8", inputs["int8"]]
    return flags
