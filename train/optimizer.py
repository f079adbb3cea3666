"""The optax optimizer: AdamW or LAMB, linear warmup then linear/polynomial decay, global-norm clipping,
and no weight decay on biases, LayerNorm parameters or the MLM output bias.

Gradient accumulation is not an optax wrapper here: the train step scans over micro-batches and sums their
gradients before one update (see :mod:`flax_narrow.train.step`), which keeps a single compiled step.
"""

from __future__ import annotations

from typing import Any

import jax
import optax
from flax import nnx

from .config import TrainConfig

# Parameter names (last path element) that take weight decay: Linear kernels and embedding tables.
DECAYED_NAMES = frozenset({"kernel", "embedding"})


def learning_rate_schedule(cfg: TrainConfig) -> optax.Schedule:
    """0 -> ``learning_rate`` linearly over the warmup steps, then to ``end_learning_rate`` at ``steps``
    (``decay``: linear, poly with ``poly_power``, or constant)."""
    warmup = cfg.num_warmup_steps
    rest = max(cfg.steps - warmup, 1)
    if cfg.decay == "constant":
        decay = optax.constant_schedule(cfg.learning_rate)
    else:
        power = 1.0 if cfg.decay == "linear" else cfg.poly_power
        decay = optax.polynomial_schedule(cfg.learning_rate, cfg.end_learning_rate, power, rest)
    if warmup == 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, cfg.learning_rate, warmup), decay], [warmup])


def _path_name(path: tuple) -> str:
    last = path[-1]
    return str(getattr(last, "key", getattr(last, "name", getattr(last, "idx", last))))


def weight_decay_mask(params: Any) -> Any:
    """A bool tree (prefix of ``params``): True for kernels and embeddings, False for biases and LayerNorm."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: _path_name(path) in DECAYED_NAMES,
        params,
        is_leaf=lambda x: isinstance(x, nnx.Variable),
    )


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    """The full transformation: optional global-norm clipping, then AdamW or LAMB with the schedule."""
    schedule = learning_rate_schedule(cfg)
    if cfg.optimizer == "adamw":
        core = optax.adamw(
            schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay, mask=weight_decay_mask
        )
    else:
        core = optax.lamb(
            schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay, mask=weight_decay_mask
        )
    if cfg.clip_norm is None:
        return core
    return optax.chain(optax.clip_by_global_norm(cfg.clip_norm), core)
