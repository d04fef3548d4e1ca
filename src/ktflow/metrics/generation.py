"""Scoring many prediction/label pairs, in worker processes when that pays.

Each sample is scored independently and the chunks come back in order, so the
per-sample scores (and the means, taken with ``math.fsum``) are the same for any
number of workers.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from multiprocessing.context import BaseContext
from typing import Any

from ktflow.metrics.flavours import GenerationFlavour, is_blank, make_flavour

# Below this a process pool costs more (start-up, pickling) than it saves.
MIN_PARALLEL_SAMPLES = 200
# Several chunks per worker so one slow chunk (long texts) does not leave a core idle.
CHUNKS_PER_WORKER = 4

_WORKER: dict[str, GenerationFlavour] = {}


def default_workers() -> int:
    try:
        available = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        available = os.cpu_count() or 1
    return max(1, min(available, 8))


def _start_worker(flavour: str) -> None:
    scorer = make_flavour(flavour)
    # Under fork the parent already loaded jieba's dictionary and this is a no-op;
    # under spawn each worker pays for it once here, never per chunk.
    scorer.prepare()
    _WORKER["scorer"] = scorer


def _score_chunk(pairs: list[tuple[str, str]]) -> list[dict[str, float]]:
    scorer = _WORKER["scorer"]
    return [scorer.score_pair(predict, label) for predict, label in pairs]


def _pool_context() -> BaseContext:
    # fork hands every worker the parent's loaded jieba dictionary for free; where fork
    # does not exist (macOS default, Windows) the initializer loads it per worker.
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("fork" if "fork" in methods else None)


def _chunks(pairs: list[tuple[str, str]], count: int) -> list[list[tuple[str, str]]]:
    size = -(-len(pairs) // count)
    return [pairs[start : start + size] for start in range(0, len(pairs), size)]


def score_generation(
    predictions: Sequence[str], labels: Sequence[str], flavour: str = "paper", workers: int = 1
) -> list[dict[str, float]]:
    """Per-sample scores, in input order, for ``flavour`` ("paper" or "standard")."""
    if len(predictions) != len(labels):
        raise ValueError(f"{len(predictions)} predictions but {len(labels)} labels")
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    scorer = make_flavour(flavour)
    scorer.prepare()
    pairs = list(zip(predictions, labels, strict=True))
    if workers == 1 or len(pairs) < MIN_PARALLEL_SAMPLES:
        return [scorer.score_pair(predict, label) for predict, label in pairs]
    chunks = _chunks(pairs, workers * CHUNKS_PER_WORKER)
    with ProcessPoolExecutor(
        max_workers=workers, mp_context=_pool_context(), initializer=_start_worker, initargs=(flavour,)
    ) as pool:
        return [row for part in pool.map(_score_chunk, chunks) for row in part]


def summarize_generation(
    predictions: Sequence[str],
    labels: Sequence[str],
    per_sample: Sequence[Mapping[str, float]],
    flavour: str = "paper",
) -> dict[str, Any]:
    """The METRICS.json body: corpus numbers, ``n``, and how many rows were blank."""
    scorer = make_flavour(flavour)
    return {
        "task": "generation",
        "flavour": scorer.name,
        "definition": scorer.description,
        "n": len(per_sample),
        "empty_predictions": sum(map(is_blank, predictions)),
        "empty_labels": sum(map(is_blank, labels)),
        **scorer.summarize(predictions, labels, per_sample),
    }
