# `ktflow fetch`: the release, from a local directory or the Hugging Face hub.


rule fetch:
    input:
        release_source,
    output:
        directory(R("models/{model}/release")),
    log:
        R("logs/fetch/{model}.log"),
    cache: True
    conda:
        "../../envs/ktflow.yaml"
    resources:
        mem_mb=scaled(2000),
        runtime=lambda w, attempt: runtime_minutes(w.model, 60, attempt),
    params:
        code=code_version("fetch"),
        spec=fetch_params,
        args=fetch_args,
    shell:
        "ktflow fetch {output:q} {params.args:q} > {log:q} 2>&1"
