"""Sequence packing: several documents in one row, kept apart by segment ids.

Convention: ``segment_ids`` int32[B, L] numbers the documents of a row 1, 2, ... (each a contiguous run of
tokens) and marks padding 0. A token attends only to tokens of its own segment, and its position counts from
the start of its segment, so a packed row computes exactly what each document computes alone.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def segment_position_ids(segment_ids_bl: jax.Array) -> jax.Array:
    """int32[B, L]: each token's index within its (contiguous) segment.

    >>> segment_position_ids(jnp.array([[1, 1, 1, 2, 2, 0]])).tolist()
    [[0, 1, 2, 0, 1, 0]]
    """
    seg = jnp.asarray(segment_ids_bl)
    idx = jnp.broadcast_to(jnp.arange(seg.shape[1], dtype=jnp.int32), seg.shape)
    starts = jnp.concatenate([jnp.ones_like(seg[:, :1], bool), seg[:, 1:] != seg[:, :-1]], axis=1)
    first = jax.lax.cummax(jnp.where(starts, idx, 0), axis=1)
    return idx - first


def segment_attention_mask(query_segments_bt: jax.Array, key_segments_bs: jax.Array) -> jax.Array:
    """bool[B, T, S]: query t may attend key s (same segment, and the key is not padding)."""
    q = jnp.asarray(query_segments_bt)[:, :, None]
    k = jnp.asarray(key_segments_bs)[:, None, :]
    return (q == k) & (k > 0)
