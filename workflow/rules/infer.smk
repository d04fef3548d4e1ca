# `ktflow infer`: batch inference, base and LoRA, with the configured backend.
from ktflow.infer.plan import infer_flags, infer_inputs


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
