"""Inference helpers with the feel of transformers' pipelines, on the static-shape row selection.

:func:`fill_mask` runs a masked-LM model (BERT, BORT, NarrowBERT) on the mask tokens' rows only: the masks become
``narrow_positions`` with a static budget P (``positions_from_mask``), so the MLM head (and NarrowBERT's narrow
layers) compute P rows instead of L. Texts are sorted by length into a few static buckets
(:mod:`flax_narrow.bucketing`) instead of being padded to the longest, and a jitted forward compiles once per
(rows, bucket length, P).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flax_narrow.bucketing import in_input_order, pad_rows, plan_batches
from flax_narrow.errors import InputError, NarrowOverflowError
from flax_narrow.ops.gather import positions_from_mask


@functools.lru_cache(maxsize=16)
def _top_k_rows(graphdef: Any, top_k: int) -> Any:
    """Jitted ``(state, ids, mask, types, positions, valid) -> (scores, ids)`` of the top-k softmax at the rows."""

    @jax.jit
    def run(state, input_ids, attention_mask, token_type_ids, positions, valid):
        model = nnx.merge(graphdef, state)
        logits = model(input_ids, attention_mask, token_type_ids, narrow_positions=positions, narrow_valid=valid).logits
        return jax.lax.top_k(jax.nn.softmax(logits.astype(jnp.float32), axis=-1), top_k)

    return run


def fill_mask(
    model: Any,
    tokenizer: Any,
    texts: str | Sequence[str],
    top_k: int = 5,
    max_positions: int | None = None,
    batch_size: int = 32,
    buckets: Sequence[int] | None = None,
) -> list[Any]:
    """The ``top_k`` most likely tokens at every mask token of every text, as transformers' fill-mask pipeline.

    Texts are sorted by length into static buckets (:mod:`flax_narrow.bucketing`; powers of two from 16 up to
    the model's positions) and run in batches of at most ``batch_size``, so short texts are not padded to the
    longest one and each (rows, bucket length, P) shape compiles once per process.

    Args:
      model: a masked-LM model (``BertForMaskedLM``, ``BortForMaskedLM``, ``NarrowBertForMaskedLM``).
      tokenizer: its (fast) tokenizer; it must have a mask token (``[MASK]``, ``<mask>``).
      texts: one text or a list of texts, each with at least one mask token.
      top_k: how many tokens per mask (capped at the vocabulary size).
      max_positions: the static budget P of rows per text (default: the most masks in one text). A fixed P
        keeps one compilation across calls whose mask counts differ.
      batch_size: the most texts in one forward.
      buckets: the static lengths, ascending (default :func:`~flax_narrow.bucketing.bucket_lengths` of the
        model's usable positions); ``[max_length]`` pads every text to one length.

    Returns:
      Per text (a list, or just the one text's entry for a ``str``), per mask in order, a list of ``top_k``
      dicts ``{"score", "token", "token_str", "sequence"}`` best first: the probability, the token id, the
      token decoded, and the text with this mask filled (other masks kept, as transformers does).

    Raises:
      InputError: a tokenizer without a mask token, a text without one, a model that is not a masked LM,
        token ids beyond the model's vocabulary, or bad ``batch_size`` / ``buckets``.
      NarrowOverflowError: a text with more masks than ``max_positions``.
    """
    single = isinstance(texts, str)
    texts = [texts] if single else list(texts)
    if not texts:
        return []
    if not hasattr(model, "cls") or not hasattr(model.cls, "predictions"):
        raise InputError(f"fill_mask needs a masked-LM model (e.g. BertForMaskedLM), got {type(model).__name__}")
    mask_id = getattr(tokenizer, "mask_token_id", None)
    if getattr(tokenizer, "mask_token", None) is None or mask_id is None:
        raise InputError(f"fill_mask: the tokenizer {type(tokenizer).__name__} has no mask token")
    cfg = model.config
    limit = cfg.max_position_embeddings - cfg.position_offset
    enc = tokenizer(texts, truncation=True, max_length=limit)
    rows = [np.asarray(r, np.int32) for r in enc["input_ids"]]
    use_types = "token_type_ids" in enc and cfg.type_vocab_size > 1
    type_rows = [np.asarray(r, np.int32) for r in enc["token_type_ids"]] if use_types else None
    counts = np.asarray([int((r == mask_id).sum()) for r in rows])
    for i in np.flatnonzero(counts == 0):
        raise InputError(f"fill_mask: text {int(i)} ({texts[i][:60]!r}) has no mask token {tokenizer.mask_token}")
    top_id = max(int(r.max()) for r in rows)
    if top_id >= cfg.vocab_size:
        raise InputError(
            f"fill_mask: the tokenizer produced id {top_id} but the model's vocab_size is {cfg.vocab_size}"
        )
    if max_positions is not None and int(counts.max()) > max_positions:
        i = int(counts.argmax())
        raise NarrowOverflowError(
            f"fill_mask: text {i} has {int(counts[i])} mask tokens but the budget is P={max_positions}; "
            "raise max_positions"
        )
    budget = int(counts.max()) if max_positions is None else int(max_positions)
    k = max(1, min(int(top_k), cfg.vocab_size))
    graphdef, state = nnx.split(model)
    run = _top_k_rows(graphdef, k)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else cfg.pad_token_id
    plan = plan_batches([len(r) for r in rows], batch_size, limit, buckets, last="pow2")
    results = []
    for batch in plan:
        ids = pad_rows(rows, batch, pad_id)
        attention = pad_rows([np.ones(len(r), np.int32) for r in rows], batch, 0)
        types = pad_rows(type_rows, batch, 0) if type_rows is not None else np.zeros_like(ids)
        positions, valid = positions_from_mask(ids == mask_id, max_positions=budget)
        scores, tokens = run(state, ids, attention, types, positions, valid)
        results.append(list(zip(np.asarray(scores), np.asarray(tokens), np.asarray(positions))))
    per_text = in_input_order(len(texts), plan, results)

    out = []
    for b, (scores, tokens, positions) in enumerate(per_text):
        n = int(counts[b])
        per_mask = []
        for p in range(n):
            row = []
            for score, token in zip(scores[p].tolist(), tokens[p].tolist()):
                filled = rows[b].copy()  # as the pipeline, which never pads: the text's own tokens only
                filled[positions[p]] = token
                if tokenizer.pad_token_id is not None:
                    filled = filled[filled != tokenizer.pad_token_id]
                row.append(
                    {
                        "score": float(score),
                        "token": int(token),
                        "token_str": tokenizer.decode([int(token)]),
                        # one mask: a readable text; several: the other masks stay visible (transformers' rule)
                        "sequence": tokenizer.decode(filled.tolist(), skip_special_tokens=n == 1),
                    }
                )
            per_mask.append(row)
        out.append(per_mask)
    return out[0] if single else out
