"""Check a cast output directory: index, shards, dtypes and shapes (against the source when given).

By default only headers are read, so the check that closes every cast takes seconds on 1.3 TB
(the cast itself refuses non-finite values as it writes them). ``values=True`` (what
``ktflow cast --verify`` does) also reads every float tensor and counts NaN / Inf: a disk read of
the whole output.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ktflow.cast.detect import quantization_config
from ktflow.cast.plan import CONFIG_NAME, INDEX_NAME, build_plan, load_json
from ktflow.cast.shards import Entry, Reader
from ktflow.errors import KtflowInputError
from ktflow.nonfinite import FLOAT_DTYPES, count_nonfinite, nonfinite_message
from ktflow.readers.safetensors_header import TensorSlot, read_header

# Tensor-name endings that only a quantized checkpoint has.
QUANT_SUFFIXES = ("_scale_inv", ".weight_packed", ".weight_scale", ".weight_shape", ".weight_zero_point")
FP8_DTYPES = ("F8_E4M3", "F8_E5M2")


@dataclass(frozen=True)
class Problem:
    path: str
    field: str | None
    message: str


@dataclass
class VerifyReport:
    dst: str
    shards: int = 0
    tensors: int = 0
    total_size: int = 0
    against_source: bool = False
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def add(self, path: Path | str, name: str | None, message: str) -> None:
        self.problems.append(Problem(str(path), name, message))

    def raise_if_failed(self) -> None:
        if self.problems:
            first = self.problems[0]
            more = f" (and {len(self.problems) - 1} more problems)" if len(self.problems) > 1 else ""
            raise KtflowInputError(first.path, first.field, first.message + more)


def verify_checkpoint(dst: Path, src: Path | None = None, values: bool = False) -> VerifyReport:
    """Confirm every indexed tensor is present and intact; with ``src``, that names, dtypes and shapes
    are exactly what the cast of ``src`` must produce (INT4: the ``weight_shape`` recorded in the source);
    with ``values``, that no float tensor holds a NaN or Inf."""
    dst = Path(dst)
    report = VerifyReport(str(dst), against_source=src is not None)
    try:
        config = load_json(dst / CONFIG_NAME)
        index = load_json(dst / INDEX_NAME)
    except KtflowInputError as error:
        report.add(error.path or dst, error.field, error.message)
        return report
    key, quant = quantization_config(config)
    if quant is not None:
        report.add(dst / CONFIG_NAME, key, "still present in a bf16 model config")
    found = _indexed_tensors(dst, index, report)
    listed_size = (index.get("metadata") or {}).get("total_size")
    report.total_size = sum(slot.nbytes for slot in found.values())
    if listed_size != report.total_size:
        report.add(
            dst / INDEX_NAME,
            "metadata.total_size",
            f"is {listed_size}, tensors hold {report.total_size} bytes",
        )
    if src is None:
        _check_unquantized(found, report)
    else:
        plan = build_plan(Path(src))
        _check_against(
            found, {out.entry.name: out.entry for shard in plan.shards for out in shard.tensors}, report
        )
    if values:
        _check_finite(found, report)
    return report


def _check_finite(found: dict[str, TensorSlot], report: VerifyReport, chunk: int = 1 << 23) -> None:
    reader = Reader()
    buffer, scratch = np.empty(chunk, dtype=np.uint8), np.empty(chunk, dtype=np.uint8)
    try:
        for name, slot in sorted(found.items(), key=lambda item: (item[1].path, item[1].start)):
            kind = FLOAT_DTYPES.get(slot.dtype)
            if kind is None:
                continue
            bits_type, exponent = kind
            bad = 0
            for offset in range(0, slot.nbytes, chunk):
                piece = buffer[: min(chunk, slot.nbytes - offset)]
                reader.readinto(slot, offset, piece.data)
                bad += count_nonfinite(piece.view(bits_type), exponent, scratch.view(bits_type))
            if bad:
                report.add(slot.path, name, nonfinite_message(bad, slot.numel, slot.dtype))
    finally:
        reader.close()


def _indexed_tensors(dst: Path, index: dict[str, object], report: VerifyReport) -> dict[str, TensorSlot]:
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        report.add(dst / INDEX_NAME, "weight_map", "missing or empty")
        return {}
    headers: dict[str, dict[str, TensorSlot]] = {}
    for file in sorted(set(weight_map.values())):
        try:
            headers[file] = read_header(dst / str(file))
        except KtflowInputError as error:
            report.add(error.path or dst / str(file), error.field, error.message)
    report.shards = len(headers)
    found: dict[str, TensorSlot] = {}
    for name, file in weight_map.items():
        slots = headers.get(file)
        if slots is None:
            continue
        if name not in slots:
            report.add(dst / str(file), name, "listed in the index but not in the shard")
        else:
            found[name] = slots[name]
    for file, slots in headers.items():
        for name in slots.keys() - weight_map.keys():
            report.add(dst / file, name, "in the shard but not in the index")
    report.tensors = len(found)
    return found


def _check_unquantized(found: dict[str, TensorSlot], report: VerifyReport) -> None:
    for name, slot in found.items():
        if slot.dtype in FP8_DTYPES:
            report.add(slot.path, name, f"dtype {slot.dtype}: still quantized")
        elif name.endswith(QUANT_SUFFIXES):
            report.add(slot.path, name, "quantization parameter left in a bf16 model")


def _check_against(found: dict[str, TensorSlot], expected: dict[str, Entry], report: VerifyReport) -> None:
    for name in sorted(expected.keys() - found.keys()):
        report.add(report.dst, name, "missing from the output")
    for name in sorted(found.keys() - expected.keys()):
        report.add(found[name].path, name, "not produced by casting the source")
    for name in sorted(found.keys() & expected.keys()):
        slot, want = found[name], expected[name]
        if (slot.dtype, slot.shape) != (want.dtype, want.shape):
            report.add(
                slot.path,
                name,
                f"is {slot.dtype} {list(slot.shape)}, expected {want.dtype} {list(want.shape)}",
            )
