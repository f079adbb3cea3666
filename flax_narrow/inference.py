"""Inference helpers with the feel of transformers' pipelines, on the static-shape row selection.

:func:`fill_mask` runs a masked-LM model (BERT, BORT, NarrowBERT) on the mask tokens' rows only: the masks become
``narrow_positions`` with a static budget P (``positions_from_mask``), so the MLM head (and NarrowBERT's narrow
layers) compute P rows instead of L, and a jitted forward compiles once per (batch, length, P).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flax_narrow.errors import InputError
from flax_narrow.ops.gather import positions_from_mask

PAD_TO_MULTIPLE = 8  # pad lengths to a multiple of this, so that texts of similar lengths share a compilation


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
) -> list[Any]:
    """The ``top_k`` most likely tokens at every mask token of every text, as transformers' fill-mask pipeline.

    Args:
      model: a masked-LM model (``BertForMaskedLM``, ``BortForMaskedLM``, ``NarrowBertForMaskedLM``).
      tokenizer: its (fast) tokenizer; it must have a mask token (``[MASK]``, ``<mask>``).
      texts: one text or a list of texts, each with at least one mask token.
      top_k: how many tokens per mask (capped at the vocabulary size).
      max_positions: the static budget P of rows per text (default: the most masks in one text). A fixed P
        keeps one compilation across calls whose mask counts differ.

    Returns:
      Per text (a list, or just the one text's entry for a ``str``), per mask in order, a list of ``top_k``
      dicts ``{"score", "token", "token_str", "sequence"}`` best first: the probability, the token id, the
      token decoded, and the text with this mask filled (other masks kept, as transformers does).

    Raises:
      InputError: a tokenizer without a mask token, a text without one, a model that is not a masked LM, or
        token ids beyond the model's vocabulary.
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
    enc = tokenizer(
        texts, padding=True, truncation=True, max_length=limit, pad_to_multiple_of=PAD_TO_MULTIPLE, return_tensors="np"
    )
    ids = np.asarray(enc["input_ids"], np.int32)
    if ids.shape[1] > limit:  # padding to a multiple may overshoot the positions: drop padding columns only
        ids = ids[:, :limit]
    attention = np.asarray(enc.get("attention_mask", np.ones_like(ids)), np.int32)[:, : ids.shape[1]]
    masks = ids == mask_id
    for i in np.flatnonzero(~masks.any(axis=1)):
        raise InputError(f"fill_mask: text {int(i)} ({texts[i][:60]!r}) has no mask token {tokenizer.mask_token}")
    if int(ids.max()) >= cfg.vocab_size:
        raise InputError(
            f"fill_mask: the tokenizer produced id {int(ids.max())} but the model's vocab_size is {cfg.vocab_size}"
        )
    types = enc.get("token_type_ids")
    types = np.zeros_like(ids) if types is None or cfg.type_vocab_size <= 1 else np.asarray(types, np.int32)
    positions, valid = positions_from_mask(masks, max_positions=max_positions)
    k = max(1, min(int(top_k), cfg.vocab_size))
    graphdef, state = nnx.split(model)
    scores, tokens = _top_k_rows(graphdef, k)(state, ids, attention, types[:, : ids.shape[1]], positions, valid)
    scores, tokens, positions = np.asarray(scores), np.asarray(tokens), np.asarray(positions)

    pad_id = tokenizer.pad_token_id
    out = []
    for b in range(len(texts)):
        n = int(masks[b].sum())
        per_mask = []
        for p in range(n):
            row = []
            for score, token in zip(scores[b, p].tolist(), tokens[b, p].tolist()):
                filled = ids[b].copy()
                filled[positions[b, p]] = token
                filled = filled[attention[b].astype(bool)]  # as the pipeline, which never pads: no padding
                if pad_id is not None:
                    filled = filled[filled != pad_id]
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
