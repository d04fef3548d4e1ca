"""ktflow.metrics.paper, part by part, against the libraries it replaces (the oracles):
jieba.cut, nltk sentence_bleu with method3, rouge_chinese's word lists, ROUGE-n and LCS.
Equality is exact (==), not approximate: the fast path must give the same floats."""

from __future__ import annotations

import random

import jieba
from hypothesis import given, settings
from hypothesis import strategies as st
from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
from rouge_chinese import Rouge
from rouge_chinese import rouge_score as rc

from ktflow.metrics.flavours import PAPER_BLEU_WEIGHTS
from ktflow.metrics.paper import (
    JiebaTokens,
    RougeWords,
    cumulative_bleu,
    lcs_length,
    rouge_l_f,
    rouge_n_f,
)

# Pieces that exercise every branch: jieba's block split (Latin runs, "+#&._%-", spaces,
# CJK), rouge_chinese's sentence rules ("。！？?", six dots, "……", closing quotes) and the
# whitespace-only sentences that give rouge_chinese an empty word.
PIECES = [
    "the", "cat", "The", "patient", "mg/kg", "3.5", "e.g.", "C++", "a#b", "50%", "x-ray", "_", "&",
    "模型", "微调", "训练", "我们", "是", "天安门", "喵", "主人", "，", "。", "！", "？", "?", "……",
    "......", "”", "’", "“", "（", "）", " ", "  ", "\n", "\t", "\r\n", "\u3000", "\xa0", "😀", "ﬁ",
]  # fmt: skip
texts = st.one_of(
    st.lists(st.sampled_from(PIECES), max_size=30).map("".join),
    st.text(max_size=40),
)
token_lists = st.lists(st.sampled_from(["a", "b", "c", "d", "", " ", "的"]), max_size=14)


def test_jieba_tokens_on_realistic_text_and_their_cache() -> None:
    cut = JiebaTokens()
    text = "The patient, 5 mg/kg twice daily (e.g. ACT). 我们的模型在数据上训练了三天，效果很好！OK？\n"
    assert cut(text) == list(jieba.cut(text))
    assert cut(text) == list(jieba.cut(text))  # second call comes from the block cache
    assert cut("") == []


@settings(max_examples=300, deadline=None, database=None)
@given(text=texts)
def test_jieba_tokens_equal_jieba_cut(text: str) -> None:
    assert JiebaTokens()(text) == list(jieba.cut(text))


@settings(max_examples=300, deadline=None, database=None)
@given(reference=token_lists, hypothesis=token_lists)
def test_cumulative_bleu_equals_nltk_method3(reference: list[str], hypothesis: list[str]) -> None:
    smoothing = SmoothingFunction().method3
    for weights in PAPER_BLEU_WEIGHTS:
        want = sentence_bleu([reference], hypothesis, weights=weights, smoothing_function=smoothing)
        got = cumulative_bleu(reference, hypothesis, [weights])[0]
        assert got == want, weights


@settings(max_examples=300, deadline=None, database=None)
@given(hypothesis=texts, reference=texts)
def test_rouge_equals_rouge_chinese(hypothesis: str, reference: str) -> None:
    words = RougeWords()
    hyp, ref = words(hypothesis), words(reference)
    if not hyp or not ref:  # rouge_chinese raises on a text with no sentence at all
        return
    want = Rouge().get_scores(hypothesis, reference)[0]
    assert rouge_n_f(hyp, ref, 1) == want["rouge-1"]["f"]
    assert rouge_n_f(hyp, ref, 2) == want["rouge-2"]["f"]
    assert rouge_l_f(hyp, ref) == want["rouge-l"]["f"]


@settings(max_examples=300, deadline=None, database=None)
@given(first=token_lists, second=token_lists)
def test_lcs_length_equals_the_table(first: list[str], second: list[str]) -> None:
    assert lcs_length(first, second) == rc._len_lcs(first, second)


def test_lcs_length_on_long_sequences() -> None:
    rng = random.Random(3)
    for _ in range(5):
        first = [rng.choice("abcdefgh") for _ in range(rng.randint(150, 250))]
        second = [rng.choice("abcdefgh") for _ in range(rng.randint(150, 250))]
        assert lcs_length(first, second) == rc._len_lcs(first, second)
