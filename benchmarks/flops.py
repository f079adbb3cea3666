"""Analytic FLOP counts (2 FLOPs per multiply-add) for BERT-family and NarrowBERT steps.

Forward matmul FLOPs only (embeddings, LayerNorm, softmax and activations are < 1% at these sizes);
a training step counts 3x the forward (forward + backward for activations and weights).
"""

from __future__ import annotations

from flax_narrow.config import EncoderConfig
from flax_narrow.modeling.layers import use_absorbed_attention


def full_layer_flops(cfg: EncoderConfig, batch: int, length: int) -> float:
    h, f = cfg.hidden_size, cfg.intermediate_size
    proj = 4 * h * h + 2 * h * f  # Q, K, V, O and the FFN, per token
    attn = 2 * length * h  # scores and context, per token
    return 2.0 * batch * length * (proj + attn)


def narrow_layer_flops(cfg: EncoderConfig, batch: int, length: int, rows: int) -> float:
    h, f, n = cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads
    if use_absorbed_attention(cfg, rows):
        per_row = 2 * h * h + 2 * n * length * h + h * h + 2 * h * f  # q, q·Wkᵀ, A·C, ·Wv; O; FFN
        return 2.0 * batch * rows * (per_row + h * h)  # + the query projection
    kv = 2 * length * h * h  # K and V of every token
    per_row = h * h + 2 * length * h + h * h + 2 * h * f  # Q; attention; O; FFN
    return 2.0 * batch * (kv + rows * per_row)


def mlm_head_flops(cfg: EncoderConfig, batch: int, rows: int) -> float:
    return 2.0 * batch * rows * (cfg.hidden_size * cfg.hidden_size + cfg.hidden_size * cfg.vocab_size)


def forward_flops(cfg: EncoderConfig, batch: int, length: int, rows: int | None, head: str = "mlm") -> float:
    """Forward FLOPs. ``rows``: selected rows P (None: all L rows). ``head``: 'mlm', 'cls' or 'none'."""
    full = cfg.num_full_layers
    total = full * full_layer_flops(cfg, batch, length)
    narrow_rows = length if rows is None else rows
    if cfg.is_narrow:
        total += cfg.num_narrow_layers * narrow_layer_flops(cfg, batch, length, narrow_rows)
    if head == "mlm":
        total += mlm_head_flops(cfg, batch, narrow_rows)
    elif head == "cls":
        total += 2.0 * batch * cfg.hidden_size * cfg.hidden_size
    return total


def train_step_flops(cfg: EncoderConfig, batch: int, length: int, rows: int | None) -> float:
    return 3.0 * forward_flops(cfg, batch, length, rows, "mlm")
