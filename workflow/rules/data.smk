rule tiny_tasks:
    output:
        train=R("data/{task}/train.json"),
        test=R("data/{task}/test.json"),
    log:
        R("logs/tiny_tasks/{task}.log"),
    benchmark:
        R("benchmarks/tiny_tasks/{task}.tsv")
    conda:
        "../../envs/ktflow.yaml"
    resources:
        mem_mb=500,
        runtime=5,
    params:
        seed=config.get("seed", 42),
        n_train=lambda w: task_config(w.task).get("tiny", {}).get("n_train", 400),
        n_test=lambda w: task_config(w.task).get("tiny", {}).get("n_test", 60),
        outdir=lambda w, output: str(Path(output.train).parent),
    shell:
        "ktflow tiny-tasks {wildcards.task} {params.outdir} --seed {params.seed}"
        " --n-train {params.n_train} --n-test {params.n_test} > {log} 2>&1"
