"""``python -m ktflow.train.launch train X.yaml``: LLaMA-Factory training with ktflow's GPU probe.

Runs in the backend's training environment (one process per GPU under ``accelerate
launch`` or ``torchrun``). It calls LLaMA-Factory's ``run_exp`` with the YAML's
arguments and ktflow's ``TrainerCallback``s: :mod:`ktflow.train.watch`'s, and one that
records, at the end of training, this process's peak GPU memory as torch's caching allocator saw it
(``torch.cuda.max_memory_allocated`` / ``max_memory_reserved``). Each rank writes
``ktflow_gpu_peak.rank<N>.json`` into the run's output_dir; ``ktflow train`` gathers them.
Any other command is handed to ``llamafactory-cli`` unchanged.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

GPU_PEAK_GLOB = "ktflow_gpu_peak.rank*.json"


def gpu_peak_record() -> dict[str, Any]:
    """This process's peak CUDA memory; the byte fields are None where there is no GPU."""
    import torch

    record: dict[str, Any] = {
        "rank": int(os.environ.get("RANK", "0")),
        "device": None,
        "max_allocated_bytes": None,
        "max_reserved_bytes": None,
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        device = torch.cuda.current_device()
        record["device"] = torch.cuda.get_device_name(device)
        record["max_allocated_bytes"] = int(torch.cuda.max_memory_allocated(device))
        record["max_reserved_bytes"] = int(torch.cuda.max_memory_reserved(device))
    return record


def gpu_peak_callback() -> Any:
    from transformers import TrainerCallback

    from ktflow.atomic import write_json

    class GpuPeak(TrainerCallback):  # type: ignore[misc]
        def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            record = gpu_peak_record()
            write_json(Path(args.output_dir) / f"ktflow_gpu_peak.rank{record['rank']}.json", record)

    return GpuPeak()


def main(argv: Sequence[str] | None = None) -> int:
    from ktflow.lf_launch import import_llamafactory
    from ktflow.lf_launch import main as lf_main

    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 2 or args[0] != "train" or not args[1].endswith((".yaml", ".yml")):
        return lf_main(args)
    import yaml

    import_llamafactory()
    from llamafactory.train.tuner import run_exp

    from ktflow.train.watch import STORAGE_EXIT, nonfinite_guard, storage_full, this_process_clock

    callbacks = [nonfinite_guard(), this_process_clock(), gpu_peak_callback()]
    training = yaml.safe_load(Path(args[1]).read_text(encoding="utf-8"))
    try:
        run_exp(args=training, callbacks=callbacks)
    except Exception as error:
        if not storage_full(error, Path(training["output_dir"])):
            raise
        return STORAGE_EXIT  # `ktflow train` reports it in one line: no traceback for a full disk
    return 0


if __name__ == "__main__":
    sys.exit(main())
