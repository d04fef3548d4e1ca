"""Benchmark ``ktflow evaluate`` (paper flavour) against the straightforward reference loop.

The baseline (and the oracle) is the KTransformers SFT metric as usually written: one
process, per sample jieba.cut both texts, four nltk sentence_bleu calls with
SmoothingFunction().method3, a new rouge_chinese Rouge, rounding to 4 decimals, then the
mean; jieba's dictionary is loaded before its clock starts. ktflow runs as the real CLI in
a fresh process each time (start-up, reading and checking the JSONL, scoring, writing
METRICS.json, the per-sample JSONL and provenance), so no cache survives between runs.
Runs are interleaved (baseline, ktflow -w1, ktflow -wN, baseline, ...); medians and
spreads are printed. Every per-sample score must equal the baseline's exactly (==), or
the benchmark exits 1.

    python benchmarks/metrics.py [--rows realistic|short] [--samples 10000] [--workers 2]
        [--repeat 3] [--seed 0] [--tmp DIR]

``realistic`` (default): benchmarks/metric_rows.py (English 30-200 words like medical
rationales, Chinese 20-150 words like dialogue replies, mixed scripts, ~1% blank
predictions). ``short``: the earlier 10-60 word synthetic pairs, kept for comparison.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jieba
from metric_rows import realistic_pairs
from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
from rouge_chinese import Rouge

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


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_ktflow(source: Path, out_dir: Path, workers: int) -> tuple[float, float, Scores]:
    """Wall and CPU seconds of one ``ktflow evaluate`` process (its workers included), and its rows."""
    metrics, per_sample = out_dir / f"metrics_w{workers}.json", out_dir / f"per_sample_w{workers}.jsonl"
    command = [sys.executable, "-m", "ktflow", "evaluate", str(source), "--task", "generation"]
    command += ["-o", str(metrics), "--per-sample", str(per_sample), "--workers", str(workers)]
    started, cpu = time.perf_counter(), children_cpu()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    seconds, cpu = time.perf_counter() - started, children_cpu() - cpu
    return seconds, cpu, [json.loads(line) for line in per_sample.read_text(encoding="utf-8").splitlines()]


def mismatches(want: Scores, got: Scores) -> int:
    """Rows whose scores differ from the oracle's in any way (exact comparison)."""
    return sum(any(w[key] != g[key] for key in KEYS) for w, g in zip(want, got, strict=True))


def write_predictions(path: Path, predictions: list[str], labels: list[str]) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        for index, (pred, label) in enumerate(zip(predictions, labels, strict=True)):
            row = {"id": index, "prompt": "", "predict": pred, "label": label}
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):7.2f} s ({min(values):.2f}-{max(values):.2f})"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rows", choices=("realistic", "short"), default="realistic")
    parser.add_argument("--samples", type=int, default=10_000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=3, help="interleaved rounds; medians are reported")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tmp", type=Path, default=None, help="directory for the JSONL files (real disk)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    make_pairs = realistic_pairs if args.rows == "realistic" else synthetic_pairs
    predictions, labels = make_pairs(args.samples, args.seed)
    # Load jieba's dictionary up front so the baseline's clock does not include it.
    jieba.setLogLevel(logging.INFO)
    jieba.initialize()

    counts = sorted({1, args.workers})
    names = ["baseline loop, 1 process"] + [f"ktflow evaluate --workers {w}" for w in counts]
    seconds: dict[str, list[float]] = {name: [] for name in names}
    cpu: dict[str, list[float]] = {name: [] for name in names}
    bad = 0
    with tempfile.TemporaryDirectory(prefix="ktflow-bench-metrics-", dir=args.tmp) as tmp:
        source = Path(tmp) / "predictions.jsonl"
        write_predictions(source, predictions, labels)
        for _ in range(args.repeat):
            started, cpu_started = time.perf_counter(), time.process_time()
            want = baseline(predictions, labels)
            seconds[names[0]].append(time.perf_counter() - started)
            cpu[names[0]].append(time.process_time() - cpu_started)
            for name, workers in zip(names[1:], counts, strict=True):
                took, used, rows = run_ktflow(source, Path(tmp), workers)
                seconds[name].append(took)
                cpu[name].append(used)
                bad += mismatches(want, rows)

    blank = sum(not text.strip() for text in predictions)
    print(f"{args.samples} {args.rows} pairs (seed {args.seed}, {blank} blank predictions), paper flavour,")
    print(f"{args.repeat} interleaved rounds. wall: median seconds (min-max); ratio: median over rounds of")
    print("baseline / ktflow in the same round (the load on a shared machine moves between rounds);")
    print("CPU: median CPU seconds of all its processes, and baseline CPU / its CPU")
    base_cpu = statistics.median(cpu[names[0]])
    for name in names:
        rounds = [b / t for b, t in zip(seconds[names[0]], seconds[name], strict=True)]
        used = statistics.median(cpu[name])
        print(
            f"{name:<30} {spread(seconds[name])} {statistics.median(rounds):6.2f}x "
            f"(rounds {', '.join(f'{r:.2f}' for r in rounds)})  CPU {used:7.2f} s {base_cpu / used:6.2f}x"
        )
    means = {key: sum(row[key] for row in want) / len(want) for key in KEYS}
    print("means: " + ", ".join(f"{key} {means[key]:.4f}" for key in KEYS))
    print(f"rows that differ from the baseline in any score: {bad}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
