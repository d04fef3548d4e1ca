# `ktflow plots`: training-loss curves and base-vs-LoRA metric bars (PNG).


rule plots:
    input:
        adapters=expand(R("lora/{model}/{task}/adapter"), model=MODELS, task=TASKS),
        metrics=expand(
            R("metrics/{model}/{task}/{variant}.json"),
            model=MODELS,
            task=TASKS,
            variant=VARIANTS,
        ),
    output:
        loss=report(R("plots/loss.png"), caption="../report/loss.rst", category="Plots"),
        metrics=report(
            R("plots/metrics.png"), caption="../report/metrics.rst", category="Plots"
        ),
    log:
        R("logs/plots/plots.log"),
    benchmark:
        R("benchmarks/plots/plots.tsv")
    conda:
        "../../envs/ktflow.yaml"
    resources:
        mem_mb=scaled(2000),
        runtime=scaled(10),
    params:
        code=code_version("plots"),
        spec=tables_spec(),
        logs=[f"{m}:{t}={R(f'lora/{m}/{t}/adapter')}" for m in MODELS for t in TASKS],
        entries=metric_entries,
    shell:
        "ktflow plots --loss {output.loss:q} --metrics {output.metrics:q} --spec {params.spec:q}"
        " --train-logs {params.logs:q} --entries {params.entries:q} > {log:q} 2>&1"
