# `ktflow convert-int8`: BF16 routed experts in KT's CPU INT8 layout (AMX hosts).


rule convert_int8:
    input:
        R("models/{model}/bf16"),
    output:
        directory(R("models/{model}/int8")),
    log:
        R("logs/convert_int8/{model}.log"),
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
