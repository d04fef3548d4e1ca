"""The paper's metric (jieba + nltk BLEU + rouge_chinese), computed faster and bit-identically.

Profiled on realistic rows (benchmarks/metrics.py: 30-200 English words, 20-150 Chinese
words) the straightforward loop spends about 40% of its time in rouge_chinese's LCS (a
dict-based O(n*m) table), about a third in nltk (four ``sentence_bleu`` calls, each
counting the n-grams of both texts four times through Fractions) and about a quarter in
jieba. Each part is replaced here only where the result is provably the same float:

- jieba: ``jieba.cut`` splits its input into blocks with ``jieba.re_han_default`` and cuts
  every block on its own, so the cut of a text is the concatenation of ``jieba.cut(block)``.
  Blocks (English words, Chinese clauses) repeat across rows, so each is cut once per
  process and remembered.
- BLEU: the n-gram counts of both texts once, then nltk's arithmetic exactly
  (modified precision as numerator/denominator, ``SmoothingFunction().method3``,
  brevity penalty, ``math.fsum`` of weighted logs).
- ROUGE: rouge_chinese's own sentence splitting (``Rouge.cut_sent``) and word list, then
  ROUGE-1/2 from n-gram sets and ROUGE-L's LCS length with a bit-parallel algorithm
  (one big-integer step per token instead of a table cell per token pair).

tests/test_metrics.py checks every per-sample number against the library loop.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Callable, Hashable, Sequence
from functools import lru_cache
from itertools import chain
from typing import Any

# Blocks kept per process: English words and Chinese clauses; a few MB at most.
BLOCK_CACHE_SIZE = 1 << 17
ROUGE_F_EPSILON = 1e-8  # rouge_chinese's f = 2pr / (p + r + 1e-8)


class JiebaTokens:
    """``list(jieba.cut(text))``, with each of jieba's blocks cut once per process."""

    def __init__(self) -> None:
        import jieba

        # jieba announces its dictionary load on stderr at DEBUG level.
        jieba.setLogLevel(logging.INFO)
        jieba.initialize()
        self._split = jieba.re_han_default.split
        cut = jieba.cut
        self._block: Callable[[str], tuple[str, ...]] = lru_cache(maxsize=BLOCK_CACHE_SIZE)(
            lambda block: tuple(cut(block))
        )

    def __call__(self, text: str) -> list[str]:
        # re.split yields empty strings around matches; jieba.cut skips them too.
        return list(chain.from_iterable(map(self._block, filter(None, self._split(text)))))


def _ngram_counts(tokens: Sequence[str], n: int) -> Counter[Any]:
    if n == 1:
        return Counter(tokens)
    return Counter(zip(*(tokens[start:] for start in range(n)), strict=False))


def cumulative_bleu(
    reference: Sequence[str], hypothesis: Sequence[str], weights: Sequence[Sequence[float]]
) -> list[float]:
    """nltk ``sentence_bleu([reference], hypothesis, weights=weights,
    smoothing_function=SmoothingFunction().method3)`` for a list of weight vectors."""
    orders = max(len(weight) for weight in weights)
    numerators, denominators = [], []
    for n in range(1, orders + 1):
        hyp = _ngram_counts(hypothesis, n)
        ref = _ngram_counts(reference, n)
        numerators.append(sum(min(count, ref[gram]) for gram, count in hyp.items() if gram in ref))
        denominators.append(max(1, len(hypothesis) - n + 1))
    if numerators[0] == 0:
        return [0.0] * len(weights)
    hyp_len, ref_len = len(hypothesis), len(reference)
    brevity = 1.0 if hyp_len > ref_len else math.exp(1 - ref_len / hyp_len)
    precisions: list[float] = []
    smoothed = 1  # method3: the k-th zero precision becomes 1 / (2**k * denominator)
    for numerator, denominator in zip(numerators, denominators, strict=True):
        if numerator == 0:
            precisions.append(1 / (2**smoothed * denominator))
            smoothed += 1
        else:
            precisions.append(numerator / denominator)
    return [
        brevity
        * math.exp(math.fsum(w * math.log(p) for w, p in zip(weight, precisions, strict=False) if p > 0))
        for weight in weights
    ]


class RougeWords:
    """The word list rouge_chinese scores for a text: its sentences, whitespace-normalised,
    split on single spaces (a whitespace-only sentence contributes one empty word)."""

    def __init__(self) -> None:
        from rouge_chinese import Rouge

        self._cut_sent: Callable[[str], list[str]] = Rouge().cut_sent

    def __call__(self, text: str) -> list[str]:
        words: list[str] = []
        for sentence in self._cut_sent(text):
            if sentence:
                words.extend(" ".join(sentence.split()).split(" "))
        return words


def _f_score(overlap: int, hyp_count: int, ref_count: int) -> float:
    precision = 0.0 if hyp_count == 0 else overlap / hyp_count
    recall = 0.0 if ref_count == 0 else overlap / ref_count
    return 2.0 * ((precision * recall) / (precision + recall + ROUGE_F_EPSILON))


def rouge_n_f(hypothesis: Sequence[str], reference: Sequence[str], n: int) -> float:
    """rouge_chinese ROUGE-n F (exclusive: distinct n-grams)."""
    hyp = set(_ngram_counts(hypothesis, n))
    ref = set(_ngram_counts(reference, n))
    return _f_score(len(hyp & ref), len(hyp), len(ref))


def lcs_length(first: Sequence[Hashable], second: Sequence[Hashable]) -> int:
    """Length of the longest common subsequence (Allison-Dix / Hyyrö bit-vector algorithm)."""
    if not first or not second:
        return 0
    positions: dict[Hashable, int] = {}
    for index, item in enumerate(first):
        positions[item] = positions.get(item, 0) | (1 << index)
    full = (1 << len(first)) - 1
    row = full
    for item in second:
        matches = row & positions.get(item, 0)
        row = (row + matches) | (row - matches)
    return len(first) - (row & full).bit_count()


def rouge_l_f(hypothesis: Sequence[str], reference: Sequence[str]) -> float:
    """rouge_chinese's summary-level ROUGE-L F: LCS of the whole word lists."""
    common = lcs_length(reference, hypothesis)
    recall = common / len(reference)
    precision = common / len(hypothesis)
    return 2.0 * ((precision * recall) / (precision + recall + ROUGE_F_EPSILON))
