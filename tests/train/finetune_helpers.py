"""Small learnable data sets and a WordPiece tokenizer built in memory (no network) for fine-tuning tests."""

from __future__ import annotations

import numpy as np

WORDS = [f"w{i}" for i in range(40)]
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
EXTRA = ["good", "bad", "red", "blue", "new", "york", "is", "answer", "the", "what", "##s", "paris"]


def tokenizer():
    from transformers import BertTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIAL + WORDS + EXTRA)}
    return BertTokenizerFast(vocab=vocab)


def sentences(rng: np.random.Generator, n: int, length: int = 6) -> list[list[str]]:
    return [list(rng.choice(WORDS, length)) for _ in range(n)]


def classification(rng, n):
    out = []
    for s in sentences(rng, n):
        lab = rng.integers(2)
        s[rng.integers(len(s))] = "good" if lab else "bad"
        out.append({"text_a": " ".join(s), "label": "pos" if lab else "neg"})
    return out


def pair(rng, n):
    out = []
    for a, b in zip(sentences(rng, n), sentences(rng, n)):
        lab = int(rng.integers(2))
        if lab:
            b[0] = a[0]
        elif a[0] == b[0]:
            b[0] = "good"
        out.append({"text_a": " ".join(a), "text_b": " ".join(b), "label": lab})
    return out


def regression(rng, n):
    out = []
    for s in sentences(rng, n):
        k = int(rng.integers(0, 4))
        for j in range(k):
            s[j] = "good"
        out.append({"text_a": " ".join(s), "label": float(k)})
    return out


def multilabel(rng, n):
    out = []
    for s in sentences(rng, n):
        labs = [c for c in ("red", "blue") if rng.random() < 0.5]
        for j, c in enumerate(labs):
            s[2 * j + 1] = c
        out.append({"text_a": " ".join(s), "label": labs})
    return out


def multiple_choice(rng, n):
    out = []
    for s in sentences(rng, n):
        choices = [" ".join(c) for c in sentences(rng, 3, 3)]
        lab = int(rng.integers(3))
        choices[lab] = "good " + choices[lab]
        out.append({"context": " ".join(s), "choices": choices, "label": lab})
    return out


def token(rng, n):
    out = []
    for s in sentences(rng, n, 7):
        tags = ["O"] * len(s)
        i = int(rng.integers(0, len(s) - 1))
        s[i], s[i + 1] = "new", "york"
        tags[i], tags[i + 1] = "B-LOC", "I-LOC"
        j = (i + 3) % len(s)
        if j not in (i, i + 1):
            s[j], tags[j] = "paris", "B-LOC"
        out.append({"tokens": s, "tags": tags})
    return out


def qa(rng, n):
    out = []
    for s in sentences(rng, n, 8):
        i = int(rng.integers(0, 6))
        ans = s[i + 2]
        s[i], s[i + 1] = "answer", "is"
        ctx = " ".join(s)
        start = len(" ".join(s[: i + 2])) + 1
        out.append(
            {"question": "what is the answer", "context": ctx, "answers": {"text": [ans], "answer_start": [start]}}
        )
    return out
