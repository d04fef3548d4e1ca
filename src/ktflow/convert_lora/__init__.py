"""LoRA conversion (``ktflow convert-lora``): an HF- or KT-trained adapter -> one PEFT dir SGLang loads.

SGLang reads plain PEFT keys (no ``base_model.model.`` prefix) and wants routed
expert LoRA as one A/B pair per expert, while KT's trainer saves expert LoRA as
fused 3-D tensors ``layers.{L}.experts.{gate,up,down}_lora_{a,b}`` of shape
``[E, r, in]`` (A) and ``[E, out, r]`` (B) in ``fused_expert_lora.safetensors``.
Everything is validated from safetensors headers before any tensor is read, so a
bad adapter fails in milliseconds with the file and key at fault.
"""
