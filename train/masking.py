"""BERT masking on device, inside the jitted step: the host feeds token ids only.

Per row, ``n = min(P, max(1, round(mask_prob * c)))`` of the ``c`` maskable tokens (not special, not padding)
are chosen uniformly without replacement; of those, ``mask_token_prob`` become the mask token,
``random_token_prob`` a uniformly random vocabulary id, and the rest keep their id (BERT's 80/10/10).
The chosen positions are returned ascending in exactly P slots (static shape), ready for the narrow gather;
unused slots point at position 0 and are marked invalid. Rows with no maskable token get no valid slot.

Randomness comes from one key folded with each row's index in the global batch; with JAX's partitionable
threefry the result depends neither on how the batch is sharded nor on how it is split into micro-batches,
and deriving the key from (seed, step) makes a resumed run draw the same masks.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from flax_narrow.errors import InputError
from flax_narrow.ops.gather import mask_to_positions


@dataclasses.dataclass(frozen=True)
class MaskingSpec:
    """Static masking parameters (hashable: part of the compiled step)."""

    max_predictions: int
    vocab_size: int
    mask_token_id: int
    pad_token_id: int
    special_token_ids: tuple[int, ...]
    mask_prob: float = 0.15
    mask_token_prob: float = 0.8
    random_token_prob: float = 0.1

    @classmethod
    def from_tokenizer(
        cls,
        tokenizer,
        *,
        max_predictions: int,
        vocab_size: int,
        mask_prob: float = 0.15,
        mask_token_prob: float = 0.8,
        random_token_prob: float = 0.1,
    ) -> MaskingSpec:
        """Special ids, mask id and pad id from a transformers tokenizer."""
        if tokenizer.mask_token_id is None or tokenizer.pad_token_id is None:
            raise InputError("the tokenizer has no mask or pad token; MLM pretraining needs both")
        return cls(
            max_predictions=max_predictions,
            vocab_size=vocab_size,
            mask_token_id=int(tokenizer.mask_token_id),
            pad_token_id=int(tokenizer.pad_token_id),
            special_token_ids=tuple(sorted({int(i) for i in tokenizer.all_special_ids})),
            mask_prob=mask_prob,
            mask_token_prob=mask_token_prob,
            random_token_prob=random_token_prob,
        )


@dataclasses.dataclass(frozen=True)
class MaskedBatch:
    """The model's inputs and targets for one MLM batch (B rows, L tokens, P slots).

    input_ids: int32[B, L] corrupted ids; attention_mask: bool[B, L] (not padding);
    positions: int32[B, P] ascending; valid: bool[B, P]; labels: int32[B, P] original ids at the positions;
    segment_ids: int32[B, L] packed rows' documents (:mod:`flax_narrow.ops.packing`), or None.
    """

    input_ids: jax.Array
    attention_mask: jax.Array
    positions: jax.Array
    valid: jax.Array
    labels: jax.Array
    segment_ids: jax.Array | None = None


jax.tree_util.register_dataclass(
    MaskedBatch,
    data_fields=["input_ids", "attention_mask", "positions", "valid", "labels", "segment_ids"],
    meta_fields=[],
)


def maskable(input_ids_bl: jax.Array, special_token_ids: Sequence[int], pad_token_id: int) -> jax.Array:
    """bool[B, L]: tokens that may be selected (not padding, not any special id)."""
    special = jnp.asarray(sorted(set(special_token_ids) | {pad_token_id}), jnp.int32)
    return ~jnp.isin(input_ids_bl, special)


def mask_tokens(
    input_ids_bl: jax.Array,
    key: jax.Array,
    spec: MaskingSpec,
    row_ids_b: jax.Array | None = None,
    segment_ids_bl: jax.Array | None = None,
) -> MaskedBatch:
    """Select and corrupt tokens of ``input_ids_bl`` (int32[B, L]); see the module docstring.

    Each row draws from ``fold_in(key, row_id)`` (``row_ids_b``: int32[B], default 0..B-1), so a row's masks
    depend on its index in the global batch only, not on how the batch is split into micro-batches.
    ``segment_ids_bl`` (int32[B, L], packed rows; 0 = padding): segment 0 is never selected nor attended, and
    the ids travel on in the batch to the model.
    """
    ids = input_ids_bl.astype(jnp.int32)
    p = spec.max_predictions
    batch, length = ids.shape
    if row_ids_b is None:
        row_ids_b = jnp.arange(batch, dtype=jnp.int32)
    row_keys = jax.vmap(lambda r: jax.random.split(jax.random.fold_in(key, r), 3))(row_ids_b)
    k_select, k_kind, k_random = row_keys[:, 0], row_keys[:, 1], row_keys[:, 2]
    candidate_bl = maskable(ids, spec.special_token_ids, spec.pad_token_id)
    attention_bl = ids != spec.pad_token_id
    if segment_ids_bl is not None:
        segment_ids_bl = segment_ids_bl.astype(jnp.int32)
        candidate_bl = candidate_bl & (segment_ids_bl > 0)
        attention_bl = attention_bl & (segment_ids_bl > 0)
    count_b = candidate_bl.sum(axis=1, dtype=jnp.int32)
    # BERT: round(c * prob), at least 1, at most P (never more than there are candidates).
    want_b = jnp.round(count_b.astype(jnp.float32) * spec.mask_prob).astype(jnp.int32)
    want_b = jnp.minimum(jnp.clip(want_b, 1, p), count_b)
    # A uniform random subset of size want: the candidates with the `want` smallest random scores.
    score_bl = jnp.where(candidate_bl, jax.vmap(lambda k: jax.random.uniform(k, (length,)))(k_select), 2.0)
    rank_bl = jnp.argsort(jnp.argsort(score_bl, axis=1, stable=True), axis=1, stable=True)
    selected_bl = candidate_bl & (rank_bl < want_b[:, None])
    positions_bp, valid_bp, _ = mask_to_positions(selected_bl, p)  # want <= P: no overflow possible
    # Labels and corrupted ids through a (B, P, L) one-hot rather than an integer gather and a scatter: the
    # compares are elementwise along the batch, so they partition trivially on any mesh, and B*P*L integer
    # ops cost nothing next to the model.
    hit_bpl = valid_bp[:, :, None] & (positions_bp[:, :, None] == jnp.arange(length, dtype=jnp.int32))
    labels_bp = jnp.sum(jnp.where(hit_bpl, ids[:, None, :], 0), axis=-1, dtype=jnp.int32)
    # 80/10/10 per selected slot.
    u_bp = jax.vmap(lambda k: jax.random.uniform(k, (p,)))(k_kind)
    random_ids_bp = jax.vmap(lambda k: jax.random.randint(k, (p,), 0, spec.vocab_size, dtype=jnp.int32))(k_random)
    new_bp = jnp.where(
        u_bp < spec.mask_token_prob,
        spec.mask_token_id,
        jnp.where(u_bp < spec.mask_token_prob + spec.random_token_prob, random_ids_bp, labels_bp),
    )
    replaced_bl = jnp.any(hit_bpl, axis=1)
    new_bl = jnp.sum(jnp.where(hit_bpl, new_bp[:, :, None], 0), axis=1, dtype=jnp.int32)
    corrupted = jnp.where(replaced_bl, new_bl, ids)
    return MaskedBatch(
        input_ids=corrupted,
        attention_mask=attention_bl,
        positions=positions_bp,
        valid=valid_bp,
        labels=labels_bp,
        segment_ids=segment_ids_bl,
    )


def expected_predictions(
    input_ids_bl: np.ndarray, spec: MaskingSpec, segment_ids_bl: np.ndarray | None = None
) -> np.ndarray:
    """int[B]: how many slots :func:`mask_tokens` fills per row (host-side reference for tests and FLOPs)."""
    ids = np.asarray(input_ids_bl)
    special = np.asarray(sorted(set(spec.special_token_ids) | {spec.pad_token_id}))
    ok = ~np.isin(ids, special)
    if segment_ids_bl is not None:
        ok &= np.asarray(segment_ids_bl) > 0
    count = ok.sum(axis=1)
    want = np.clip(np.round(count * spec.mask_prob).astype(int), 1, spec.max_predictions)
    return np.minimum(want, count)
