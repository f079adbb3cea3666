"""Sharding rules, sharded state creation, and the exactness of training on 8 devices against 1 device."""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P
from train_helpers import reference_overrides

from flax_narrow.config import EncoderConfig
from flax_narrow.errors import ConfigError
from flax_narrow.train import sharding as shd
from flax_narrow.train import step as S
from flax_narrow.train.config import MeshConfig, TrainConfig, load_config
from flax_narrow.train.loop import pretrain
from flax_narrow.train.optimizer import make_optimizer


def _mesh(data, fsdp, tensor):
    return shd.make_mesh(MeshConfig(data, fsdp, tensor))


def test_rules_table_to_partition_specs():
    m = _mesh(2, 4, 1)
    assert shd.logical_to_spec(("vocab", "embed"), (128, 32), m) == P(None, "fsdp")
    assert shd.logical_to_spec(("norm",), (32,), m) == P(None)
    m = _mesh(1, 2, 4)
    assert shd.logical_to_spec(("vocab", "embed"), (128, 32), m) == P("tensor", "fsdp")
    assert shd.logical_to_spec(("embed", "mlp"), (32, 64), m) == P("fsdp", "tensor")
    assert shd.logical_to_spec(("embed", "mlp"), (32, 37), m) == P("fsdp", None)  # 37 % 4: replicated
    assert shd.logical_to_spec(("embed", "embed"), (32, 32), m) == P("fsdp", None)  # an axis is used once
    with pytest.raises(ConfigError, match="no rule"):
        shd.logical_to_spec(("mystery",), (4,), m)


def test_mesh_shapes_and_refusals():
    assert dict(_mesh(-1, 2, 1).shape) == {"data": 4, "fsdp": 2, "tensor": 1}
    assert _mesh(1, 1, 1).devices.size == 1
    with pytest.raises(ConfigError, match="needs 16 devices"):
        _mesh(4, 4, 1)
    with pytest.raises(ConfigError, match="not divisible"):
        _mesh(-1, 3, 1)
    with pytest.raises(ConfigError, match="data, fsdp and tensor all > 1"):
        _mesh(2, 2, 2)


def test_state_is_created_sharded_including_the_optimizer_state():
    mesh = _mesh(2, 4, 1)
    cfg = EncoderConfig.tiny_narrowbert(intermediate_size=64)
    tx = make_optimizer(TrainConfig())
    state, rest, spec = S.create_state(cfg, tx, mesh)
    params = dict(jax.tree_util.tree_flatten_with_path(state.params)[0])
    word = params[next(k for k in params if "word_embeddings" in jax.tree_util.keystr(k))]
    assert word.sharding.spec == P(None, "fsdp") and shd.shard_fraction(word) == 0.25
    # Every Adam moment is sharded exactly like its parameter; counters are replicated.
    adam = state.opt_state[1][0]
    for moments in (adam.mu, adam.nu):
        for (path, p), (_, m) in zip(
            jax.tree_util.tree_flatten_with_path(state.params)[0], jax.tree_util.tree_flatten_with_path(moments)[0]
        ):
            assert m.sharding == p.sharding, jax.tree_util.keystr(path)
    assert adam.count.sharding.is_fully_replicated
    sharded = [x for x in jax.tree.leaves(state) if not x.sharding.is_fully_replicated]
    assert len(sharded) > 2 * len(params) * 0.6  # most params and their two moments are split
    assert all(x.sharding.mesh.devices.size == 8 for x in jax.tree.leaves(state))


def _cfg(data_cache, mesh):
    overrides = reference_overrides(data_cache, **{"mesh.data": mesh[0], "mesh.fsdp": mesh[1], "mesh.tensor": mesh[2]})
    return load_config("tiny", None, overrides)


@pytest.mark.slow
def test_eight_devices_match_one_device_over_50_steps(data_cache, reference_run):
    # fp32, dropout on, 2 micro-batches per step; masks and dropout are functions of (seed, step) only.
    a = np.array([h["loss"] for h in reference_run["history"]])
    eight = pretrain(_cfg(data_cache, (2, 4, 1)))  # data x fsdp
    b = np.array([h["loss"] for h in eight.history])
    assert len(a) == len(b) == 50 and a[-5:].mean() < a[:5].mean() - 0.3  # it trains
    np.testing.assert_allclose(b, a, rtol=1e-5)
    ref_acc = [h["accuracy"] for h in reference_run["history"]]
    np.testing.assert_allclose([h["accuracy"] for h in eight.history], ref_acc)
    np.testing.assert_allclose(
        [e["eval_loss"] for e in eight.evals], [e["eval_loss"] for e in reference_run["evals"]], rtol=1e-5
    )
    word = eight.state.params["bert"]["embeddings"]["word_embeddings"]["embedding"]
    assert word.sharding.spec == P(None, "fsdp") and shd.shard_fraction(word) == 0.25
    # Tensor parallelism (fsdp x tensor): the same run's first 10 steps.
    tp = pretrain(_cfg(data_cache, (1, 2, 4)), stop_at=10)
    np.testing.assert_allclose([h["loss"] for h in tp.history], a[:10], rtol=1e-5)
    word = tp.state.params["bert"]["embeddings"]["word_embeddings"]["embedding"]
    assert word.sharding.spec == P("tensor", "fsdp") and shd.shard_fraction(word) == 1 / 8
