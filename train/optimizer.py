"""The optax optimizer: AdamW or LAMB, linear warmup then linear/polynomial decay, global-norm clipping,
and no weight decay on biases, LayerNorm parameters or the MLM output bias.

Gradient accumulation is not an optax wrapper here: the train step scans over micro-batches and sums their
gradients before one update (see :mod:`flax_narrow.train.step`), which keeps a single compiled step.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from flax_narrow.errors import ConfigError

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


# ------------------------------------------------------------------------------------------------ fine-tuning
# Hyperparameters held in the optimizer state (``optax.inject_hyperparams``): arrays, so one compiled step can be
# ``jax.vmap`` ped over candidates that differ in them.
INJECTED = ("learning_rate", "weight_decay", "warmup_steps", "total_steps")


def warmup_linear_decay(count: jax.Array, peak: jax.Array, warmup: jax.Array, total: jax.Array) -> jax.Array:
    """0 -> ``peak`` linearly over ``warmup`` steps, then linearly to 0 at ``total`` (all may be traced)."""
    t = jnp.asarray(count, jnp.float32)
    warm = peak * t / jnp.maximum(warmup, 1.0)
    decay = peak * jnp.maximum(total - t, 0.0) / jnp.maximum(total - warmup, 1.0)
    return jnp.where(t < warmup, warm, decay)


def _finetune_tx(
    learning_rate: jax.Array,
    weight_decay: jax.Array,
    warmup_steps: jax.Array,
    total_steps: jax.Array,
    *,
    b1: float,
    b2: float,
    eps: float,
    clip_norm: float | None,
) -> optax.GradientTransformation:
    def schedule(count: jax.Array) -> jax.Array:
        return warmup_linear_decay(count, learning_rate, warmup_steps, total_steps)

    core = optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=weight_decay_mask)
    if clip_norm is None or clip_norm <= 0:
        return core
    return optax.chain(optax.clip_by_global_norm(clip_norm), core)


def make_finetune_optimizer(
    *,
    learning_rate: float,
    weight_decay: float,
    warmup_steps: int,
    total_steps: int,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    clip_norm: float | None = 1.0,
) -> optax.GradientTransformation:
    """AdamW (decoupled weight decay on kernels and embeddings only), global-norm clipping, linear warmup then
    linear decay to 0 at ``total_steps``: the pretraining pieces with the four :data:`INJECTED` values held in
    the optimizer state (``optax.inject_hyperparams``) so that :func:`set_hyperparams` can give each vmapped
    candidate its own."""
    factory = optax.inject_hyperparams(_finetune_tx, static_args=("b1", "b2", "eps", "clip_norm"))
    return factory(
        learning_rate=learning_rate,
        weight_decay=weight_decay,
        warmup_steps=float(warmup_steps),
        total_steps=float(total_steps),
        b1=b1,
        b2=b2,
        eps=eps,
        clip_norm=clip_norm,
    )


def set_hyperparams(opt_state: Any, **values: Any) -> Any:
    """The state of :func:`make_finetune_optimizer` with some :data:`INJECTED` values replaced (arrays of the
    state's leading shape, e.g. (K,) for K stacked candidates)."""
    unknown = set(values) - set(INJECTED)
    if unknown:
        raise ConfigError(f"not an injected hyperparameter: {sorted(unknown)}; injected: {INJECTED}")
    hp = dict(opt_state.hyperparams)
    for k, v in values.items():
        hp[k] = jnp.asarray(v, hp[k].dtype).reshape(hp[k].shape)
    return opt_state._replace(hyperparams=hp)


def current_learning_rate(opt_state: Any) -> jax.Array:
    """The learning rate the next update of a :func:`make_finetune_optimizer` state uses."""
    hp = opt_state.hyperparams
    return warmup_linear_decay(opt_state.count, hp["learning_rate"], hp["warmup_steps"], hp["total_steps"])
