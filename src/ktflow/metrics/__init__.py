"""Scores for predictions: BLEU-1..4 / ROUGE-1/2/L for generation, accuracy for multiple choice.

``ktflow evaluate`` (src/ktflow/steps/evaluate.py) is the command; these are its parts.
"""

from __future__ import annotations

from ktflow.metrics.flavours import is_blank, mean_scores
from ktflow.metrics.generation import score_generation, summarize_generation
from ktflow.metrics.mcq import normalize_label, parse_choice, score_mcq, summarize_mcq
from ktflow.metrics.records import load_predictions

__all__ = [
    "is_blank",
    "load_predictions",
    "mean_scores",
    "normalize_label",
    "parse_choice",
    "score_generation",
    "score_mcq",
    "summarize_generation",
    "summarize_mcq",
]
