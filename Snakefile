# ktflow: KTransformers x LLaMA-Factory LoRA fine-tuning as one reproducible DAG.
from snakemake.utils import min_version

min_version("9.27")


# common.smk reads config/config.yaml (when present), each --configfile and --config itself
# (ktflow.config_layers: file and line for a YAML error or a duplicate key), then validates the
# merged config against workflow/schemas/config.schema.yaml (JSON Schema 2020-12) and the
# cross-field rules, with one error line naming the file that set the bad key, and the key.
include: "workflow/rules/common.smk"
include: "workflow/rules/model.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/serve.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/report.smk"


rule all:
    default_target: True
    input:
        all_targets(),
