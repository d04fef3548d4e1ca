# `ktflow convert-lora`: the trained adapter as one PEFT dir SGLang loads.


rule convert_lora:
    input:
        adapter=R("lora/{model}/{task}/adapter"),
        base=R("models/{model}/bf16"),
    output:
        directory(R("lora/{model}/{task}/sglang")),
    log:
        R("logs/convert_lora/{model}/{task}.log"),
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
