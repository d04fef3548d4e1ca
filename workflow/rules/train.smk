# `ktflow train`: LoRA training with the task's backend, in its own environment, on data in
# the task's stage format (see src/ktflow/train/plan.py).
from ktflow.train import plan


rule train:
    input:
        model=R("models/{model}/bf16"),
        train=lambda w: plan.train_input(config, w.task, RESULTS),
        # ancient: a rerun of the preflight alone must not retrain finished adapters.
        preflight=lambda w: ancient(plan.preflight_input(config, w.task, RESULTS)),
    output:
        directory(R("lora/{model}/{task}/adapter")),
    log:
        R("logs/train/{model}/{task}.log"),
    cache: True
    conda:
        lambda w: f"{ENVS}/{plan.env_name(config, w.task)}.yaml"
    threads: THREADS
    resources:
        mem_mb=lambda w, attempt: train_memory_mb(w.model, attempt),
        runtime=lambda w, attempt: runtime_minutes(w.model, 24 * 60, attempt),
        gpu=lambda w: train_gpus(w.task),
        gpu_model=lambda w: gpu_model(train_gpus(w.task)),
    params:
        code=code_version("train"),
        spec=lambda w: as_json(effective_training(config, w.task, w.model)),
        data=lambda w: plan.train_data(config, w.task, RESULTS)[1],
        # output: <results>/lora/<model>/<task>/adapter
        results=lambda w, output: str(Path(output[0]).parents[3]),
        # Checkpoints live outside the declared output so a killed run resumes.
        work=lambda w: R(f".work/train/{w.model}/{w.task}"),
    shell:
        "ktflow train {input.model:q} {params.data:q} {output:q} --work-dir {params.work:q}"
        " --results-dir {params.results:q} --dataset-name {wildcards.task:q} --spec {params.spec:q} > {log:q} 2>&1"
