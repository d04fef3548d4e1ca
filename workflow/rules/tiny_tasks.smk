# `ktflow tiny-tasks`: the seeded tiny tasks of the default config, and their DPO/KTO
# formats derived from the SFT rows (tiny_tasks_format).
from ktflow.train import plan

# Wildcard patterns: which tasks these rules make ("(?!)" matches nothing).
TINY_TASKS = (
    "|".join(re.escape(t) for t in TASKS if task_config(t)["source"] == "tiny")
    or "(?!)"
)


rule tiny_tasks:
    output:
        train=R("data/{task}/train.json"),
        test=R("data/{task}/test.json"),
    log:
        R("logs/tiny_tasks/{task}.log"),
    benchmark:
        R("benchmarks/tiny_tasks/{task}.tsv")
    wildcard_constraints:
        task=TINY_TASKS,
    conda:
        "../../envs/ktflow.yaml"
    resources:
        mem_mb=scaled(500),
        runtime=scaled(5),
    params:
        code=code_version("tiny-tasks"),
        seed=config.get("seed", 42),
        n_train=lambda w: task_config(w.task).get("tiny", {}).get("n_train", 400),
        n_test=lambda w: task_config(w.task).get("tiny", {}).get("n_test", 60),
        outdir=lambda w, output: str(Path(output.train).parent),
    shell:
        "ktflow tiny-tasks {wildcards.task:q} {params.outdir:q} --seed {params.seed:q}"
        " --n-train {params.n_train:q} --n-test {params.n_test:q} > {log:q} 2>&1"


rule tiny_tasks_format:
    input:
        R("data/{task}/train.json"),
    output:
        R("data/{task}/{format}/train.json"),
    log:
        R("logs/tiny_tasks_format/{task}.{format}.log"),
    benchmark:
        R("benchmarks/tiny_tasks_format/{task}.{format}.tsv")
    wildcard_constraints:
        task=TINY_TASKS,
        format="|".join(plan.DERIVED_FORMATS),
    conda:
        "../../envs/ktflow.yaml"
    resources:
        mem_mb=500,
        runtime=5,
    params:
        code=code_version("tiny-tasks"),
        seed=config.get("seed", 42),
        outdir=lambda w, output: str(Path(output[0]).parent),
    shell:
        "ktflow tiny-tasks {wildcards.task:q} {params.outdir:q} --format {wildcards.format:q}"
        " --from {input:q} --seed {params.seed:q} > {log:q} 2>&1"
