"""The train step itself: gradient accumulation equals one big batch, the non-finite guard keeps the state,
bf16 compute keeps fp32 parameters."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flax_narrow.config import EncoderConfig
from flax_narrow.train import sharding as shd
from flax_narrow.train import step as S
from flax_narrow.train.config import KDConfig, MeshConfig, TrainConfig
from flax_narrow.train.masking import MaskingSpec
from flax_narrow.train.optimizer import learning_rate_schedule, make_optimizer

SPEC = MaskingSpec(max_predictions=6, vocab_size=64, mask_token_id=4, pad_token_id=0, special_token_ids=(0, 1, 2, 3, 4))
MODEL = EncoderConfig.tiny(
    vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
    hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, full_length_layers=1, model_type="narrow_bert",
)  # fmt: skip


def _ids(rng, batch=8, length=24):
    ids = rng.integers(5, 64, size=(batch, length)).astype(np.int32)
    ids[:, 0], ids[:, -1] = 2, 3
    ids[1, 12:] = 0
    return ids


def _run(model_cfg, accum, batches, **train_kw):
    mesh = shd.make_mesh(MeshConfig(1, 1, 1))
    tcfg = TrainConfig(steps=10, global_batch_size=8, grad_accum_steps=accum, learning_rate=1e-2, **train_kw)
    tx = make_optimizer(tcfg)
    state, rest, spec = S.create_state(model_cfg, tx, mesh, seed=0)
    fn = S.make_train_step(spec.graphdef, tx, SPEC, seed=0, schedule=learning_rate_schedule(tcfg), kd=KDConfig())
    step = jax.jit(fn)
    out = []
    for ids in batches:
        state, m = step(state, jnp.asarray(ids).reshape(accum, -1, ids.shape[-1]), rest, None, None)
        out.append(jax.device_get(m))
    return state, out


@pytest.mark.slow
def test_accumulation_equals_one_big_batch_and_the_guard_keeps_the_state():
    rng = np.random.default_rng(0)
    batches = [_ids(rng) for _ in range(4)]
    one_state, one = _run(MODEL, 1, batches)
    two_state, two = _run(MODEL, 2, batches)
    np.testing.assert_allclose([m["loss"] for m in two], [m["loss"] for m in one], rtol=1e-5)
    np.testing.assert_allclose([m["grad_norm"] for m in two], [m["grad_norm"] for m in one], rtol=1e-4)
    assert [m["predictions"] for m in two] == [m["predictions"] for m in one]
    for a, b in zip(jax.tree.leaves(two_state.params), jax.tree.leaves(one_state.params)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)

    # A non-finite loss: the update is not applied (parameters and optimizer state kept), the step advances.
    mesh = shd.make_mesh(MeshConfig(1, 1, 1))
    tcfg = TrainConfig(steps=10, global_batch_size=8)
    tx = make_optimizer(tcfg)
    state, rest, spec = S.create_state(MODEL, tx, mesh, seed=0)
    bias = state.params["cls"]["predictions"]["bias"]
    bias.set_value(bias.get_value().at[5].set(jnp.inf))
    before = jax.device_get((state.params, state.opt_state))
    fn = S.make_train_step(spec.graphdef, tx, SPEC, seed=0, schedule=learning_rate_schedule(tcfg), kd=KDConfig())
    new, m = jax.jit(fn)(state, jnp.asarray(batches[0])[None], rest, None, None)
    assert not bool(m["finite"]) and int(new.step) == 1
    for a, b in zip(jax.tree.leaves(jax.device_get((new.params, new.opt_state))), jax.tree.leaves(before)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_bf16_compute_keeps_fp32_parameters_and_trains():
    cfg = MODEL.replace(dtype="bfloat16")
    rng = np.random.default_rng(1)
    batch = _ids(rng)
    state, out = _run(cfg, 1, [batch] * 6, warmup_steps=0)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.params))
    losses = [float(m["loss"]) for m in out]
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]  # the same batch six times: it must fit it
