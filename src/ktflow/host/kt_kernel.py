"""Which kt-kernel CPU build this host loads, and what an installed kt_kernel says about itself.

kt-kernel serves KT training, inference and the CPU INT8 conversion alike, so its reading
of the host lives here rather than in one family.
"""

from __future__ import annotations

import json
from typing import Any

from ktflow.host.cpu import has_flag
from ktflow.host.system import run_quiet

KT_FLAGS = ("amx_tile", "amx_bf16", "amx_int8", "avx512f", "avx512bw", "avx512_vnni", "avx512_vbmi",
            "avx512_bf16", "avx2")  # fmt: skip
# kt-kernel 0.7.2 ships one CPU build per row and loads the first whose flags the host has
# (kt_kernel/_cpu_detect.py).
KT_VARIANTS = (
    ("amx", ("amx_tile", "amx_int8", "amx_bf16", "avx512f", "avx512bw", "avx512_vnni", "avx512_vbmi",
             "avx512_bf16")),
    ("avx512_bf16", ("avx512f", "avx512bw", "avx512_vnni", "avx512_vbmi", "avx512_bf16")),
    ("avx512_vbmi", ("avx512f", "avx512bw", "avx512_vnni", "avx512_vbmi")),
    ("avx512_vnni", ("avx512f", "avx512bw", "avx512_vnni")),
    ("avx512_base", ("avx512f", "avx512bw")),
    ("avx2", ("avx2",)),
)  # fmt: skip


def kt_variant(flags: frozenset[str]) -> str | None:
    return next((name for name, need in KT_VARIANTS if all(has_flag(flags, f) for f in need)), None)


def kt_probe(python: str) -> dict[str, Any]:
    """Import kt_kernel in a child process (a wrong CPU build can kill its importer) and ask it."""
    code = (
        "import json, kt_kernel; ext = kt_kernel.kt_kernel_ext; moe = getattr(ext, 'moe', None)\n"
        "print(json.dumps({'variant': getattr(kt_kernel, '__cpu_variant__', None),"
        " 'sft': hasattr(moe, 'AMXBF16_SFT_MOE')}))"
    )
    output = run_quiet([python, "-c", code], timeout=120)
    if output is None:
        return {"error": f"`import kt_kernel` failed in {python}"}
    parsed: dict[str, Any] = json.loads(output.splitlines()[-1])
    return parsed
