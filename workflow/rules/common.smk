import json
import os
import re
import sys
from pathlib import Path

from ktflow import config_layers
from ktflow.config import (
    as_json,
    check_config,
    effective_inference,
    effective_training,
)
from ktflow.errors import KtflowInputError
from ktflow.jobenv import put_interpreter_first_on_path
from ktflow.code_version import code_version
from ktflow.train import plan

CONFIG_LAYERS = []
try:
    CONFIG_LAYERS = config_layers.layers(
        config_layers.DEFAULT,
        workflow.config_settings.configfiles,
        workflow.config_settings.config,
    )
    config.clear()
    config.update(config_layers.merged(CONFIG_LAYERS))
    # JSON Schema (2020-12) first, then the cross-field checks; one line naming file and key.
    check_config(
        config,
        config_layers.UNBLAMED,
        schema=Path(workflow.basedir) / "workflow" / "schemas" / "config.schema.yaml",
    )
    # Training's own cross-field rules: data, environment and preflight per task.
    plan.check_training(config, config_layers.UNBLAMED)
except KtflowInputError as error:
    blamed = config_layers.blamed(error, CONFIG_LAYERS) if CONFIG_LAYERS else error
    sys.exit(f"ktflow: invalid config: {blamed.format()}")

# Rules never rely on the caller's PATH: the interpreter that plans the workflow
# (`make demo`, `.venv/bin/snakemake`, an activated venv; SLURM jobs re-run it) puts its
# bin dir first on the jobs' PATH, so `ktflow` and the tools it starts (llamafactory-cli,
# torchrun) come from that environment. `--sdm conda` activates each rule's env on top.
put_interpreter_first_on_path()

RESULTS = config.get("results", "results")
MODELS = config["experiments"]["models"]
TASKS = config["experiments"]["tasks"]
VARIANTS = ["base", "lora"]
THREADS = config.get("resources", {}).get("threads", 2)
# Each training backend runs in its own environment (envs/<name>.yaml, see train/plan.py).
ENVS = str(Path(workflow.basedir) / "envs")


wildcard_constraints:
    model="|".join(MODELS),
    task="|".join(TASKS),
    variant="base|lora",


def R(path):
    return f"{RESULTS}/{path}"


# What `snakemake --report report.html` shows beside the config and per-rule runtimes.
REPORT_TARGETS = [R("report/tables.html"), R("plots/loss.png"), R("plots/metrics.png")]


# Content-addressed artifacts: rules marked `cache: True` (the long steps) go through
# Snakemake's between-workflow cache when it runs with --cache (both profiles set it).
# An entry is keyed by a hash of the job's command, params (its config subset and the
# code version of its ktflow step, see code_version) and, recursively, those of every
# job upstream, so returning to an earlier config restores its artifacts instead of
# recomputing them. The cache defaults to <results>/.cache/artifacts: on the results'
# file system, storing an output is a rename. Set SNAKEMAKE_OUTPUT_CACHE to share one.
if (
    workflow.workflow_settings is not None
    and workflow.workflow_settings.cache is not None
):
    CACHE_DIR = os.environ.setdefault(
        "SNAKEMAKE_OUTPUT_CACHE", str(Path(R(".cache/artifacts")).resolve())
    )
    Path(CACHE_DIR).mkdir(parents=True, exist_ok=True)


def model_config(model):
    return config["models"][model]


def task_config(task):
    return config["tasks"][task]


# ---- input functions -------------------------------------------------------


def release_source(wildcards):
    """A tiny model is first built, then fetched like any local release."""
    if model_config(wildcards.model)["source"] == "tiny":
        return R(f"tiny/{wildcards.model}")
    return []


def fetch_params(wildcards):
    spec = model_config(wildcards.model)
    keys = ("source", "path", "repo_id", "revision", "allow_patterns")
    return as_json({key: spec[key] for key in keys if key in spec})


def task_files(wildcards):
    spec = task_config(wildcards.task)
    if spec["source"] == "file":
        return {"train": spec["train_file"], "test": spec["test_file"]}
    return {
        "train": R(f"data/{wildcards.task}/train.json"),
        "test": R(f"data/{wildcards.task}/test.json"),
    }


def metric_entries(wildcards, input):
    entries = []
    for model in MODELS:
        for task in TASKS:
            for variant in VARIANTS:
                path = R(f"metrics/{model}/{task}/{variant}.json")
                entries.append(f"{model}:{task}:{variant}={path}")
    return entries


def tables_spec():
    return as_json(
        {
            "models": {m: model_config(m).get("display_name", m) for m in MODELS},
            "tasks": {t: task_config(t)["kind"] for t in TASKS},
            "paper": config.get("tables", {}).get("paper", {}),
        }
    )


def all_targets():
    targets = [R("tables/generation.csv"), R("tables/accuracy.csv")]
    for model in MODELS:
        for task in TASKS:
            targets.append(R(f"lora/{model}/{task}/sglang"))
        if model_config(model).get("cpu_int8", False):
            targets.append(R(f"models/{model}/int8"))
    return targets + REPORT_TARGETS


def fetch_args(wildcards, input):
    """A list: the rule's `{params.args:q}` quotes each word (config paths reach a shell)."""
    spec = model_config(wildcards.model)
    if spec["source"] == "tiny":
        return ["--source", "local", "--path", input[0]]
    if spec["source"] == "local":
        return ["--source", "local", "--path", spec["path"]]
    args = ["--source", "hf", "--repo-id", spec["repo_id"]]
    if "revision" in spec:
        args += ["--revision", spec["revision"]]
    if "allow_patterns" in spec:
        args += ["--allow-patterns", *spec["allow_patterns"]]
    return args


# ---- resources (cluster profiles read these; retries scale with attempt) ----
# profiles/slurm adds only the site's partition, account and QoS to these.


def scaled(amount):
    """A fixed memory (MB) or runtime (minutes) that grows with each retry."""
    return lambda wildcards, attempt: amount * attempt


def model_size_gb(model):
    spec = model_config(model)
    return 0.01 if spec["source"] == "tiny" else float(spec.get("size_gb", 100))


def runtime_minutes(model, full_scale_minutes, attempt):
    """Minutes for a step that takes ``full_scale_minutes`` on a ~700 GB model."""
    scale = max(model_size_gb(model) / 700, 0.02)
    return int(max(10, full_scale_minutes * scale) * attempt)


def cast_memory_mb(model, attempt):
    # Streaming cast: one shard (<= ~5 GB in DeepSeek releases) plus a margin per worker.
    shard_mb = 200 if model_size_gb(model) < 1 else 6000
    workers = model_config(model).get("cast", {}).get("workers", 1)
    return (2000 + shard_mb * workers) * attempt


def train_memory_mb(model, attempt):
    # KT keeps routed experts in host RAM (BF16), so host memory scales with the model.
    return int(max(6000, model_size_gb(model) * 1024 * 1.15) * attempt)


def serve_memory_mb(model, attempt):
    return int(max(4000, model_size_gb(model) * 1024 * 1.1) * attempt)


def train_gpus(task):
    return config.get("resources", {}).get("gpus_train", 0)


def infer_gpus(model, task):
    return config.get("resources", {}).get("gpus_infer", 0)


def gpu_model(gpus):
    """For the SLURM plugin's --gpus=<model>:<n>; empty (any model) and never on CPU jobs."""
    return config.get("resources", {}).get("gpu_model", "") if gpus else ""
