# `ktflow tiny-model`: the tiny DeepSeek-V3-layout FP8 release the default config uses.


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
