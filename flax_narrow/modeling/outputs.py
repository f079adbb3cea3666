"""Model output containers (pytrees, so jitted functions can return them). Field names follow transformers."""

from __future__ import annotations

from typing import Any

import jax
from flax import struct


@struct.dataclass
class EncoderOutput:
    """last_hidden_state: (B, L, H), or (B, P, H) on the narrow path; pooler_output: (B, H) or None."""

    last_hidden_state: jax.Array
    pooler_output: jax.Array | None = None
    hidden_states: tuple[jax.Array, ...] | None = None
    attentions: tuple[jax.Array, ...] | None = None
    narrow_positions: jax.Array | None = None
    narrow_valid: jax.Array | None = None


@struct.dataclass
class MaskedLMOutput:
    """logits: (B, P, V) at the given positions, or (B, L, V) densely."""

    logits: jax.Array
    loss: jax.Array | None = None
    hidden_states: tuple[jax.Array, ...] | None = None
    attentions: tuple[jax.Array, ...] | None = None
    narrow_positions: jax.Array | None = None
    narrow_valid: jax.Array | None = None


@struct.dataclass
class SequenceClassifierOutput:
    """logits: (B, num_labels); for multiple choice (B, C)."""

    logits: jax.Array
    loss: jax.Array | None = None
    hidden_states: tuple[jax.Array, ...] | None = None
    attentions: tuple[jax.Array, ...] | None = None


MultipleChoiceModelOutput = SequenceClassifierOutput


@struct.dataclass
class TokenClassifierOutput:
    """logits: (B, L, num_labels), or (B, P, num_labels) on the narrow path."""

    logits: jax.Array
    loss: jax.Array | None = None
    hidden_states: tuple[jax.Array, ...] | None = None
    attentions: tuple[jax.Array, ...] | None = None
    narrow_positions: jax.Array | None = None
    narrow_valid: jax.Array | None = None


@struct.dataclass
class QuestionAnsweringModelOutput:
    """start_logits, end_logits: (B, L)."""

    start_logits: jax.Array
    end_logits: jax.Array
    loss: jax.Array | None = None
    hidden_states: tuple[jax.Array, ...] | None = None
    attentions: tuple[jax.Array, ...] | None = None


def to_tuple(output: Any) -> tuple:
    """The non-None fields in order, like transformers' ``return_dict=False``."""
    return tuple(v for v in vars(output).values() if v is not None)
