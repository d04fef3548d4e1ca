"""What ktflow watches inside the LLaMA-Factory process, as transformers ``TrainerCallback``s.

:mod:`ktflow.train.launch` hands these to LLaMA-Factory's ``run_exp(callbacks=...)``, so they
run in the training process (every rank) without patching either library.

- ``NonFiniteGuard``: a non-finite ``loss`` or ``grad_norm`` in a logged step stops training
  at once: the first rank to see it records the step, epoch and value in
  ``ktflow_nonfinite.json`` and every rank exits with ``NONFINITE_EXIT``, so LLaMA-Factory
  never saves a final adapter. ``grad_norm`` is the reliable signal: transformers'
  ``logging_nan_inf_filter`` replaces a NaN loss by the running mean before it is logged,
  while a NaN gradient norm is logged as it is.
- ``ThisProcessClock``: the steps, input tokens and wall time of the training this process
  ran (from ``on_train_begin``, after a resumed checkpoint's state is loaded, to
  ``on_train_end``), in ``ktflow_this_process.json``: after a resume, throughput counts only
  these, never the checkpoint's tokens over this process's time.
"""

from __future__ import annotations

import errno
import json
import math
import shutil
import time
from pathlib import Path
from typing import Any

NONFINITE_RECORD = "ktflow_nonfinite.json"
NONFINITE_EXIT = 86
WATCHED = ("loss", "grad_norm")
THIS_PROCESS_RECORD = "ktflow_this_process.json"
STORAGE_EXIT = 87
_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
# torch's zip writer reports a short write on a full disk as "unexpected pos", with no errno:
# a failure while the output's file system has less than this free counts as a full disk.
LOW_SPACE = 64 << 20


def first_nonfinite(logs: dict[str, Any]) -> tuple[str, float] | None:
    """The first watched key of one log entry whose value is NaN or infinite."""
    for key in WATCHED:
        value = logs.get(key)
        if isinstance(value, int | float) and not math.isfinite(value):
            return key, float(value)
    return None


def nonfinite_record(step: int, epoch: float | None, key: str, value: float) -> dict[str, Any]:
    # JSON has no NaN: the value is kept as its repr ("nan", "inf", "-inf").
    return {"step": step, "epoch": epoch, "key": key, "value": repr(value)}


def describe_nonfinite(record: dict[str, Any]) -> str:
    epoch = record.get("epoch")
    when = f"step {record['step']}" + (f" (epoch {epoch:.2f})" if isinstance(epoch, int | float) else "")
    return f"{when}: {record['key']} is {record['value']}"


def nonfinite_guard() -> Any:
    from transformers import TrainerCallback

    from ktflow.atomic import write_json

    class NonFiniteGuard(TrainerCallback):  # type: ignore[misc]
        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
            found = first_nonfinite(logs or {})
            if found is None:
                return
            if state.is_world_process_zero:
                record = nonfinite_record(state.global_step, state.epoch, *found)
                write_json(Path(args.output_dir) / NONFINITE_RECORD, record)
            raise SystemExit(NONFINITE_EXIT)  # before any save: no adapter from non-finite weights

    return NonFiniteGuard()


def read_nonfinite(run_dir: Path) -> dict[str, Any] | None:
    path = run_dir / NONFINITE_RECORD
    return json.loads(path.read_text()) if path.is_file() else None


def this_process_clock() -> Any:
    from transformers import TrainerCallback

    from ktflow.atomic import write_json

    class ThisProcessClock(TrainerCallback):  # type: ignore[misc]
        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.start = (time.monotonic(), state.global_step, state.num_input_tokens_seen)

        def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            started, first_step, first_tokens = self.start
            if state.is_world_process_zero:
                record = {
                    "resumed_from_step": first_step or None,
                    "steps_run": state.global_step - first_step,
                    "tokens_run": state.num_input_tokens_seen - first_tokens,
                    "seconds": time.monotonic() - started,
                }
                write_json(Path(args.output_dir) / THIS_PROCESS_RECORD, record)

    return ThisProcessClock()


def read_this_process(run_dir: Path) -> dict[str, Any] | None:
    path = run_dir / THIS_PROCESS_RECORD
    return json.loads(path.read_text()) if path.is_file() else None


def storage_full(error: BaseException, output_dir: Path) -> bool:
    """Whether ``error`` is a write refused for lack of space (in its chain, or ``output_dir`` full)."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in _FULL:
            return True
        seen = seen.__cause__ or seen.__context__
    try:
        return shutil.disk_usage(output_dir).free < LOW_SPACE
    except OSError:
        return False
