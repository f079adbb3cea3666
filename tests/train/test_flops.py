"""The analytic FLOP count against XLA's own count of the compiled forward, and the MFU arithmetic."""

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from flax_narrow.config import EncoderConfig
from flax_narrow.modeling import BertForMaskedLM
from flax_narrow.train import flops as F


def _xla_forward_flops(cfg, batch, length, p):
    model = BertForMaskedLM(cfg, rngs=nnx.Rngs(0))
    g, params, rest = nnx.split(model, nnx.Param, ...)

    def fwd(params, ids, pos):
        out = nnx.merge(g, params, rest)(ids, narrow_positions=pos, narrow_valid=jnp.ones(pos.shape, bool))
        return out.logits

    ids = jax.ShapeDtypeStruct((batch, length), jnp.int32)
    pos = jax.ShapeDtypeStruct((batch, p), jnp.int32)
    cost = jax.jit(fwd).lower(params, ids, pos).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return float(cost["flops"])


def test_formula_matches_xla_for_bert_and_narrowbert():
    # Matmul-dominated sizes; XLA also counts elementwise work, so it is a little higher.
    shape = dict(vocab_size=1000, hidden_size=128, num_hidden_layers=4, num_attention_heads=4, intermediate_size=512)
    bert = EncoderConfig(**shape, max_position_embeddings=128)
    narrow = bert.replace(full_length_layers=1, model_type="narrow_bert")
    ours = {c: 2 * F.encoder_forward_flops(c, 128, 20) for c in (bert, narrow)}
    xla = {c: _xla_forward_flops(c, 2, 128, 20) for c in (bert, narrow)}
    for c in (bert, narrow):
        assert ours[c] == pytest.approx(xla[c], rel=0.12)
    assert ours[bert] / ours[narrow] == pytest.approx(xla[bert] / xla[narrow], rel=0.12)
    assert ours[bert] / ours[narrow] > 2


def test_identity_training_flops_and_mfu():
    bert = EncoderConfig.bert_base()
    # F = N: no narrow layers, the narrow formula is BERT's.
    assert F.encoder_forward_flops(bert.replace(full_length_layers=12), 512, 80) == F.encoder_forward_flops(
        bert, 512, 80
    )
    one = F.encoder_forward_flops(bert, 512, 80)
    assert F.train_step_flops(bert, batch=8, seq_len=512, predictions=80) == 8 * 3 * one
    teacher = EncoderConfig.roberta_large()
    with_t = F.train_step_flops(bert, batch=8, seq_len=512, predictions=80, teacher=teacher)
    assert with_t == 8 * (3 * one + F.encoder_forward_flops(teacher, 512, 80))
    assert F.peak_flops_per_device("TPU v4") == 275e12
    assert F.peak_flops_per_device("NVIDIA H100 80GB HBM3") == 989e12
    assert F.peak_flops_per_device("TPU v5 lite") == 197e12
    assert F.peak_flops_per_device("cpu") is None and F.peak_flops_per_device("cpu", 2.0) == 2e12
    assert F.mfu(1e12, 2.0, 4, 1e12) == 0.5 and F.mfu(1e12, 2.0, 4, None) is None
