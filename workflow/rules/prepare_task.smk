# `ktflow prepare-task`: raw data sets come from a local file, a hub data-set repository or
# a URL; the download happens inside the job, so planning (-n) never touches the network.
PREPARE_KEYS = (
    "kind",
    "source",
    "adapter",
    "raw_file",
    "repo_id",
    "revision",
    "filename",
    "url",
    "sha256",
    "split",
    "on_invalid",
)
RAW_TASKS = (
    "|".join(
        re.escape(t)
        for t in TASKS
        if task_config(t)["source"] in ("raw", "hf-dataset", "url")
    )
    or "(?!)"
)


rule prepare_task:
    input:
        lambda w: (
            task_config(w.task)["raw_file"]
            if task_config(w.task)["source"] == "raw"
            else []
        ),
    output:
        train=R("data/{task}/train.json"),
        test=R("data/{task}/test.json"),
    log:
        R("logs/prepare_task/{task}.log"),
    benchmark:
        R("benchmarks/prepare_task/{task}.tsv")
    wildcard_constraints:
        task=RAW_TASKS,
    conda:
        "../../envs/ktflow.yaml"
    resources:
        mem_mb=scaled(4000),
        runtime=scaled(30),
    params:
        code=code_version("prepare-task"),
        spec=lambda w: as_json(
            {
                "seed": config.get("seed", 42),
                **{k: v for k, v in task_config(w.task).items() if k in PREPARE_KEYS},
            }
        ),
        # URL downloads are kept outside the outputs, so a changed split reuses them.
        cache=lambda w: R(f".cache/datasets/{w.task}"),
        outdir=lambda w, output: str(Path(output.train).parent),
    shell:
        "ktflow prepare-task {params.outdir:q} --name {wildcards.task:q} --spec {params.spec:q}"
        " --cache-dir {params.cache:q} > {log:q} 2>&1"
