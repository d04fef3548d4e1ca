from ktflow.infer.plan import infer_flags, infer_inputs


rule convert_lora_sglang:
    input:
        adapter=R("lora/{model}/{task}/adapter"),
        base=R("models/{model}/bf16"),
    output:
        directory(R("lora/{model}/{task}/sglang")),
    log:
        R("logs/convert_lora_sglang/{model}/{task}.log"),
    cache: True
    conda:
        "../../envs/ktflow.yaml"
    resources:
        mem_mb=scaled(4000),
        runtime=scaled(30),
    params:
        code=code_version("convert-lora"),
        alpha=lambda w: effective_training(config, w.task).get("lora", {}).get("alpha"),
    shell:
        "ktflow convert-lora {input.adapter:q} {output:q} --base-model {input.base:q}"
        " --lora-alpha {params.alpha:q} > {log:q} 2>&1"


rule infer:
    input:
        # the adapter the backend loads (SGLang: the converted one) and KT's INT8 experts
        unpack(lambda w: infer_inputs(config, w.model, w.task, w.variant)),
        model=R("models/{model}/bf16"),
        test=lambda w: task_files(w)["test"],
    output:
        predictions=R("predictions/{model}/{task}/{variant}.jsonl"),
        # Declared so that the cache keeps it with the predictions it describes.
        provenance=R("predictions/{model}/{task}/{variant}.provenance.json"),
    log:
        R("logs/infer/{model}/{task}/{variant}.log"),
    cache: True
    conda:
        "../../envs/ktflow.yaml"
    threads: THREADS
    resources:
        mem_mb=lambda w, attempt: serve_memory_mb(w.model, attempt),
        runtime=lambda w, attempt: runtime_minutes(w.model, 120, attempt),
        gpu=lambda w: infer_gpus(w.model, w.task),
        gpu_model=lambda w: gpu_model(infer_gpus(w.model, w.task)),
    params:
        code=code_version("infer"),
        spec=lambda w: as_json(effective_inference(config, w.model, w.task)),
        flags=lambda w: infer_flags(config, w.model, w.task, w.variant),
    shell:
        "ktflow infer {input.model:q} {input.test:q} {output.predictions:q} {params.flags:q}"
        " --spec {params.spec:q} > {log:q} 2>&1"
