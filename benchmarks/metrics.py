"""Benchmark ``ktflow evaluate`` (paper flavour) against a straightforward scoring loop.

The baseline is the KTransformers SFT metric as usually written: one process, per
sample jieba.cut both texts, four nltk sentence_bleu calls, a new rouge_chinese
Rouge, rounding, then the mean. ktflow's evaluate runs end to end (read + check the
JSONL, score, write METRICS.json and the per-sample JSONL) in this process. The
numbers must agree to 1e-9 per sample or the benchmark fails.

    python benchmarks/metrics.py [--samples 10000] [--workers 2] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import sys
import tempfile
import time
from pathlib import Path

import jieba
from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
from rouge_chinese import Rouge

from ktflow import cli

KEYS = ("bleu-1", "bleu-2", "bleu-3", "bleu-4", "rouge-1", "rouge-2", "rouge-l")
WEIGHTS = ((1, 0, 0, 0), (0.5, 0.5, 0, 0), (1 / 3, 1 / 3, 1 / 3, 0), (0.25, 0.25, 0.25, 0.25))
EN_WORDS = [
    "the", "a", "of", "to", "and", "in", "is", "that", "for", "it", "on", "with", "as", "was", "be",
    "by", "this", "are", "from", "at", "or", "an", "model", "training", "data", "expert", "weights",
    "memory", "kernel", "layer", "token", "answer", "patient", "fever", "cough", "treatment", "doctor",
    "hospital", "malaria", "infection", "dose", "blood", "test", "result", "question", "clinic",
    "health", "care", "child", "mother", "fine", "tune", "adapter", "rank", "learning", "rate", "batch",
    "epoch", "loss", "speed", "throughput", "GPU", "CPU", "offload",
]  # fmt: skip
ZH_WORDS = [
    "我们", "模型", "训练", "数据", "专家", "权重", "内存", "显存", "微调", "推理", "速度", "患者",
    "发烧", "咳嗽", "治疗", "医生", "医院", "疟疾", "感染", "剂量", "血液", "检测", "结果", "问题",
    "诊所", "健康", "儿童", "母亲", "学习", "批次", "损失", "吞吐", "计算", "卸载", "的", "了",
    "是", "在", "和", "有", "也", "就", "都", "很", "非常", "可以", "需要", "因为",
    "所以", "但是", "如果", "这个", "那个", "一个", "已经", "还是", "没有", "今天", "明天",
]  # fmt: skip
PUNCT = ("，", "。", "！", "？", "、")


def _english(rng: random.Random) -> str:
    words = [rng.choice(EN_WORDS) for _ in range(rng.randint(10, 60))]
    return " ".join(words).capitalize() + rng.choice((".", "!", "?"))


def _chinese(rng: random.Random) -> str:
    parts = []
    for _ in range(rng.randint(6, 30)):
        parts.append(rng.choice(ZH_WORDS))
        if rng.random() < 0.15:
            parts.append(rng.choice(PUNCT))
    return "".join(parts) + "。"


def _perturb(text: str, rng: random.Random, chinese: bool) -> str:
    """A 'prediction' that shares much but not all of the label's n-grams."""
    if chinese:
        return "".join(rng.choice(ZH_WORDS) if rng.random() < 0.1 else char for char in text)
    words = [rng.choice(EN_WORDS) if rng.random() < 0.3 else word for word in text.split()]
    return " ".join(words[: max(1, len(words) - rng.randint(0, 5))])


def synthetic_pairs(count: int, seed: int) -> tuple[list[str], list[str]]:
    """Deterministic English, Chinese and mixed pairs, with an occasional blank prediction."""
    rng = random.Random(seed)
    predictions, labels = [], []
    for index in range(count):
        kind = index % 5
        if kind in (0, 1):
            label = _english(rng)
            predict = _perturb(label, rng, chinese=False)
        elif kind in (2, 3):
            label = _chinese(rng)
            predict = _perturb(label, rng, chinese=True)
        else:
            label = _chinese(rng) + " " + _english(rng)
            predict = _perturb(label, rng, chinese=True)
        predictions.append("" if rng.random() < 0.01 else predict)
        labels.append(label)
    return predictions, labels


def baseline(predictions: list[str], labels: list[str]) -> list[dict[str, float]]:
    rows = []
    for pred, label in zip(predictions, labels, strict=True):
        hypothesis = list(jieba.cut(pred))
        reference = list(jieba.cut(label))
        if len(" ".join(hypothesis).split()) == 0 or len(" ".join(reference).split()) == 0:
            rows.append(dict.fromkeys(KEYS, 0.0))
            continue
        row = {}
        for n, weights in enumerate(WEIGHTS, start=1):
            score = sentence_bleu(
                [reference], hypothesis, weights=weights, smoothing_function=SmoothingFunction().method3
            )
            row[f"bleu-{n}"] = round(score * 100, 4)
        rouge = Rouge().get_scores(" ".join(hypothesis), " ".join(reference))[0]
        for key in ("rouge-1", "rouge-2", "rouge-l"):
            row[key] = round(rouge[key]["f"] * 100, 4)
        rows.append(row)
    return rows


Scores = list[dict[str, float]]


def run_ktflow(source: Path, out_dir: Path, workers: int) -> tuple[float, dict[str, float], Scores]:
    metrics, per_sample = out_dir / f"metrics_w{workers}.json", out_dir / f"per_sample_w{workers}.jsonl"
    args = ["evaluate", str(source), "--task", "generation", "-o", str(metrics)]
    args += ["--per-sample", str(per_sample), "--workers", str(workers)]
    started = time.perf_counter()
    if cli.main(args) != 0:
        raise SystemExit("ktflow evaluate failed")
    seconds = time.perf_counter() - started
    rows = [json.loads(line) for line in per_sample.read_text(encoding="utf-8").splitlines()]
    return seconds, json.loads(metrics.read_text(encoding="utf-8")), rows


def mismatches(want: list[dict[str, float]], got: list[dict[str, float]]) -> int:
    return sum(any(abs(w[key] - g[key]) > 1e-9 for key in KEYS) for w, g in zip(want, got, strict=True))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--samples", type=int, default=10_000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    predictions, labels = synthetic_pairs(args.samples, args.seed)
    # Load jieba's dictionary up front so neither timing includes it.
    jieba.setLogLevel(logging.INFO)
    jieba.initialize()

    started = time.perf_counter()
    want = baseline(predictions, labels)
    base_seconds = time.perf_counter() - started
    want_means = {key: sum(row[key] for row in want) / len(want) for key in KEYS}

    results = [("baseline loop, 1 process", base_seconds, want_means, want)]
    with tempfile.TemporaryDirectory(prefix="ktflow-bench-metrics-") as tmp:
        source = Path(tmp) / "predictions.jsonl"
        with open(source, "w", encoding="utf-8") as handle:
            for index, (pred, label) in enumerate(zip(predictions, labels, strict=True)):
                row = {"id": index, "prompt": "", "predict": pred, "label": label}
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")
        for workers in sorted({1, args.workers}):
            seconds, means, rows = run_ktflow(source, Path(tmp), workers)
            results.append((f"ktflow evaluate --workers {workers}", seconds, means, rows))

    print(f"{args.samples} synthetic English/Chinese/mixed pairs (seed {args.seed}), paper flavour")
    print(f"{'run':<30} {'seconds':>8} {'samples/s':>10} {'vs baseline':>12} {'rows != baseline':>17}")
    failed = False
    for name, seconds, means, rows in results:
        bad = mismatches(want, rows)
        bad += sum(abs(means[key] - want_means[key]) > 1e-9 for key in KEYS)
        failed |= bad > 0
        ratio = base_seconds / seconds
        print(f"{name:<30} {seconds:>8.2f} {args.samples / seconds:>10.0f} {ratio:>11.2f}x {bad:>17}")
    print("means: " + ", ".join(f"{key} {want_means[key]:.4f}" for key in KEYS))
    if failed:
        print("MISMATCH: ktflow's numbers differ from the baseline", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
