"""Static-shape selection of rows: a bool mask (B, L) becomes (positions int32[B, P], valid bool[B, P]).

P is a static budget, so a jitted function that consumes the result compiles once per (B, L, P) whatever the
mask holds. Positions are in ascending order; padded slots point at position 0 and are marked invalid.
More selected positions than P is never silently truncated: :func:`positions_from_mask` raises on the host
(concrete input) and :func:`mask_to_positions` returns an ``overflow`` flag inside jit.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from flax_narrow.errors import InputError, NarrowOverflowError


def mask_to_positions(mask_bl: jax.Array, max_positions: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Selected positions of each row, ascending, padded to a static ``max_positions``.

    Args:
      mask_bl: bool[B, L], True where a row is selected.
      max_positions: P, the static budget of slots per row.

    Returns:
      positions_bp: int32[B, P] (0 in padded slots), valid_bp: bool[B, P], overflow_b: bool[B]
      (True where a row selected more than P positions; the first P are kept).
    """
    mask_bl = jnp.asarray(mask_bl, dtype=bool)
    _, length = mask_bl.shape
    if max_positions < 1:
        raise InputError(f"max_positions must be >= 1, got {max_positions}")
    # Rank of every selected position within its row (0-based); unselected positions get rank >= P (dropped).
    rank_bl = jnp.cumsum(mask_bl, axis=1, dtype=jnp.int32) - 1
    slot_bl = jnp.where(mask_bl & (rank_bl < max_positions), rank_bl, max_positions)
    idx_l = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), mask_bl.shape)
    positions_bp = jax.vmap(
        lambda slot, idx: jnp.zeros((max_positions + 1,), jnp.int32).at[slot].set(idx, mode="drop")
    )(slot_bl, idx_l)[:, :max_positions]
    count_b = mask_bl.sum(axis=1, dtype=jnp.int32)
    valid_bp = jnp.arange(max_positions, dtype=jnp.int32)[None, :] < count_b[:, None]
    return positions_bp, valid_bp, count_b > max_positions


def positions_from_mask(
    mask_bl: np.ndarray | jax.Array, max_positions: int | None = None
) -> tuple[jax.Array, jax.Array]:
    """Host-side convenience: like :func:`mask_to_positions` but raises on overflow.

    ``max_positions=None`` uses the largest count in the batch (as the original NarrowBERT code pads).

    Raises:
      NarrowOverflowError: naming the rows that selected more than ``max_positions`` positions.
    """
    mask = np.asarray(mask_bl, dtype=bool)
    if mask.ndim != 2:
        raise InputError(f"narrow mask must be bool[B, L], got shape {mask.shape}")
    counts = mask.sum(axis=1)
    if max_positions is None:
        max_positions = max(int(counts.max(initial=0)), 1)
    over = np.flatnonzero(counts > max_positions)
    if over.size:
        raise NarrowOverflowError(
            f"rows {over.tolist()} select {counts[over].tolist()} positions but the budget is P={max_positions}; "
            "raise max_positions or select fewer positions"
        )
    positions, valid, _ = mask_to_positions(jnp.asarray(mask), max_positions)
    return positions, valid


def gather_rows(x_bl: jax.Array, positions_bp: jax.Array) -> jax.Array:
    """x[b, positions[b, p]]: (B, L, ...) -> (B, P, ...)."""
    idx = positions_bp.reshape(positions_bp.shape + (1,) * (x_bl.ndim - 2))
    return jnp.take_along_axis(x_bl, idx, axis=1)


def scatter_rows(
    x_bp: jax.Array, positions_bp: jax.Array, valid_bp: jax.Array, length: int, fill_value: float = 0.0
) -> jax.Array:
    """Inverse of :func:`gather_rows`: (B, P, ...) -> (B, L, ...) with ``fill_value`` at unselected positions.

    Invalid (padded) slots are dropped, so they never overwrite position 0.
    """
    batch = x_bp.shape[0]
    out = jnp.full((batch, length) + x_bp.shape[2:], fill_value, dtype=x_bp.dtype)
    # Route invalid slots to index ``length`` (out of bounds) and drop them.
    target_bp = jnp.where(valid_bp, positions_bp, length)
    return jax.vmap(lambda o, t, v: o.at[t].set(v, mode="drop"))(out, target_bp, x_bp)
