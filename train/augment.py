"""Agora's transformation g: checks that an MLM can serve as an infiller, and transformations that need no MLM.

g turns a mistake into new points "similar but not too similar" (SPEC-agora.md). The default,
:class:`flax_narrow.train.agora.MLMInfill`, rewrites ~15% of a text's tokens with samples from a masked LM; an
MLM whose head was never trained samples near-uniformly from the vocabulary and writes junk (the issue that
asked for this check saw the held-out score fall 0.77 -> 0.70 -> 0.50 over rounds). Two checks:

* :func:`check_mlm_head` (structural, free): a head whose every bias is exactly 0 and every LayerNorm scale
  exactly 1 has never taken an optimizer step -- that is the state of a fresh init, and of a head a loader
  filled in because the checkpoint lacked it. Raises :class:`~flax_narrow.errors.UntrainedModelError`.
* :func:`check_infiller` (behavioural, one forward pass): the MLM's masked-token cross-entropy on the task's own
  texts must be below that of the texts' own unigram distribution (add-one smoothed), the best predictor that
  ignores context. A head that was trained on unrelated text, or a random head with non-trivial values (the HF
  copy of BORT), fails it.

Both are skipped with ``allow_untrained=True``. Transformations needing no MLM, with their trade-offs:

* :class:`TokenDropout` deletes each word with probability ``rate`` (at least one, never all): cheap, keeps the
  words that are there, but only ever shortens a text -- the points are close to the mistake, sometimes too close.
* :class:`SpanSwap` swaps two non-overlapping word spans: keeps the bag of words exactly, changes order; for
  tasks where order carries the label (pairs, negation) it can produce points whose label S should change.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flax_narrow.errors import ConfigError, UntrainedModelError

log = logging.getLogger(__name__)

Example = dict[str, Any]
FIELDS = ("text_a", "text_b")


# ------------------------------------------------------------------------------------------------ MLM checks
def _head_leaves(model: Any) -> list[tuple[tuple[str, ...], np.ndarray]]:
    state = nnx.state(model, nnx.Param)
    out = []
    for path, var in nnx.to_flat_state(state):
        keys = tuple(str(k) for k in path)
        if keys[:2] == ("cls", "predictions"):
            out.append((keys, np.asarray(var.get_value())))
    return out


def head_is_fresh(model: Any) -> bool:
    """True when the MLM head's biases are all exactly 0 and its LayerNorm scales all exactly 1 (never trained).

    Raises:
      UntrainedModelError: ``model`` has no ``cls.predictions`` head (not a masked LM).
    """
    leaves = _head_leaves(model)
    if not leaves:
        raise UntrainedModelError(f"{type(model).__name__} has no MLM head (cls.predictions); g needs a masked LM")
    for keys, value in leaves:
        if keys[-1] == "bias" and np.any(value != 0):
            return False
        if keys[-1] == "scale" and np.any(value != 1):
            return False
    return True


def check_mlm_head(model: Any, *, allow_untrained: bool = False) -> None:
    """Refuse an MLM whose head was never trained (see :func:`head_is_fresh`) unless ``allow_untrained``."""
    if allow_untrained or not head_is_fresh(model):
        return
    raise UntrainedModelError(
        f"the MLM head of this {type(model).__name__} is untrained (every head bias is 0 and every LayerNorm scale "
        "is 1, as initialised): infilling would sample near-random tokens. Pretrain it (flax-narrow pretrain), "
        "use TokenDropout/SpanSwap, or pass allow_untrained=True"
    )


def mlm_fit(
    model: Any,
    tokenizer: Any,
    texts: Sequence[str],
    *,
    mask_prob: float = 0.15,
    max_length: int = 64,
    max_texts: int = 64,
    seed: int = 0,
) -> tuple[float, float]:
    """Masked-token cross-entropy (nats) of ``model`` and of the texts' own unigram distribution.

    Masks ``mask_prob`` of the non-special tokens of up to ``max_texts`` texts (at least one per text),
    predicts them densely, and scores the gold tokens. The unigram distribution is counted over the same texts
    (add-one smoothed over the vocabulary), so the baseline is, if anything, optimistic.

    Returns:
      ``(model_ce, unigram_ce)``, both averaged over the masked tokens.
    """
    rng = np.random.default_rng(seed)
    texts = [t for t in texts if t][:max_texts]
    if not texts:
        raise UntrainedModelError("no texts to check the MLM on")
    rows = tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"]
    special = np.asarray(sorted(set(tokenizer.all_special_ids)))
    vocab = len(tokenizer)
    ids = np.full((len(rows), max_length), tokenizer.pad_token_id, np.int32)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = r
    attn = np.zeros_like(ids)
    for i, r in enumerate(rows):
        attn[i, : len(r)] = 1
    content = (attn == 1) & ~np.isin(ids, special)
    counts = np.bincount(ids[content], minlength=vocab).astype(np.float64) + 1.0
    unigram = np.log(counts / counts.sum())
    sel = content & (rng.random(ids.shape) < mask_prob)
    for i in range(len(rows)):  # at least one masked token per text that has any content
        if content[i].any() and not sel[i].any():
            sel[i, rng.choice(np.flatnonzero(content[i]))] = True
    masked = np.where(sel, tokenizer.mask_token_id, ids)
    graphdef, state = nnx.split(model)
    logits_fn = jax.jit(lambda st, x, m: nnx.merge(graphdef, st)(x, m).logits)
    logits = np.asarray(logits_fn(state, jnp.asarray(masked), jnp.asarray(attn)), np.float64)[..., :vocab]
    z = logits[sel]
    z = z - z.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    gold = ids[sel]
    model_ce = float(-np.mean(logp[np.arange(len(gold)), gold]))
    unigram_ce = float(-np.mean(unigram[gold]))
    return model_ce, unigram_ce


def check_infiller(
    model: Any, tokenizer: Any, texts: Sequence[str], *, allow_untrained: bool = False, **kw: Any
) -> tuple[float, float]:
    """Refuse an MLM that predicts the task's masked tokens no better than their unigram distribution.

    Returns:
      ``(model_ce, unigram_ce)`` from :func:`mlm_fit` (not computed, ``(nan, nan)``, with ``allow_untrained``).

    Raises:
      UntrainedModelError: ``model_ce >= unigram_ce`` (and not ``allow_untrained``).
    """
    if allow_untrained:
        return float("nan"), float("nan")
    model_ce, unigram_ce = mlm_fit(model, tokenizer, texts, **kw)
    log.info("MLM check: masked-token cross-entropy %.3f vs unigram %.3f nats", model_ce, unigram_ce)
    if model_ce >= unigram_ce:
        raise UntrainedModelError(
            f"the MLM predicts the task's masked tokens no better than their unigram distribution (cross-entropy "
            f"{model_ce:.3f} >= {unigram_ce:.3f} nats): its head is untrained or fits other text. Pretrain it "
            "on text like the task's, use TokenDropout/SpanSwap, or pass allow_untrained=True"
        )
    return model_ce, unigram_ce


# ------------------------------------------------------------------------------------------------ no-MLM g
def _rewrite(example: Example, k: int, fields: Sequence[str], fn) -> list[Example]:
    outs = [dict(example) for _ in range(k)]
    for field in fields:
        if not example.get(field):
            continue
        words = str(example[field]).split()
        for out in outs:
            out[field] = " ".join(fn(words))
    for out in outs:
        out.pop("label", None)
    return outs


@dataclasses.dataclass(frozen=True)
class TokenDropout:
    """g without an MLM: delete each whitespace word with probability ``rate`` (at least one if the text has two
    or more words; never all of them). Labels are dropped (S labels the points)."""

    rate: float = 0.15
    fields: tuple[str, ...] = FIELDS

    def __post_init__(self) -> None:
        if not 0 < self.rate < 1:
            raise ConfigError(f"TokenDropout rate must be in (0, 1), got {self.rate}")

    def __call__(self, example: Example, k: int, rng: np.random.Generator) -> list[Example]:
        def drop(words: list[str]) -> list[str]:
            if len(words) < 2:
                return words
            keep = rng.random(len(words)) >= self.rate
            if keep.all():
                keep[rng.integers(len(words))] = False
            if not keep.any():
                keep[rng.integers(len(words))] = True
            return [w for w, kp in zip(words, keep) if kp]

        return _rewrite(example, k, self.fields, drop)


@dataclasses.dataclass(frozen=True)
class SpanSwap:
    """g without an MLM: swap two non-overlapping spans of 1..``max_span`` words (texts of < 2 words are kept).
    Labels are dropped (S labels the points)."""

    max_span: int = 3
    fields: tuple[str, ...] = FIELDS

    def __call__(self, example: Example, k: int, rng: np.random.Generator) -> list[Example]:
        def swap(words: list[str]) -> list[str]:
            n = len(words)
            if n < 2:
                return words
            span = int(rng.integers(1, min(self.max_span, n // 2) + 1))
            a = int(rng.integers(0, n - 2 * span + 1))
            b = int(rng.integers(a + span, n - span + 1))
            return words[:a] + words[b : b + span] + words[a + span : b] + words[a : a + span] + words[b + span :]

        return _rewrite(example, k, self.fields, swap)
