# `ktflow doctor` before any GPU/KT training: hardware, packages and memory for the task's
# backend, in that backend's environment (see src/ktflow/train/plan.py).
from ktflow.train import plan

PREFLIGHT_TASKS = "|".join(re.escape(t) for t in plan.preflight_tasks(config)) or "(?!)"


rule doctor:
    output:
        R("preflight/{task}.json"),
    log:
        R("logs/doctor/{task}.log"),
    benchmark:
        R("benchmarks/doctor/{task}.tsv")
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
        code=code_version("doctor"),
        spec=lambda w: as_json(effective_training(config, w.task)),
        # doctor measures free disk where the results go (output: <results>/preflight/<task>.json)
        results=lambda w, output: str(Path(output[0]).parents[1]),
    # stdout (the report) goes to the log; stderr, with what to fix, to the terminal.
    shell:
        "ktflow doctor --training {params.spec:q} --results-dir {params.results:q}"
        " --json {output:q} > {log:q}"
