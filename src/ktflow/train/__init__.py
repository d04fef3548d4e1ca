"""LoRA training through LLaMA-Factory: one backend class per engine (``ktflow.train.backends``)."""
