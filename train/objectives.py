"""Training objectives on the P predicted rows: MLM cross-entropy / accuracy and Hinton distillation.

Everything is returned as *sums* over valid rows with the row count, so that micro-batches (gradient
accumulation) and shards combine exactly: the step divides the summed loss by the global count once.
Logits are upcast to fp32 before any softmax.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def mlm_sums(logits_bpv: jax.Array, labels_bp: jax.Array, valid_bp: jax.Array) -> dict[str, jax.Array]:
    """Summed cross-entropy, correct predictions and count over valid slots.

    Args:
      logits_bpv: float[B, P, V] MLM logits at the predicted positions.
      labels_bp: int32[B, P] original token ids.
      valid_bp: bool[B, P] slots that hold a prediction.

    Returns:
      {"ce_sum": f32[], "correct": f32[], "count": f32[]}.
    """
    logits = logits_bpv.astype(jnp.float32)
    weight = valid_bp.astype(jnp.float32)
    ce_bp = optax.softmax_cross_entropy_with_integer_labels(logits, labels_bp)
    correct_bp = (jnp.argmax(logits, axis=-1) == labels_bp).astype(jnp.float32)
    return {
        "ce_sum": jnp.sum(ce_bp * weight),
        "correct": jnp.sum(correct_bp * weight),
        "count": jnp.sum(weight),
    }


def kd_sum(
    student_logits_bpv: jax.Array, teacher_logits_bpv: jax.Array, valid_bp: jax.Array, temperature: float
) -> jax.Array:
    """Hinton distillation summed over valid slots: ``T^2 * KL(softmax(t/T) || softmax(s/T))`` per slot,
    the KL summed over the vocabulary. Gradients flow to the student only.

    Args:
      student_logits_bpv, teacher_logits_bpv: float[B, P, V] (same vocabulary).
      valid_bp: bool[B, P].
      temperature: T > 0.
    """
    t = jax.lax.stop_gradient(teacher_logits_bpv.astype(jnp.float32)) / temperature
    s = student_logits_bpv.astype(jnp.float32) / temperature
    log_pt = jax.nn.log_softmax(t, axis=-1)
    log_ps = jax.nn.log_softmax(s, axis=-1)
    kl_bp = jnp.sum(jnp.exp(log_pt) * (log_pt - log_ps), axis=-1)
    return (temperature**2) * jnp.sum(kl_bp * valid_bp.astype(jnp.float32))
