rule convert_lora_sglang:
    input:
        adapter=R("lora/{model}/{task}/adapter"),
        base=R("models/{model}/bf16"),
    output:
        directory(R("lora/{model}/{task}/sglang")),
    log:
        R("logs/convert_lora_sglang/{model}/{task}.log"),
    benchmark:
        R("benchmarks/convert_lora_sglang/{model}/{task}.tsv")
    conda:
        "../../envs/ktflow.yaml"
    resources:
        mem_mb=4000,
        runtime=30,
    params:
        alpha=lambda w: effective_training(config, w.task).get("lora", {}).get("alpha"),
    shell:
        "ktflow convert-lora {input.adapter} {output} --base-model {input.base}"
        " --lora-alpha {params.alpha} > {log} 2>&1"


rule infer:
    input:
        model=R("models/{model}/bf16"),
        test=lambda w: task_files(w)["test"],
        adapter=adapter_for,
    output:
        R("predictions/{model}/{task}/{variant}.jsonl"),
    log:
        R("logs/infer/{model}/{task}/{variant}.log"),
    benchmark:
        R("benchmarks/infer/{model}/{task}/{variant}.tsv")
    conda:
        "../../envs/ktflow.yaml"
    threads: THREADS
    resources:
        mem_mb=lambda w, attempt: serve_memory_mb(w.model, attempt),
        runtime=lambda w, attempt: runtime_minutes(w.model, 120, attempt),
        gpu=lambda w: infer_gpus(w.model, w.task),
    params:
        spec=lambda w: as_json(effective_inference(config, w.model, w.task)),
        adapter=adapter_flag,
    shell:
        "ktflow infer {input.model} {input.test} {output} {params.adapter}"
        " --spec {params.spec:q} > {log} 2>&1"
