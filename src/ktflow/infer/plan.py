"""What the workflow's ``infer`` job needs beyond the model and the test file, per backend.

SGLang loads the PEFT dir ``ktflow convert-lora`` wrote (``lora/<model>/<task>/sglang``) and,
for a model with ``cpu_int8``, KT's INT8 experts (``models/<model>/int8``, whose
``ktflow_int8.json`` holds the ``--kt-*`` flags); every other backend loads the adapter
training wrote. Kept here (not in the Snakefile) so the rule stays declarative and this is
testable without Snakemake.
"""

from __future__ import annotations

from typing import Any

from ktflow.config import effective_inference


def infer_inputs(config: dict[str, Any], model: str, task: str, variant: str) -> dict[str, str]:
    results = config.get("results", "results")
    backend = effective_inference(config, model, task).get("backend", "hf")
    inputs: dict[str, str] = {}
    if variant == "lora":
        kind = "sglang" if backend == "sglang" else "adapter"
        inputs["adapter"] = f"{results}/lora/{model}/{task}/{kind}"
    if backend == "sglang" and config["models"][model].get("cpu_int8", False):
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
