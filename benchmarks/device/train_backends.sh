#!/usr/bin/env bash
# HF vs KT backend LoRA SFT on the tiny DeepSeek-V3 model, on the AMX + GPU device host.
# Usage (repo root, on the device host, wheels already installed on PYTHONPATH):
#   OUT=/path/to/out bash benchmarks/device/train_backends.sh
# Writes train_metrics.json of each backend (or the exact failure) under $OUT.
set -uo pipefail
export DISABLE_VERSION_CHECK=1
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
work=${WORK:-/tmp/ktflow-device}
rm -rf "$work"/work-* "$work"/adapter-*  # a stale run dir would be resumed
mkdir -p "$work" "$OUT"
python3 -m ktflow tiny-model "$work/release" >"$OUT/tiny-model.log" 2>&1 || exit 1
python3 -m ktflow cast "$work/release" "$work/bf16" --workers 4 >"$OUT/cast.log" 2>&1 || exit 1
python3 -m ktflow tiny-tasks style "$work/style" --seed 42 --n-train 400 --n-test 60 >/dev/null 2>&1 || exit 1
spec() {
  printf '{"stage":"sft","backend":"%s","lora":{"rank":16,"alpha":32,"target":"all"},"learning_rate":0.005,' "$1"
  printf '"epochs":1,"batch_size":1,"gradient_accumulation_steps":8,"cutoff_len":256,"warmup_ratio":0.0,'
  printf '"bf16":true,"save_steps":1000,"logging_steps":10%s}' "${2:-}"
}
for backend in ${BACKENDS:-hf kt}; do
  extra=""
  [ "$backend" = kt ] && extra=',"kt":{"backend":"AMXBF16","num_threads":8,"model_max_length":4096}'
  start=$(date +%s)
  python3 -m ktflow train "$work/bf16" "$work/style/train.json" "$work/adapter-$backend" \
    --work-dir "$work/work-$backend" --dataset-name style --spec "$(spec $backend "$extra")" \
    >"$OUT/train-$backend.log" 2>&1
  echo "$backend exit=$? seconds=$(( $(date +%s) - start ))" | tee -a "$OUT/summary.txt"
  cp "$work/adapter-$backend/train_metrics.json" "$OUT/train_metrics-$backend.json" 2>/dev/null
  cp "$work/work-$backend/llamafactory.yaml" "$OUT/llamafactory-$backend.yaml" 2>/dev/null
  tail -40 "$OUT/train-$backend.log"
done
