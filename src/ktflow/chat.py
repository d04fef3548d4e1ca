"""``ktflow chat``: LLaMA-Factory's terminal chat on a finished run (base + adapter, same template).

The quick look the fine-tuning guides recommend before serving. ktflow reads the
LLaMA-Factory YAML that training left beside the adapter (``llamafactory.yaml``) for
the base model, the chat template and ``trust_remote_code``, so the chat formats
prompts exactly as training did, then runs ``llamafactory-cli chat`` in this process
(through ``ktflow.lf_launch``). Type ``exit`` to leave, ``clear`` to forget the history.

    ktflow chat results/lora/tiny-v3/style/adapter
    ktflow chat results/lora/tiny-v3/style/adapter --base-only      # the same model without LoRA
    echo -e "Rewrite: the cat sat.\\nexit" | ktflow chat results/lora/tiny-v3/style/adapter
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ktflow.errors import KtflowInputError

TRAINING_YAML = "llamafactory.yaml"
ADAPTER_CONFIG = "adapter_config.json"
# Keys of the training YAML that shape how the model reads a prompt.
CARRIED = ("template", "trust_remote_code")


def training_args(adapter: Path) -> dict[str, Any]:
    import yaml

    path = adapter / TRAINING_YAML
    if not path.is_file():
        return {}
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        raise KtflowInputError(path, None, f"invalid YAML ({error})") from error
    if not isinstance(loaded, dict):
        raise KtflowInputError(path, None, "expected a mapping of LLaMA-Factory arguments")
    return loaded


def chat_argv(args: argparse.Namespace) -> list[str]:
    """The ``llamafactory-cli chat`` arguments for this run."""
    adapter: Path = args.adapter
    if not (adapter / ADAPTER_CONFIG).is_file():
        raise KtflowInputError(adapter, ADAPTER_CONFIG, "not found: is this a finished run's adapter dir?")
    trained = training_args(adapter)
    model = args.model_dir or (
        Path(trained["model_name_or_path"]) if "model_name_or_path" in trained else None
    )
    if model is None:
        raise KtflowInputError(
            adapter / TRAINING_YAML, "model_name_or_path", "not recorded; pass --model-dir"
        )
    if not (model / "config.json").is_file():
        field = "--model-dir" if args.model_dir else "model_name_or_path"
        raise KtflowInputError(model if args.model_dir else adapter / TRAINING_YAML, field,
                               f"{model} is not a model dir (no config.json)")  # fmt: skip
    chat: dict[str, Any] = {"model_name_or_path": str(model)}
    if not args.base_only:
        chat["adapter_name_or_path"] = str(adapter)
    chat.update({key: trained[key] for key in CARRIED if trained.get(key) is not None})
    chat.update(infer_backend="huggingface", max_new_tokens=args.max_new_tokens)
    if not args.sample:
        chat["do_sample"] = False  # the same reply every time, like the pipeline's greedy inference
    for item in args.lf_arg:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise KtflowInputError(None, "--lf-arg", f"{item!r} is not KEY=VALUE")
        chat[key] = value
    argv = ["chat"]
    for key, value in chat.items():
        argv += [f"--{key}", str(value).lower() if isinstance(value, bool) else str(value)]
    return argv
