# `ktflow cast`: the FP8 / INT4 release cast to BF16 (streaming, resumable, verified).


rule cast:
    input:
        R("models/{model}/release"),
    output:
        directory(R("models/{model}/bf16")),
    log:
        R("logs/cast/{model}.log"),
    cache: True
    conda:
        "../../envs/ktflow.yaml"
    threads: lambda w: model_config(w.model).get("cast", {}).get("workers", 1)
    resources:
        mem_mb=lambda w, attempt: cast_memory_mb(w.model, attempt),
        runtime=lambda w, attempt: runtime_minutes(w.model, 240, attempt),
    params:
        code=code_version("cast"),
        workers=lambda w: model_config(w.model).get("cast", {}).get("workers", 1),
        # Snakemake deletes a directory() output before its job: the cast resumes in a
        # work dir that is renamed into place only once it is complete.
        work=lambda w: R(f".work/cast/{w.model}"),
    shell:
        "ktflow cast {input:q} {params.work:q} --workers {params.workers:q} > {log:q} 2>&1"
        " && mv {params.work:q} {output:q}"
