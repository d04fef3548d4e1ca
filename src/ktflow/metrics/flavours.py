"""Generation metric flavours: one interface, one class per way of scoring.

``paper`` reproduces the KTransformers SFT metric the published tables used;
``standard`` gives literature-comparable sacreBLEU / rouge-score numbers. Both
score a blank prediction or label (nothing but whitespace) as 0 on every metric.
"""

from __future__ import annotations

import math
import re
import unicodedata
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from ktflow.metrics.paper import JiebaTokens, RougeWords, cumulative_bleu, rouge_l_f, rouge_n_f


def is_blank(text: str) -> bool:
    """True for text with no non-whitespace character.

    This is exactly upstream's test ``len(" ".join(jieba.cut(text)).split()) == 0``:
    jieba's tokens concatenate back to the text, and ``str.split`` and ``str.strip``
    share one definition of whitespace.
    """
    return not text.strip()


def mean_scores(
    per_sample: Sequence[Mapping[str, float]], keys: Sequence[str] | None = None
) -> dict[str, float]:
    """Mean of each metric over all samples (blank rows included, as zeros)."""
    if not per_sample:
        raise ValueError("no samples to average")
    names = list(per_sample[0]) if keys is None else list(keys)
    # fsum: the mean must not depend on how the rows were chunked across workers.
    return {name: math.fsum(row[name] for row in per_sample) / len(per_sample) for name in names}


class GenerationFlavour(ABC):
    """Per-sample scoring (run in worker processes) and the corpus summary."""

    name: ClassVar[str]
    keys: ClassVar[tuple[str, ...]]
    description: ClassVar[str]

    @abstractmethod
    def prepare(self) -> None:
        """Load whatever the scorer needs once per process (dictionaries, scorers)."""

    @abstractmethod
    def _score_nonblank(self, predict: str, label: str) -> dict[str, float]: ...

    def score_pair(self, predict: str, label: str) -> dict[str, float]:
        if is_blank(predict) or is_blank(label):
            return dict.fromkeys(self.keys, 0.0)
        return self._score_nonblank(predict, label)

    def summarize(
        self, predictions: Sequence[str], labels: Sequence[str], per_sample: Sequence[Mapping[str, float]]
    ) -> dict[str, Any]:
        return dict(mean_scores(per_sample, self.keys))


# Cumulative BLEU-1..4 weights of the KTransformers SFT metric.
PAPER_BLEU_WEIGHTS: tuple[tuple[float, float, float, float], ...] = (
    (1.0, 0.0, 0.0, 0.0),
    (0.5, 0.5, 0.0, 0.0),
    (1 / 3, 1 / 3, 1 / 3, 0.0),
    (0.25, 0.25, 0.25, 0.25),
)


class PaperFlavour(GenerationFlavour):
    name = "paper"
    keys = ("bleu-1", "bleu-2", "bleu-3", "bleu-4", "rouge-1", "rouge-2", "rouge-l")
    description = (
        "KTransformers SFT metric: jieba.cut tokens (spaces kept); nltk sentence_bleu cumulative "
        "BLEU-1..4 with SmoothingFunction().method3; rouge_chinese F of ROUGE-1/2/L on the "
        "space-joined tokens; each x100 rounded to 4 decimals per sample, then the mean; "
        "blank prediction or label scores 0"
    )

    def prepare(self) -> None:
        self._tokens = JiebaTokens()
        self._rouge_words = RougeWords()

    def _score_nonblank(self, predict: str, label: str) -> dict[str, float]:
        hypothesis = self._tokens(predict)
        reference = self._tokens(label)
        bleu = cumulative_bleu(reference, hypothesis, PAPER_BLEU_WEIGHTS)
        # rouge_chinese scores the space-joined jieba tokens (get_scores(hyp, ref)).
        hyp_words = self._rouge_words(" ".join(hypothesis))
        ref_words = self._rouge_words(" ".join(reference))
        rouge = (
            rouge_n_f(hyp_words, ref_words, 1),
            rouge_n_f(hyp_words, ref_words, 2),
            rouge_l_f(hyp_words, ref_words),
        )
        values = [*bleu, *rouge]
        return {key: float(round(value * 100, 4)) for key, value in zip(self.keys, values, strict=True)}


# CJK ideographs and kana: one token per character (they carry no spaces between words).
_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002fa1f"
_ROUGE_TOKEN = re.compile(f"[{_CJK}]|[^\\W_{_CJK}]+")


class CjkRougeTokenizer:
    """rouge-score's default tokenizer (lower-case, keep letters and digits, drop the rest)
    made Unicode-aware: NFKC, then each CJK ideograph / kana is a token and any other run
    of letters or digits is a word. The default keeps only [a-z0-9] and scores Chinese ~0.
    """

    def tokenize(self, text: str) -> list[str]:
        return _ROUGE_TOKEN.findall(unicodedata.normalize("NFKC", text).lower())


class StandardFlavour(GenerationFlavour):
    name = "standard"
    keys = ("sacrebleu-sentence_bleu", "rouge_score-rouge1", "rouge_score-rouge2", "rouge_score-rougeL")
    # 'zh' splits Chinese characters (and full-width punctuation) and applies 13a to the
    # rest, so on plain English it yields 13a's tokens and the usual 13a numbers.
    SACREBLEU_TOKENIZE = "zh"
    description = (
        "literature-comparable: sacreBLEU corpus BLEU (tokenize='zh', i.e. 13a plus one token "
        "per Chinese character) and rouge-score F x100 with a CJK-aware tokenizer (per-character "
        "CJK, Unicode words, lower-cased), mean over samples; per-sample BLEU is sacreBLEU "
        "sentence BLEU with effective order"
    )

    def prepare(self) -> None:
        from rouge_score.rouge_scorer import RougeScorer
        from sacrebleu.metrics.bleu import BLEU

        self._sentence_bleu = BLEU(tokenize=self.SACREBLEU_TOKENIZE, effective_order=True)
        self._rouge = RougeScorer(["rouge1", "rouge2", "rougeL"], tokenizer=CjkRougeTokenizer())

    def _score_nonblank(self, predict: str, label: str) -> dict[str, float]:
        bleu = self._sentence_bleu.sentence_score(predict, [label]).score
        rouge = self._rouge.score(label, predict)
        return {
            "sacrebleu-sentence_bleu": float(bleu),
            "rouge_score-rouge1": float(rouge["rouge1"].fmeasure) * 100,
            "rouge_score-rouge2": float(rouge["rouge2"].fmeasure) * 100,
            "rouge_score-rougeL": float(rouge["rougeL"].fmeasure) * 100,
        }

    def summarize(
        self, predictions: Sequence[str], labels: Sequence[str], per_sample: Sequence[Mapping[str, float]]
    ) -> dict[str, Any]:
        from sacrebleu.metrics.bleu import BLEU

        corpus = BLEU(tokenize=self.SACREBLEU_TOKENIZE)
        score = corpus.corpus_score(list(predictions), [list(labels)])
        means = mean_scores(per_sample, self.keys)
        return {
            "sacrebleu-bleu": score.score,
            "sacrebleu-signature": str(corpus.get_signature()),
            "rouge_score-rouge1": means["rouge_score-rouge1"],
            "rouge_score-rouge2": means["rouge_score-rouge2"],
            "rouge_score-rougeL": means["rouge_score-rougeL"],
            "sacrebleu-sentence_bleu_mean": means["sacrebleu-sentence_bleu"],
        }


FLAVOURS: dict[str, type[GenerationFlavour]] = {cls.name: cls for cls in (PaperFlavour, StandardFlavour)}


def make_flavour(name: str) -> GenerationFlavour:
    try:
        return FLAVOURS[name]()
    except KeyError:
        raise ValueError(f"unknown flavour {name!r} (choose from {', '.join(FLAVOURS)})") from None
