"""``ktflow train``: validate data, render the YAML, run LLaMA-Factory, publish the adapter."""

from __future__ import annotations

import argparse
from pathlib import Path

from ktflow.train.datasets import HUB_PREFIX
from ktflow.train.spec import TrainSpec, training_block
from ktflow.train.training import train


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model_dir", type=Path, help="BF16 base model directory")
    parser.add_argument(
        "train_file", help=f"training data: a JSON list or JSONL file, or {HUB_PREFIX}<repo> (hub data set)"
    )
    parser.add_argument("out_dir", type=Path, help="where the finished adapter is published")
    parser.add_argument(
        "--work-dir", type=Path, required=True, help="LLaMA-Factory output_dir parent (checkpoints)"
    )
    parser.add_argument("--dataset-name", default="train")
    parser.add_argument("--spec", required=True, help="JSON of the task's effective training block")
    parser.add_argument("--results-dir", type=Path, default=Path("results"), help="for doctor's disk check")
    parser.add_argument("--render-only", action="store_true", help="write the YAMLs, then stop")


def main(args: argparse.Namespace) -> int:
    training = training_block(args.spec, "--spec")
    spec = TrainSpec.from_config(
        training,
        model_dir=args.model_dir.resolve(),
        dataset_dir=(args.work_dir / "data").resolve(),
        dataset=args.dataset_name,
        output_dir=(args.work_dir / "run").resolve(),
    )
    return train(
        spec,
        data=args.train_file,
        settings=training,
        model_dir=args.model_dir,
        out_dir=args.out_dir,
        work_dir=args.work_dir,
        results_dir=args.results_dir,
        render_only=args.render_only,
    )
