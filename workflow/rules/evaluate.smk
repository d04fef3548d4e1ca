rule evaluate:
    input:
        R("predictions/{model}/{task}/{variant}.jsonl"),
    output:
        metrics=R("metrics/{model}/{task}/{variant}.json"),
        samples=R("metrics/{model}/{task}/{variant}.samples.jsonl"),
    log:
        R("logs/evaluate/{model}/{task}/{variant}.log"),
    benchmark:
        R("benchmarks/evaluate/{model}/{task}/{variant}.tsv")
    conda:
        "../../envs/ktflow.yaml"
    threads: config.get("evaluation", {}).get("workers", 1)
    resources:
        mem_mb=scaled(2000),
        runtime=scaled(30),
    params:
        code=code_version("evaluate"),
        kind=lambda w: task_config(w.task)["kind"],
        flavour=lambda w: (
            ["--flavour", config.get("evaluation", {}).get("flavour", "paper")]
            if task_config(w.task)["kind"] == "generation"
            else []
        ),
        workers=config.get("evaluation", {}).get("workers", 1),
    shell:
        "ktflow evaluate {input:q} --task {params.kind:q} -o {output.metrics:q}"
        " --per-sample {output.samples:q} {params.flavour:q}"
        " --workers {params.workers:q} > {log:q} 2>&1"


rule tables:
    input:
        expand(
            R("metrics/{model}/{task}/{variant}.json"),
            model=MODELS,
            task=TASKS,
            variant=VARIANTS,
        ),
    output:
        generation=R("tables/generation.csv"),
        accuracy=R("tables/accuracy.csv"),
    log:
        R("logs/tables/tables.log"),
    benchmark:
        R("benchmarks/tables/tables.tsv")
    conda:
        "../../envs/ktflow.yaml"
    resources:
        mem_mb=scaled(1000),
        runtime=scaled(5),
    params:
        code=code_version("tables"),
        spec=tables_spec(),
        entries=metric_entries,
        outdir=lambda w, output: str(Path(output.generation).parent),
    shell:
        "ktflow tables --out-dir {params.outdir:q} --spec {params.spec:q}"
        " {params.entries:q} > {log:q} 2>&1"
