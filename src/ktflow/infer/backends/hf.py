"""``hf``: in-process generation with transformers (+ PEFT for an adapter): batched,
length-sorted, left-padded.

The adapter is merged into the base weights once (as LLaMA-Factory does for inference),
so each decoding step runs plain linear layers instead of base + LoRA A/B per module.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ktflow.infer.backends.base import Backend, InferInputs
from ktflow.infer.base import InferenceBackend, Request, Sampling

log = logging.getLogger(__name__)

DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}
# Below this size a decoding step is a string of tiny ops: a second intra-op thread gains little
# and, when other jobs share the cores, OpenMP's barriers wait on descheduled threads (measured
# 20x slower on a busy 2-core host), so such models decode on one thread unless told otherwise.
SMALL_MODEL_PARAMS = 100_000_000


class HfBackend(Backend):
    name = "hf"
    spec_keys = operational_keys = frozenset({"threads"})

    def create(self, spec: dict[str, Any], sampling: Sampling, inputs: InferInputs) -> InferenceBackend:
        return HFInference(
            inputs.model_dir,
            sampling,
            adapter_dir=inputs.adapter,
            dtype=spec.get("dtype", "float32"),
            trust_remote_code=bool(spec.get("trust_remote_code", False)),
            threads=spec.get("threads"),
        )


class HFInference(InferenceBackend):
    name = "hf"

    def __init__(
        self,
        model_dir: Path,
        sampling: Sampling,
        adapter_dir: Path | None = None,
        dtype: str = "float32",
        trust_remote_code: bool = False,
        threads: int | None = None,
    ) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.torch = torch
        self.sampling = sampling
        self.merged = False
        self.tokenizer: Any = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        device = "cuda" if torch.cuda.is_available() else "cpu"
        model: Any = AutoModelForCausalLM.from_pretrained(
            model_dir,
            dtype=getattr(torch, DTYPES[dtype]),
            trust_remote_code=trust_remote_code,
            use_safetensors=True,
        )
        if adapter_dir is not None:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, adapter_dir)
            try:
                model = model.merge_and_unload()
                self.merged = True
            except (ValueError, NotImplementedError, RuntimeError) as error:
                log.warning("cannot merge %s (%s); generating with the unmerged adapter", adapter_dir, error)
        self.model: Any = model.to(device).eval()
        self.device = device
        self.generated_tokens = 0
        if threads is None and device == "cpu" and model.num_parameters() < SMALL_MODEL_PARAMS:
            threads = 1
        if threads is not None:
            torch.set_num_threads(threads)
        self.threads = torch.get_num_threads()

    def _encode(self, request: Request) -> list[int]:
        encoded: Any = self.tokenizer.apply_chat_template(
            request.messages, add_generation_prompt=True, tokenize=True
        )
        # transformers 5 returns a BatchEncoding here; 4.x returned the id list itself.
        return list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)

    def generate(self, requests: list[Request]) -> Iterator[tuple[Request, str]]:
        torch = self.torch
        encoded = [(request, self._encode(request)) for request in requests]
        # Similar lengths share a batch, so little compute goes to padding.
        encoded.sort(key=lambda pair: len(pair[1]))
        size = self.sampling.batch_size
        for start in range(0, len(encoded), size):
            batch = encoded[start : start + size]
            padded = self.tokenizer.pad({"input_ids": [ids for _, ids in batch]}, return_tensors="pt")
            torch.manual_seed(self.sampling.seed + start)
            with torch.inference_mode():
                output = self.model.generate(
                    input_ids=padded["input_ids"].to(self.device),
                    attention_mask=padded["attention_mask"].to(self.device),
                    max_new_tokens=self.sampling.max_new_tokens,
                    do_sample=self.sampling.do_sample,
                    temperature=self.sampling.temperature if self.sampling.do_sample else None,
                    top_p=self.sampling.top_p if self.sampling.do_sample else None,
                    pad_token_id=self.tokenizer.pad_token_id,
                    eos_token_id=self.tokenizer.eos_token_id,
                )
            new_tokens = output[:, padded["input_ids"].shape[1] :]
            self.generated_tokens += int((new_tokens != self.tokenizer.pad_token_id).sum())
            for (request, _), tokens in zip(batch, new_tokens, strict=True):
                yield request, self.tokenizer.decode(tokens, skip_special_tokens=True).strip()

    def facts(self) -> dict[str, Any]:
        return {"device": self.device, "threads": self.threads, "adapter_merged": self.merged}

    def close(self) -> None:
        del self.model
