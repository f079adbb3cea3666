"""Analytic FLOP counts for BERT and NarrowBERT MLM training, and the MFU estimate built on them.

Matrix multiplications only (2 FLOPs per multiply-add); embeddings lookups, LayerNorm, softmax and other
elementwise work are left out, as in the usual MFU convention. Per sequence of L tokens with P predicted
rows, hidden H, FFN I, vocabulary V, N layers of which F are full length:

* full layer:   2·L·(4H² + 2HI)              (Q, K, V, output projections; FFN)  + 4·L²·H   (QKᵀ, AV)
* narrow layer: 2·L·2H²                      (K, V of the frozen context C, all L tokens)
                + 2·P·(2H² + 2HI)            (Q, output projection and FFN on the P rows)  + 4·P·L·H
* MLM head:     2·P·H² + 2·P·H·V             (transform and tied decoder, on the P rows only)

Training costs 3x the forward (backward = 2x). A distillation teacher adds one forward of its own.
"""

from __future__ import annotations

import logging

from flax_narrow.config import EncoderConfig

log = logging.getLogger(__name__)

# Dense bf16 peak FLOP/s per JAX device, by a substring of ``device.device_kind`` (first match wins).
PEAK_FLOPS: tuple[tuple[str, float], ...] = (
    ("TPU v6 lite", 918e12),
    ("TPU v5 lite", 197e12),
    ("TPU v5p", 459e12),
    ("TPU v5", 459e12),
    ("TPU v4", 275e12),
    ("TPU v3", 61.5e12),  # per core (a JAX device), 123 per chip
    ("TPU v2", 23e12),
    ("H200", 989e12),
    ("H100", 989e12),
    ("A100", 312e12),
    ("L4", 121e12),
    ("A10G", 70e12),
    ("V100", 125e12),
)


def encoder_forward_flops(config: EncoderConfig, seq_len: int, predictions: int) -> float:
    """Matmul FLOPs of one MLM forward for one sequence (see the module docstring)."""
    h, i, v, length, p = config.hidden_size, config.intermediate_size, config.vocab_size, seq_len, predictions
    full = 2 * length * (4 * h * h + 2 * h * i) + 4 * length * length * h
    narrow = 2 * length * 2 * h * h + 2 * p * (2 * h * h + 2 * h * i) + 4 * p * length * h
    head = 2 * p * h * h + 2 * p * h * v
    return float(config.num_full_layers * full + config.num_narrow_layers * narrow + head)


def train_step_flops(
    config: EncoderConfig,
    *,
    batch: int,
    seq_len: int,
    predictions: int,
    teacher: EncoderConfig | None = None,
) -> float:
    """FLOPs of one optimizer step over ``batch`` sequences (all micro-batches): 3x the student forward,
    plus one teacher forward when distilling."""
    flops = 3.0 * encoder_forward_flops(config, seq_len, predictions)
    if teacher is not None:
        flops += encoder_forward_flops(teacher, seq_len, predictions)
    return batch * flops


def peak_flops_per_device(device_kind: str, override_tflops: float | None = None) -> float | None:
    """Peak FLOP/s of one device: the override (in TFLOP/s), the table entry, or None (unknown, e.g. CPU)."""
    if override_tflops is not None:
        return override_tflops * 1e12
    for key, value in PEAK_FLOPS:
        if key.lower() in device_kind.lower():
            return value
    return None


def mfu(
    flops_per_step: float, steps_per_second: float, num_devices: int, peak_per_device: float | None
) -> float | None:
    """Model FLOPs utilisation in [0, 1], or None when the peak is unknown."""
    if peak_per_device is None or steps_per_second <= 0:
        return None
    return flops_per_step * steps_per_second / (num_devices * peak_per_device)
