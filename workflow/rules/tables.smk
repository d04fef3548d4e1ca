# `ktflow tables`: the paper's tables (CSV) and the tables page of `snakemake --report`.


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


rule tables_html:
    input:
        expand(
            R("metrics/{model}/{task}/{variant}.json"),
            model=MODELS,
            task=TASKS,
            variant=VARIANTS,
        ),
    output:
        report(
            R("report/tables.html"),
            caption="../report/tables.rst",
            category="Tables",
        ),
    log:
        R("logs/tables_html/tables_html.log"),
    benchmark:
        R("benchmarks/tables_html/tables_html.tsv")
    conda:
        "../../envs/ktflow.yaml"
    resources:
        mem_mb=scaled(1000),
        runtime=scaled(5),
    params:
        code=code_version("tables"),
        spec=tables_spec(),
        entries=metric_entries,
    shell:
        "ktflow tables --page {output:q} --spec {params.spec:q} {params.entries:q} > {log:q} 2>&1"
