"""Learning-rate schedules, the weight-decay mask, clipping and the choice of AdamW / LAMB."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from flax_narrow.config import EncoderConfig
from flax_narrow.modeling import BertForMaskedLM
from flax_narrow.train.config import TrainConfig
from flax_narrow.train.optimizer import learning_rate_schedule, make_optimizer, weight_decay_mask


def test_warmup_then_linear_and_poly_decay():
    cfg = TrainConfig(steps=100, learning_rate=1e-3, warmup_steps=10, end_learning_rate=1e-4)
    lr = learning_rate_schedule(cfg)
    assert float(lr(0)) == 0.0
    np.testing.assert_allclose([lr(5), lr(10), lr(55), lr(100)], [5e-4, 1e-3, 5.5e-4, 1e-4], rtol=1e-5)
    poly = learning_rate_schedule(cfg.__class__(**{**cfg.__dict__, "decay": "poly", "poly_power": 2.0}))
    np.testing.assert_allclose(poly(55), 1e-4 + (1e-3 - 1e-4) * 0.5**2, rtol=1e-5)
    const = learning_rate_schedule(TrainConfig(steps=100, learning_rate=2e-3, warmup_ratio=0.0, decay="constant"))
    np.testing.assert_allclose([const(0), const(99)], [2e-3, 2e-3])
    assert TrainConfig(steps=100, warmup_ratio=0.02).num_warmup_steps == 2


def _params():
    model = BertForMaskedLM(EncoderConfig.tiny_narrowbert(), rngs=nnx.Rngs(0))
    return nnx.state(model, nnx.Param)


def test_no_weight_decay_on_biases_and_layernorm():
    params = _params()
    mask = weight_decay_mask(params)
    flat = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_flatten_with_path(mask)[0]}
    decayed = sorted(k for k, v in flat.items() if v)
    assert decayed and all(k.endswith(("['kernel']", "['embedding']")) for k in decayed)
    assert not any(v for k, v in flat.items() if "LayerNorm" in k or k.endswith("['bias']"))
    assert flat["['cls']['predictions']['bias']"] is False
    # Decay acts where the mask says: with zero gradients only decayed parameters move.
    tx = make_optimizer(TrainConfig(learning_rate=0.1, warmup_ratio=0.0, decay="constant", weight_decay=0.5))
    zeros = jax.tree.map(jnp.zeros_like, params)
    upd, _ = tx.update(zeros, tx.init(params), params)
    moved = {
        jax.tree_util.keystr(p): bool(np.abs(np.asarray(u)).max() > 0)
        for p, u in jax.tree_util.tree_flatten_with_path(upd)[0]
    }
    nonzero_params = {
        jax.tree_util.keystr(p): bool(np.abs(np.asarray(x)).max() > 0)
        for p, x in jax.tree_util.tree_flatten_with_path(params)[0]
    }
    for k, v in flat.items():
        key = k + ".value" if k + ".value" in moved else k
        assert moved[key] == (v and nonzero_params[key]), k


@pytest.mark.parametrize("name", ["adamw", "lamb"])
def test_optimizers_clip_and_step(name):
    params = {"w": jnp.ones((4, 4)), "b": jnp.ones((4,))}
    grads = {"w": jnp.full((4, 4), 100.0), "b": jnp.full((4,), 100.0)}
    cfg = TrainConfig(optimizer=name, learning_rate=1e-2, warmup_ratio=0.0, decay="constant", clip_norm=1.0)
    tx = make_optimizer(cfg)
    clipped, _ = optax.clip_by_global_norm(1.0).update(grads, optax.EmptyState())
    np.testing.assert_allclose(optax.tree.norm(clipped), 1.0, rtol=1e-6)
    updates, _ = tx.update(grads, tx.init(params), params)
    assert all(np.isfinite(np.asarray(u)).all() for u in jax.tree.leaves(updates))
    assert float(optax.tree.norm(updates)) > 0
    # Clipping comes first: the clipped chain equals the bare optimizer fed clipped gradients.
    bare = make_optimizer(
        TrainConfig(optimizer=name, learning_rate=1e-2, warmup_ratio=0.0, decay="constant", clip_norm=None)
    )
    expected, _ = bare.update(clipped, bare.init(params), params)
    for a, b in zip(jax.tree.leaves(updates), jax.tree.leaves(expected)):
        np.testing.assert_allclose(a, b, rtol=1e-6)
