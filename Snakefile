# ktflow: KTransformers x LLaMA-Factory LoRA fine-tuning as one reproducible DAG.
from snakemake.utils import min_version

min_version("9.27")


# common.smk reads config/config.yaml (when present), each --configfile and --config itself
# (ktflow.config_layers: file and line for a YAML error or a duplicate key), then validates the
# merged config against workflow/schemas/config.schema.yaml (JSON Schema 2020-12) and the
# cross-field rules, with one error line naming the file that set the bad key, and the key.
include: "workflow/rules/common.smk"
# One rule file per step, named like its rule, its `ktflow <command>` and the command's entry
# module src/ktflow/steps/<step>.py; in the order the data flows.
include: "workflow/rules/tiny_model.smk"
include: "workflow/rules/fetch.smk"
include: "workflow/rules/cast.smk"
include: "workflow/rules/convert_int8.smk"
include: "workflow/rules/tiny_tasks.smk"
include: "workflow/rules/prepare_task.smk"
include: "workflow/rules/doctor.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/convert_lora.smk"
include: "workflow/rules/infer.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/tables.smk"
include: "workflow/rules/plots.smk"


# The tables page and plots for `snakemake --report report.html` (self-contained, offline).
report: "workflow/report/workflow.rst"


rule all:
    default_target: True
    input:
        all_targets(),
