rule train_lora:
    input:
        model=R("models/{model}/bf16"),
        train=lambda w: task_files(w)["train"],
    output:
        directory(R("lora/{model}/{task}/adapter")),
    log:
        R("logs/train_lora/{model}/{task}.log"),
    benchmark:
        R("benchmarks/train_lora/{model}/{task}.tsv")
    conda:
        train_env
    threads: THREADS
    resources:
        mem_mb=lambda w, attempt: train_memory_mb(w.model, attempt),
        runtime=lambda w, attempt: runtime_minutes(w.model, 24 * 60, attempt),
        gpu=lambda w: train_gpus(w.task),
    params:
        spec=lambda w: as_json(effective_training(config, w.task)),
        # Checkpoints live outside the declared output so a killed run resumes.
        work=lambda w: R(f".work/train/{w.model}/{w.task}"),
    shell:
        "ktflow train {input.model} {input.train} {output} --work-dir {params.work}"
        " --dataset-name {wildcards.task} --spec {params.spec:q} > {log} 2>&1"
