"""Temporary: int8.py still imports the CPU probes from here; they live in :mod:`ktflow.host.cpu`.

Delete this module once int8.py (and tests/test_int8.py) import ``ktflow.host.cpu``.
"""

from ktflow.host.cpu import AMX_FLAGS, AVX512_FLAGS, cpu_flags, cpu_model, has_amx, has_avx512, missing_flags

__all__ = ["AMX_FLAGS", "AVX512_FLAGS", "cpu_flags", "cpu_model", "has_amx", "has_avx512", "missing_flags"]
