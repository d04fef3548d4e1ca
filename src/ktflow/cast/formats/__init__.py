"""Checkpoint weight formats: one class per format (one file each) and the registry that picks one.

``FORMATS`` maps a config's ``quantization_config.quant_method`` to its format; a config without
a quantization config is ``UNQUANTIZED``. Each format parses its own settings (``from_config``).
"""

from __future__ import annotations

from ktflow.cast.formats.base import WeightFormat
from ktflow.cast.formats.bf16 import Bf16Passthrough
from ktflow.cast.formats.fp8_block import Fp8Block
from ktflow.cast.formats.int4_pack import Int4Pack

FORMATS: dict[str, type[WeightFormat]] = {fmt.quant_method: fmt for fmt in (Fp8Block, Int4Pack)}
UNQUANTIZED: type[WeightFormat] = Bf16Passthrough
