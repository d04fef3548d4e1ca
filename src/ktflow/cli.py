"""``ktflow <step>``: one command per pipeline step; the Snakemake rules call these.

Step modules are imported only for the command being run, so ``ktflow --help``
stays instant and a step never pays for another step's heavy imports.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from ktflow import __version__
from ktflow.errors import HardwareError, KtflowInputError

# command -> (module defining configure(parser) and main(args), one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "tiny-model": (
        "ktflow.tiny.model",
        "build the tiny DeepSeek-V3-layout FP8 'release' used by the default",
    ),
    "tiny-tasks": ("ktflow.tiny.tasks", "generate the seeded style-rewrite and multiple-choice tasks"),
    "fetch": ("ktflow.fetch", "get a model snapshot from a local directory or the Hugging Face hub"),
    "cast": ("ktflow.cast.cli", "cast an FP8 / INT4 checkpoint to BF16 (streaming, resumable, verified)"),
    "train": ("ktflow.train.run", "render the LLaMA-Factory YAML and run LoRA training"),
    "convert-lora": (
        "ktflow.steps.convert_lora",
        "convert a LoRA adapter (HF or KT) into a PEFT dir SGLang loads",
    ),
    "convert-int8": (
        "ktflow.steps.convert_int8",
        "convert BF16 routed experts to KT's CPU INT8 layout (AMX hosts)",
    ),
    "infer": ("ktflow.steps.infer", "batch inference for the base model or base + adapter"),
    "chat": ("ktflow.chat", "LLaMA-Factory's terminal chat on a finished run (base + adapter)"),
    "evaluate": ("ktflow.metrics", "score predictions: BLEU-1..4 / ROUGE-1/2/L or MCQ accuracy"),
    "prepare-data": ("ktflow.datasets.cli", "raw data set (AfriMed-QA, NekoQA, ...) -> task files"),
    "tables": ("ktflow.tables", "collect metrics into tables in the paper's layout"),
    "plots": ("ktflow.plots", "training-loss curves and base-vs-LoRA metric bars (PNG)"),
    "doctor": ("ktflow.doctor", "preflight: CPU flags, GPUs, versions and memory estimates"),
    "status": (
        "ktflow.status",
        "which steps are up to date for the current config, which would rerun, and why",
    ),
}


def _build_parser(command: str | None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ktflow", description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--version", action="version", version=f"ktflow {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="<step>", required=True)
    for name, (module_name, help_text) in COMMANDS.items():
        step = sub.add_parser(name, help=help_text, description=help_text)
        if name == command:
            module = importlib.import_module(module_name)
            module.configure(step)
            step.set_defaults(func=module.main)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in args_list if not a.startswith("-")), None)
    parser = _build_parser(command if command in COMMANDS else None)
    args = parser.parse_args(args_list)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    try:
        result = args.func(args)
    except KtflowInputError as error:
        print(f"ktflow {args.command}: error: {error.format()}", file=sys.stderr)
        return 2
    except HardwareError as error:
        print(f"ktflow {args.command}: hardware: {error}", file=sys.stderr)
        return 3
    except OSError as error:
        from ktflow.atomic import write_fault  # only on the error path: start-up stays light

        line = write_fault(error)
        if line is None:
            raise
        print(f"ktflow {args.command}: error: {line}", file=sys.stderr)
        return 2
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
