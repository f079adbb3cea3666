"""Losses, computed in fp32, with transformers' conventions (mean over non-ignored targets, ignore index -100)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

IGNORE_INDEX = -100


def masked_cross_entropy(logits_nc: jax.Array, labels_n: jax.Array, weights_n: jax.Array | None = None) -> jax.Array:
    """Mean cross-entropy over entries whose label is not -100 (and whose weight is nonzero).

    Args:
      logits_nc: (..., C) logits, any float dtype (upcast to fp32).
      labels_n: (...) int labels; -100 marks entries to ignore.
      weights_n: optional (...) bool/float mask multiplied in (e.g. ``narrow_valid``).
    """
    keep = labels_n != IGNORE_INDEX
    if weights_n is not None:
        keep = keep & (weights_n > 0)
    safe = jnp.where(keep, labels_n, 0)
    per = optax.softmax_cross_entropy_with_integer_labels(logits_nc.astype(jnp.float32), safe)
    denom = jnp.maximum(keep.sum(), 1)
    return jnp.where(keep, per, 0.0).sum() / denom


def classification_loss(
    logits_bc: jax.Array, labels: jax.Array, num_labels: int, problem_type: str | None
) -> jax.Array:
    """transformers' rule: regression for 1 label, single-label for int labels, multi-label otherwise."""
    if problem_type is None:
        if num_labels == 1:
            problem_type = "regression"
        elif jnp.issubdtype(labels.dtype, jnp.integer):
            problem_type = "single_label_classification"
        else:
            problem_type = "multi_label_classification"
    logits = logits_bc.astype(jnp.float32)
    if problem_type == "regression":
        pred = logits.squeeze(-1) if num_labels == 1 else logits
        return jnp.mean((pred - labels.astype(jnp.float32).reshape(pred.shape)) ** 2)
    if problem_type == "single_label_classification":
        return masked_cross_entropy(logits, labels.reshape(-1) if logits.ndim == 2 else labels)
    return optax.sigmoid_binary_cross_entropy(logits, labels.astype(jnp.float32)).mean()
