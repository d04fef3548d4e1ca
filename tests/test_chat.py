"""``ktflow chat``: LLaMA-Factory's terminal chat on a finished run, fed from a pipe."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import ktflow_env
from test_infer_server import make_adapter

QUESTION = "Rewrite the sentence in translational style. the old farmer found a green cup."


def chat(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ktflow", "chat", *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=ktflow_env(),
        timeout=300,
        check=False,
    )


@pytest.fixture(scope="module")
def finished_adapter(tiny_bf16: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An adapter dir as `ktflow train` leaves it: PEFT files plus the LLaMA-Factory YAML it ran."""
    adapter = make_adapter(tiny_bf16, tmp_path_factory.mktemp("run") / "adapter")
    trained = {"model_name_or_path": str(tiny_bf16), "stage": "sft", "finetuning_type": "lora",
               "trust_remote_code": False}  # fmt: skip
    (adapter / "llamafactory.yaml").write_text(yaml.safe_dump(trained))
    return adapter


def test_chat_replies_like_the_pipelines_inference(finished_adapter: Path, tiny_bf16: Path) -> None:
    from ktflow.infer.backends.hf import HFInference
    from ktflow.infer.base import Request, Sampling

    result = chat(str(finished_adapter), "--max-new-tokens", "16", stdin=f"{QUESTION}\nexit\n")
    assert result.returncode == 0, result.stderr[-3000:]
    replies = re.findall(r"Assistant: (.*)", result.stdout)
    assert len(replies) == 1 and replies[0].strip(), result.stdout
    # Same base, adapter and chat template as `ktflow infer`: greedy replies agree.
    backend = HFInference(
        tiny_bf16, Sampling(max_new_tokens=16), adapter_dir=finished_adapter, dtype="bfloat16"
    )
    request = Request(id="q", messages=[{"role": "user", "content": QUESTION}], label="")
    ((_, expected),) = list(backend.generate([request]))
    assert replies[0].strip() == expected


def test_chat_names_what_is_missing(finished_adapter: Path, tmp_path: Path) -> None:
    result = chat(str(tmp_path))
    assert result.returncode == 2 and "adapter_config.json" in result.stderr
    bare = tmp_path / "adapter"
    bare.mkdir()
    (bare / "adapter_config.json").write_text((finished_adapter / "adapter_config.json").read_text())
    result = chat(str(bare))
    assert result.returncode == 2 and "model_name_or_path" in result.stderr and "--model-dir" in result.stderr
    result = chat(str(bare), "--model-dir", str(tmp_path))
    assert result.returncode == 2 and "--model-dir" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
