"""Benchmark ``ktflow infer`` (hf backend) against LLaMA-Factory's predict mode.

    python benchmarks/infer.py                         # tiny model, 240 prompts, batch 16
    python benchmarks/infer.py --rows 60 --batch-size 32 --repeat 3
    python benchmarks/infer.py --model results/models/tiny-v3/bf16 \\
        --adapter results/lora/tiny-v3/style/adapter --test results/data/style/test.json

Same model, adapter, prompts, greedy decoding, max_new_tokens and batch size for both:

- ktflow: ``ktflow infer MODEL TEST OUT --adapter A --spec {"backend": "hf", ...}``;
- LLaMA-Factory: ``python -m ktflow.lf_launch train predict.yaml`` with stage sft,
  do_predict, predict_with_generate, eval_dataset, adapter_name_or_path, use_cpu.

Each runs in a fresh process (this file re-executed as a worker) that times, with one
instrument for both, every ``model.generate`` call; the table also gives the process wall
time (imports and model loading included) and each tool's own timer of its prediction
loop (ktflow's ``generate_s``; LLaMA-Factory's ``predict_runtime``, which also covers its
BLEU/ROUGE pass). Predictions are compared row by row. Without --model, a finished
default run under results/ is used if there is one, else a tiny model and a random
(seeded) LoRA adapter are built under --out. Prompts: the tiny style task's generator.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
THREADS_ENV = "KTFLOW_BENCH_THREADS"
sys.path.insert(0, str(ROOT / "src"))


def time_generate(report: Path) -> None:
    """Wrap transformers' generate so the worker records the time spent inside it."""
    import atexit

    import torch
    from transformers.generation.utils import GenerationMixin

    original = GenerationMixin.generate
    spent: dict[str, Any] = {"generate_s": 0.0, "calls": 0}

    def timed(self: Any, *args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return original(self, *args, **kwargs)
        finally:
            spent["generate_s"] += time.perf_counter() - start
            spent["calls"] += 1
            spent["dtype"] = str(getattr(self, "dtype", None))
            spent["threads"] = torch.get_num_threads()

    GenerationMixin.generate = timed  # type: ignore[method-assign]
    atexit.register(lambda: report.write_text(json.dumps(spent)))


def worker(tool: str, report: Path, argv: list[str]) -> int:
    time_generate(report)
    if THREADS_ENV in os.environ:  # --threads: the same intra-op thread count for both tools
        import torch

        torch.set_num_threads(int(os.environ[THREADS_ENV]))
    if tool == "ktflow":
        from ktflow.cli import main as ktflow_main

        return int(ktflow_main(argv))
    from ktflow.lf_launch import main as lf_main

    return int(lf_main(argv))


def build_inputs(out: Path, rows: int, model: Path | None, adapter: Path | None) -> tuple[Path, Path, Path]:
    from ktflow.tiny.tasks import write_task

    write_task("style", out / "task", seed=7, n_train=1, n_test=rows)
    test = out / "task" / "test.json"
    finished = ROOT / "results"
    if model is None and (finished / "lora/tiny-v3/style/adapter/adapter_config.json").is_file():
        model, adapter = finished / "models/tiny-v3/bf16", finished / "lora/tiny-v3/style/adapter"
    if model is None:
        from ktflow.cast import cast_checkpoint
        from ktflow.tiny.model import build_release

        build_release(out / "release", seed=0, vocab_size=1024, n_shards=4)
        cast_checkpoint(out / "release", out / "bf16", workers=1, progress=False)
        model = out / "bf16"
    if adapter is None:
        adapter = random_adapter(model, out / "adapter")
    return model, adapter, test


def checkpoint_in(model_dir: Path, dtype: str, out: Path) -> Path:
    """LLaMA-Factory's predict mode loads a checkpoint in its own dtype (torch_dtype "auto"), so
    both tools get a copy saved in the dtype under test."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if json.loads((model_dir / "config.json").read_text()).get("dtype") == dtype:
        return model_dir
    target = out / f"model-{dtype}"
    if not (target / "config.json").is_file():
        AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).save_pretrained(
            str(target)
        )
        AutoTokenizer.from_pretrained(model_dir).save_pretrained(str(target))
    return target


def random_adapter(model_dir: Path, out: Path) -> Path:
    import peft
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    targets = ["q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj", "gate_proj", "up_proj",
               "down_proj"]  # fmt: skip
    config = peft.LoraConfig(r=16, lora_alpha=32, target_modules=targets, init_lora_weights="gaussian")
    peft.get_peft_model(base, config).save_pretrained(str(out))
    return out


def run_tool(tool: str, argv: list[str], work: Path, threads: int | None) -> dict[str, Any]:
    report = work / f"{tool}.generate.json"
    command = [sys.executable, __file__, "--worker", tool, str(report), "--", *argv]
    env = dict(os.environ)
    if threads is not None:
        env[THREADS_ENV] = str(threads)
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
    wall = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"{tool} failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return {"wall_s": wall, **json.loads(report.read_text())}


def run_ktflow(model: Path, adapter: Path, test: Path, work: Path, spec: dict[str, Any]) -> dict[str, Any]:
    out = work / "ktflow.jsonl"
    for stale in work.glob("ktflow.*"):
        stale.unlink()
    argv = ["infer", str(model), str(test), str(out), "--adapter", str(adapter), "--spec", json.dumps(spec)]
    facts = run_tool("ktflow", argv, work, spec.get("threads"))
    extra = json.loads(out.with_suffix(".provenance.json").read_text())["extra"]
    predictions = [json.loads(line)["predict"] for line in out.read_text().splitlines()]
    return {**facts, "loop_s": extra["generate_s"], "predictions": predictions}


def run_llamafactory(
    model: Path, adapter: Path, test: Path, work: Path, spec: dict[str, Any]
) -> dict[str, Any]:
    import yaml

    data_dir, output_dir = work / "lf-data", work / "lf-out"
    shutil.rmtree(output_dir, ignore_errors=True)
    data_dir.mkdir(exist_ok=True)
    columns = {"prompt": "instruction", "query": "input", "response": "output"}
    info = {"bench": {"file_name": str(test.resolve()), "columns": columns}}
    (data_dir / "dataset_info.json").write_text(json.dumps(info))
    args = {
        "model_name_or_path": str(model), "adapter_name_or_path": str(adapter), "finetuning_type": "lora",
        "stage": "sft", "do_predict": True, "predict_with_generate": True, "eval_dataset": "bench",
        "dataset_dir": str(data_dir), "cutoff_len": 1024, "output_dir": str(output_dir),
        "overwrite_output_dir": True, "per_device_eval_batch_size": spec["batch_size"],
        "max_new_tokens": spec["max_new_tokens"], "do_sample": False, "use_cpu": True,
        "report_to": "none", "dataloader_num_workers": 0, "seed": spec["seed"],
    }  # fmt: skip
    config = work / "lf-predict.yaml"
    config.write_text(yaml.safe_dump(args))
    facts = run_tool("llamafactory", ["train", str(config)], work, spec.get("threads"))
    metrics = json.loads((output_dir / "predict_results.json").read_text())
    lines = (output_dir / "generated_predictions.jsonl").read_text().splitlines()
    return {
        **facts,
        "loop_s": metrics["predict_runtime"],
        "predictions": [json.loads(x)["predict"] for x in lines],
    }


def count_tokens(model: Path, texts: list[str]) -> int:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    return sum(len(tokenizer(text, add_special_tokens=False)["input_ids"]) for text in texts)


def table(
    results: dict[tuple[str, int], dict[str, Any]], rows: int, tokens: dict[tuple[str, int], int]
) -> str:
    """One line per (tool, batch); ratios vs LLaMA-Factory at the first batch size and at the same one."""
    first = min(batch for _, batch in results)
    baseline = results[("llamafactory", first)]
    header = (
        f"{'system':<14}{'batch':>6}{'threads':>8}{'dtype':>9}{'wall s':>8}{'loop s':>8}{'gen s':>7}"
        f"{'rows/s':>8}{'tok/s':>7}{'x wall':>8}{'x loop':>8}{'x gen':>7}{'x gen same batch':>18}"
    )
    lines = [header]
    for (tool, batch), r in results.items():
        same = results[("llamafactory", batch)]
        lines.append(
            f"{tool:<14}{batch:>6}{r['threads']:>8}{r['dtype'].removeprefix('torch.'):>9}{r['wall_s']:>8.2f}"
            f"{r['loop_s']:>8.2f}{r['generate_s']:>7.2f}{rows / r['generate_s']:>8.1f}"
            f"{tokens[(tool, batch)] / r['generate_s']:>7.0f}"
            f"{baseline['wall_s'] / r['wall_s']:>8.2f}{baseline['loop_s'] / r['loop_s']:>8.2f}"
            f"{baseline['generate_s'] / r['generate_s']:>7.2f}{same['generate_s'] / r['generate_s']:>18.2f}"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=240, help="prompts (tiny style task generator)")
    parser.add_argument("--test", type=Path, default=None, help="alpaca test file instead of --rows prompts")
    parser.add_argument("--model", type=Path, default=None, help="BF16 model dir")
    parser.add_argument("--adapter", type=Path, default=None, help="LoRA adapter dir")
    parser.add_argument(
        "--batch-sizes", type=int, nargs="+", default=[8, 16, 64],
        help="each for both tools (LF: per_device_eval_batch_size); first = baseline",
    )  # fmt: skip
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument(
        "--dtype", default="float32", choices=["float32", "bfloat16"],
        help="both tools (float32: the default config's; BF16 is slow on CPUs without AMX)",
    )  # fmt: skip
    parser.add_argument(
        "--threads", type=int, default=None,
        help="torch intra-op threads for both tools (default: each tool's own choice; ktflow uses 1 for "
        "small models, LLaMA-Factory torch's default)",
    )  # fmt: skip
    parser.add_argument("--repeat", type=int, default=1, help="runs per tool; the fastest is reported")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/out/infer")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    model, adapter, test = build_inputs(args.out, args.rows, args.model, args.adapter)
    model = checkpoint_in(model, args.dtype, args.out)
    test = args.test or test
    rows = len(json.loads(test.read_text()))
    runners = {"llamafactory": run_llamafactory, "ktflow hf": run_ktflow}
    runs: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for _ in range(args.repeat):  # interleaved, so a busy spell on a shared host hits both tools
        for batch in args.batch_sizes:
            spec = {"backend": "hf", "dtype": args.dtype, "batch_size": batch,
                    "max_new_tokens": args.max_new_tokens, "do_sample": False, "seed": 42}  # fmt: skip
            if args.threads is not None:
                spec["threads"] = args.threads
            for name, runner in runners.items():
                runs.setdefault((name, batch), []).append(runner(model, adapter, test, args.out, spec))
    results = {key: min(done, key=lambda r: r["generate_s"]) for key, done in runs.items()}
    tokens = {key: count_tokens(model, r["predictions"]) for key, r in results.items()}
    reference = results[("llamafactory", args.batch_sizes[0])]["predictions"]
    threads = args.threads or "each tool's default"
    print(f"model {model}\nadapter {adapter}\nprompts {rows} from {test}; max_new_tokens "
          f"{args.max_new_tokens}, greedy; threads: {threads}; best of {args.repeat} (by generate time)"
          )  # fmt: skip
    print(table(results, rows, tokens))
    for key, r in results.items():
        same = sum(a.strip() == b.strip() for a, b in zip(r["predictions"], reference, strict=True))
        print(f"{key[0]} batch {key[1]}: {r['calls']} generate calls, {same}/{rows} predictions identical "
              f"to llamafactory batch {args.batch_sizes[0]}")  # fmt: skip
    print("wall: process start to predictions written (imports, model load; LF also runs its BLEU/ROUGE "
          "pass); loop: each tool's own timer (ktflow generate_s, LF predict_runtime); gen: time inside "
          "model.generate, same instrument for both")  # fmt: skip
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 3 and sys.argv[1] == "--worker":
        tool, report, rest = sys.argv[2], Path(sys.argv[3]), sys.argv[4:]
        sys.exit(worker(tool, report, rest[1:] if rest[:1] == ["--"] else rest))
    sys.exit(main())
