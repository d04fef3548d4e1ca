import re
import sys
from pathlib import Path

from ktflow import config_layers
from ktflow.errors import KtflowInputError
from ktflow.train import plan

# Training data in each task's stage format, each backend in its own environment, and a
# preflight (`ktflow doctor`) before any GPU/KT training: see src/ktflow/train/plan.py.
try:
    plan.check_training(config, config_layers.UNBLAMED)
except KtflowInputError as error:
    sys.exit(
        f"ktflow: invalid config: {config_layers.blamed(error, CONFIG_LAYERS).format()}"
    )

PREFLIGHT_TASKS = "|".join(re.escape(t) for t in plan.preflight_tasks(config)) or "(?!)"
ENVS = str(Path(workflow.basedir) / "envs")
DERIVED_TASKS = (
    "|".join(re.escape(t) for t in TASKS if task_config(t)["source"] == "tiny")
    or "(?!)"
)


rule preflight:
    output:
        R("preflight/{task}.json"),
    log:
        R("logs/preflight/{task}.log"),
    benchmark:
        R("benchmarks/preflight/{task}.tsv")
    wildcard_constraints:
        task=PREFLIGHT_TASKS,
    priority: 100
    conda:
        lambda w: f"{ENVS}/{plan.env_name(config, w.task)}.yaml"
    resources:
        mem_mb=2000,
        runtime=10,
        gpu=lambda w: train_gpus(w.task),
    params:
        spec=lambda w: as_json(effective_training(config, w.task)),
        # doctor measures free disk where the results go (output: <results>/preflight/<task>.json)
        results=lambda w, output: str(Path(output[0]).parents[1]),
    # stdout (the report) goes to the log; stderr, with what to fix, to the terminal.
    shell:
        "ktflow doctor --training {params.spec:q} --results-dir {params.results:q}"
        " --json {output:q} > {log:q}"


rule tiny_train_format:
    input:
        R("data/{task}/train.json"),
    output:
        R("data/{task}/{format}/train.json"),
    log:
        R("logs/tiny_train_format/{task}.{format}.log"),
    benchmark:
        R("benchmarks/tiny_train_format/{task}.{format}.tsv")
    wildcard_constraints:
        task=DERIVED_TASKS,
        format="|".join(plan.DERIVED_FORMATS),
    conda:
        "../../envs/ktflow.yaml"
    resources:
        mem_mb=500,
        runtime=5,
    params:
        seed=config.get("seed", 42),
        outdir=lambda w, output: str(Path(output[0]).parent),
    shell:
        "ktflow tiny-tasks {wildcards.task:q} {params.outdir:q} --format {wildcards.format:q}"
        " --from {input:q} --seed {params.seed:q} > {log:q} 2>&1"


rule train_lora:
    input:
        model=R("models/{model}/bf16"),
        train=lambda w: plan.train_input(config, w.task, RESULTS),
        # ancient: a rerun of the preflight alone must not retrain finished adapters.
        preflight=lambda w: ancient(plan.preflight_input(config, w.task, RESULTS)),
    output:
        directory(R("lora/{model}/{task}/adapter")),
    log:
        R("logs/train_lora/{model}/{task}.log"),
    cache: True
    conda:
        lambda w: f"{ENVS}/{plan.env_name(config, w.task)}.yaml"
    threads: THREADS
    resources:
        mem_mb=lambda w, attempt: train_memory_mb(w.model, attempt),
        runtime=lambda w, attempt: runtime_minutes(w.model, 24 * 60, attempt),
        gpu=lambda w: train_gpus(w.task),
        gpu_model=lambda w: gpu_model(train_gpus(w.task)),
    params:
        code=code_version("train"),
        spec=lambda w: as_json(effective_training(config, w.task, w.model)),
        data=lambda w: plan.train_data(config, w.task, RESULTS)[1],
        # output: <results>/lora/<model>/<task>/adapter
        results=lambda w, output: str(Path(output[0]).parents[3]),
        # Checkpoints live outside the declared output so a killed run resumes.
        work=lambda w: R(f".work/train/{w.model}/{w.task}"),
    shell:
        "ktflow train {input.model:q} {params.data:q} {output:q} --work-dir {params.work:q}"
        " --results-dir {params.results:q} --dataset-name {wildcards.task:q} --spec {params.spec:q} > {log:q} 2>&1"
