"""``ktflow convert-lora``: turn an HF- or KT-backend LoRA adapter into one PEFT dir SGLang loads."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ktflow.convert_lora.convert import convert_adapter
from ktflow.convert_lora.converters import IMPLEMENTATIONS


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("adapter_dir", type=Path, help="LoRA output of LLaMA-Factory (HF or KT backend)")
    parser.add_argument("out_dir", type=Path, help="PEFT adapter dir to write for SGLang --lora-paths")
    parser.add_argument(
        "--base-model", required=True, help="base model dir (or id) recorded in adapter_config.json"
    )
    parser.add_argument("--lora-alpha", type=float, default=None, help="only if adapter_config.json lacks it")
    parser.add_argument(
        "--implementation",
        choices=IMPLEMENTATIONS,
        default="auto",
        help="auto: kt_kernel's converter for KT adapters when importable, else built-in",
    )


def main(args: argparse.Namespace) -> int:
    report = convert_adapter(
        args.adapter_dir, args.out_dir, args.base_model, args.lora_alpha, args.implementation
    )
    print(json.dumps(report.as_dict(), indent=2))
    return 0
