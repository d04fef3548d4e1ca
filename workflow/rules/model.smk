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
        mem_mb=2000,
        runtime=10,
    params:
        seed=lambda w: model_config(w.model).get("tiny", {}).get("seed", 0),
        vocab=lambda w: model_config(w.model).get("tiny", {}).get("vocab_size", 1024),
        shards=lambda w: model_config(w.model).get("tiny", {}).get("shards", 4),
    shell:
        "ktflow tiny-model {output} --seed {params.seed} --vocab-size {params.vocab}"
        " --shards {params.shards} > {log} 2>&1"


rule fetch:
    input:
        release_source,
    output:
        directory(R("models/{model}/release")),
    log:
        R("logs/fetch/{model}.log"),
    benchmark:
        R("benchmarks/fetch/{model}.tsv")
    conda:
        "../../envs/ktflow.yaml"
    resources:
        mem_mb=2000,
        runtime=lambda w, attempt: runtime_minutes(w.model, 60, attempt),
    params:
        spec=fetch_params,
        args=fetch_args,
    shell:
        "ktflow fetch {output} {params.args} > {log} 2>&1"


rule cast_bf16:
    input:
        R("models/{model}/release"),
    output:
        directory(R("models/{model}/bf16")),
    log:
        R("logs/cast_bf16/{model}.log"),
    benchmark:
        R("benchmarks/cast_bf16/{model}.tsv")
    conda:
        "../../envs/ktflow.yaml"
    threads: lambda w: model_config(w.model).get("cast", {}).get("workers", 1)
    resources:
        mem_mb=lambda w, attempt: cast_memory_mb(w.model, attempt),
        runtime=lambda w, attempt: runtime_minutes(w.model, 240, attempt),
    params:
        workers=lambda w: model_config(w.model).get("cast", {}).get("workers", 1),
    shell:
        "ktflow cast {input} {output} --workers {params.workers} > {log} 2>&1"


rule convert_cpu_int8:
    input:
        R("models/{model}/bf16"),
    output:
        directory(R("models/{model}/int8")),
    log:
        R("logs/convert_cpu_int8/{model}.log"),
    benchmark:
        R("benchmarks/convert_cpu_int8/{model}.tsv")
    conda:
        "../../envs/kt.yaml"
    threads: THREADS
    resources:
        mem_mb=lambda w, attempt: cast_memory_mb(w.model, attempt),
        runtime=lambda w, attempt: runtime_minutes(w.model, 240, attempt),
    params:
        checkout=lambda w: (
            f"--kt-checkout {model_config(w.model)['kt_checkout']}"
            if "kt_checkout" in model_config(w.model)
            else ""
        ),
    shell:
        "ktflow convert-int8 {input} {output} {params.checkout} --threads {threads} > {log} 2>&1"
