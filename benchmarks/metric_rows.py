"""Realistic prediction/label pairs for ``benchmarks/metrics.py``, generated offline and seeded.

Shapes follow the paper's data: English rows of 30-200 words written like medical
short-answer rationales (AfriMed-QA SAQ), Chinese rows of 20-150 words written like
dialogue replies (NekoQA / Translational-Style), some rows mixing both scripts, and
about 1% blank predictions. Chinese words are drawn from jieba's own dictionary by
frequency, so the vocabulary has the real long tail; English draws from a core medical
vocabulary plus a long tail of generated words (real text has thousands of distinct
words, and a vocabulary of a few hundred would flatter any cache).

Predictions are what fine-tuned and base models write: the label lightly or heavily
edited, a different answer in the same style, the label's start followed by a
different ending, or a phrase repeated over and over.
"""

from __future__ import annotations

import bisect
import itertools
import random
from pathlib import Path


def _words(text: str) -> tuple[str, ...]:
    return tuple(text.split())


EN_FUNCTION = _words(
    "the of and to a in is that for it as with was be by on are this or from at an which not have "
    "has can may should will also if when these they their its more than most often other such but "
    "all one two three after before during because into about between within without under over"
)
EN_MEDICAL = _words(
    "patient patients fever malaria infection treatment dose doses blood test tests result results "
    "clinic hospital child children mother pregnancy pregnant woman women doctor nurse health care "
    "symptoms symptom cough diarrhoea dehydration rehydration oral salts zinc vaccine vaccination "
    "antibiotic antibiotics amoxicillin artemisinin combination therapy ACT parasite mosquito nets "
    "anaemia haemoglobin iron folic acid HIV ART viral load tuberculosis TB sputum smear chest x-ray "
    "hypertension blood-pressure diabetes insulin glucose kidney liver heart failure stroke seizure "
    "convulsions meningitis sepsis pneumonia breathing rate oxygen saturation referral district "
    "facility community guidelines WHO national protocol diagnosis differential history examination "
    "management first-line second-line contraindicated recommended weeks days hours daily twice "
    "intravenous intramuscular tablet tablets syrup weight kg mg/kg severe mild moderate acute chronic "
    "risk factors prevention screening counselling follow-up monitoring outcome mortality morbidity "
    "rapid diagnostic RDT microscopy positive negative confirm suspected cases outbreak cholera typhoid "
    "sickle cell disease crisis pain analgesia paracetamol ibuprofen fluids nutrition malnutrition "
    "stunting wasting breastfeeding newborn neonatal jaundice delivery labour caesarean bleeding"
)
EN_CONNECT = ("e.g.", "i.e.", "however,", "therefore,", "in addition,", "for example,", "because")
ZH_PARTICLES = ("喵", "呢", "吧", "啊", "哦", "呀", "嘛", "主人", "～", "……")
ZH_END = ("。", "。", "。", "！", "？", "～")
MIXED_TERMS = ("GPU", "LoRA", "DeepSeek-V3", "3.5", "OK", "App", "Wi-Fi", "CPU", "100%", "AI", "HIV", "ACT")


class Vocab:
    """Words with Zipf-like (or given) frequencies; ``draw`` samples one."""

    def __init__(self, words: list[str], weights: list[float]) -> None:
        self.words = words
        self.cumulative = list(itertools.accumulate(weights))

    def draw(self, rng: random.Random) -> str:
        return self.words[bisect.bisect(self.cumulative, rng.random() * self.cumulative[-1])]


def english_vocab(rng: random.Random, tail: int = 8000) -> Vocab:
    syllables = [a + b for a in "bcdfghklmnprstvz" for b in ("a", "e", "i", "o", "u", "ia", "ou")]
    made = {"".join(rng.choice(syllables) for _ in range(rng.randint(2, 4))) for _ in range(tail)}
    words = [*EN_FUNCTION, *EN_MEDICAL, *sorted(made)]
    # Zipf over the whole list: function words first, medical terms next, then the tail.
    return Vocab(words, [1.0 / (rank + 8) for rank in range(len(words))])


def chinese_vocab() -> Vocab:
    import jieba

    path = Path(jieba.__file__).with_name("dict.txt")
    words, weights = [], []
    for line in path.read_text(encoding="utf-8").splitlines():
        word, freq, *_ = line.split(" ")
        if all("\u4e00" <= char <= "\u9fa5" for char in word):
            words.append(word)
            weights.append(float(freq))
    return Vocab(words, weights)


def _length(rng: random.Random, low: int, high: int, mode: int) -> int:
    return round(rng.triangular(low, high, mode))


def english_words(rng: random.Random, vocab: Vocab, count: int) -> list[str]:
    """A rationale: sentences of 6-25 words, some numbers, connectives and commas."""
    words: list[str] = []
    while len(words) < count:
        sentence = [vocab.draw(rng) for _ in range(rng.randint(6, 25))]
        if rng.random() < 0.3:
            sentence.insert(rng.randrange(len(sentence)), rng.choice(EN_CONNECT))
        if rng.random() < 0.25:
            dose = f"{rng.choice((2, 5, 10, 20, 250, 500))} {rng.choice(('mg', 'ml', 'days', 'hours'))}"
            sentence.insert(rng.randrange(len(sentence)), dose)
        if rng.random() < 0.3:
            position = rng.randrange(1, len(sentence))
            sentence[position - 1] += ","
        sentence[0] = sentence[0][:1].upper() + sentence[0][1:]
        sentence[-1] += rng.choice((".", ".", ".", "?", ";"))
        words.extend(sentence)
    return words[:count]


def chinese_words(rng: random.Random, vocab: Vocab, count: int, mixed: bool) -> list[str]:
    """A dialogue reply: clauses of 2-12 words, commas, particles and sentence ends."""
    words: list[str] = []
    while len(words) < count:
        clause = [vocab.draw(rng) for _ in range(rng.randint(2, 12))]
        if rng.random() < 0.3:
            clause.append(rng.choice(ZH_PARTICLES))
        if mixed and rng.random() < 0.5:
            clause.insert(rng.randrange(len(clause) + 1), rng.choice(MIXED_TERMS))
        words.extend(clause)
        words.append("，" if rng.random() < 0.6 else rng.choice(ZH_END))
    return words[:count]


def _join(words: list[str], chinese: bool) -> str:
    if not chinese:
        return " ".join(words)
    # Latin terms inside Chinese text keep the spaces people type around them.
    return "".join(f" {word} " if word.isascii() and word[:1].isalnum() else word for word in words).strip()


def predict_words(rng: random.Random, label: list[str], fresh: list[str], vocab: Vocab) -> list[str]:
    """One model output for ``label``; ``fresh`` is an unrelated text in the same style."""
    kind = rng.random()
    if kind < 0.55:  # the label, edited: substitutions, deletions, insertions
        rate = rng.uniform(0.05, 0.6)
        out: list[str] = []
        for word in label:
            roll = rng.random()
            if roll < rate / 3:
                continue
            out.append(vocab.draw(rng) if roll < rate else word)
            if rng.random() < rate / 6:
                out.append(vocab.draw(rng))
        return out or label[:1]
    if kind < 0.80:  # another answer in the same style
        return fresh
    if kind < 0.95:  # starts like the label, then goes its own way
        cut = rng.randint(1, max(1, len(label) // 2))
        return label[:cut] + fresh[cut:]
    phrase = label[: rng.randint(2, 6)]  # degenerate repetition
    return (phrase * 60)[: rng.randint(len(phrase), 160)]


def realistic_pairs(count: int, seed: int) -> tuple[list[str], list[str]]:
    """``count`` (prediction, label) pairs: 45% English, 40% Chinese, 15% mixed; ~1% blank."""
    rng = random.Random(seed)
    english, chinese = english_vocab(random.Random(seed + 1)), chinese_vocab()
    predictions, labels = [], []
    for _ in range(count):
        roll = rng.random()
        if roll < 0.45:
            length = _length(rng, 30, 200, 70)
            label = english_words(rng, english, length)
            fresh = english_words(rng, english, _length(rng, 30, 200, 70))
            predict = predict_words(rng, label, fresh, english)
            is_chinese = False
        else:
            mixed = roll >= 0.85
            length = _length(rng, 20, 150, 45)
            label = chinese_words(rng, chinese, length, mixed)
            fresh = chinese_words(rng, chinese, _length(rng, 20, 150, 45), mixed)
            predict = predict_words(rng, label, fresh, chinese)
            is_chinese = True
        blank = rng.random() < 0.01
        predictions.append(rng.choice(("", " ", "\n")) if blank else _join(predict, is_chinese))
        labels.append(_join(label, is_chinese))
    return predictions, labels
