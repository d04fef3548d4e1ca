# `ktflow evaluate`: BLEU-1..4 / ROUGE-1/2/L or multiple-choice accuracy per prediction file.


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
