"""ktflow: the KTransformers x LLaMA-Factory fine-tuning recipe as one reproducible workflow."""

__version__ = "0.1.0"
