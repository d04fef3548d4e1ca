rule tiny_model:
    output:
        directory(R("tiny/{model}")),
    log:
        R("logs/tiny_model/{model}.log"),
    benchmark:
        R("benchmarks/tiny_model/{model}.tsv")
    conda:
        "../../envs/ktflow.yaml"
    resources:
        mem_mb=scaled(2000),
        runtime=scaled(10),
    params:
        code=code_version("tiny-model"),
        seed=lambda w: model_config(w.model).get("tiny", {}).get("seed", 0),
        vocab=lambda w: model_config(w.model).get("tiny", {}).get("vocab_size", 1024),
        shards=lambda w: model_config(w.model).get("tiny", {}).get("shards", 4),
    shell:
        "ktflow tiny-model {output:q} --seed {params.seed:q} --vocab-size {params.vocab:q}"
        " --shards {params.shards:q} > {log:q} 2>&1"


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


rule cast_bf16:
    input:
        R("models/{model}/release"),
    output:
        directory(R("models/{model}/bf16")),
    log:
        R("logs/cast_bf16/{model}.log"),
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


rule convert_cpu_int8:
    input:
        R("models/{model}/bf16"),
    output:
        directory(R("models/{model}/int8")),
    log:
        R("logs/convert_cpu_int8/{model}.log"),
    cache: True
    conda:
        "../../envs/kt.yaml"
    threads: THREADS
    resources:
        mem_mb=lambda w, attempt: cast_memory_mb(w.model, attempt),
        runtime=lambda w, attempt: runtime_minutes(w.model, 240, attempt),
    params:
        code=code_version("convert-int8"),
        checkout=lambda w: (
            ["--kt-checkout", model_config(w.model)["kt_checkout"]]
            if "kt_checkout" in model_config(w.model)
            else []
        ),
    shell:
        "ktflow convert-int8 {input:q} {output:q} {params.checkout:q} --threads {threads:q} > {log:q} 2>&1"
