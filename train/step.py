"""The train state, its sharded creation, and the one pure jitted train step (plus the eval step).

The model is split once (``nnx.split``) into a static graph definition, its parameters and the rest of its
state (dropout RNG streams). The step merges them back, reseeds the dropout streams from (seed, step,
micro-batch), masks the batch on device, runs the student (and the frozen teacher), scans over the
micro-batches summing gradients, then applies one optimizer update guarded against non-finite values.

Shapes: A accumulation steps, Bm rows per micro-batch (all hosts), L tokens, P predicted slots, V vocabulary.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from flax_narrow.config import EncoderConfig
from flax_narrow.errors import ConfigError
from flax_narrow.modeling import BertForMaskedLM

from . import sharding as shd
from .config import KDConfig
from .masking import MaskingSpec, mask_tokens
from .objectives import kd_sum, mlm_sums

log = logging.getLogger(__name__)

# Streams folded into the per-step key.
_MASK_STREAM, _DROPOUT_STREAM, _EVAL_STREAM = 0, 1, 2


@dataclasses.dataclass(frozen=True)
class TrainState:
    """step: int32[]; params: nnx.State of Params; opt_state: the optax state (moments mirror params)."""

    step: jax.Array
    params: Any
    opt_state: Any


jax.tree_util.register_dataclass(TrainState, data_fields=["step", "params", "opt_state"], meta_fields=[])


@dataclasses.dataclass(frozen=True)
class ModelParts:
    """A split model: static graph, parameters and the non-parameter state (RNG streams)."""

    graphdef: Any
    params: Any
    rest: Any


def split_model(model: nnx.Module) -> ModelParts:
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    return ModelParts(graphdef, params, rest)


def abstract_model(config: EncoderConfig, seed: int = 0) -> ModelParts:
    """Shapes and metadata only (nothing allocated)."""
    return split_model(nnx.eval_shape(lambda: BertForMaskedLM(config, rngs=nnx.Rngs(seed))))


@dataclasses.dataclass(frozen=True)
class StateSpec:
    """Everything about the train state except its values: graph, abstract state and rest, their shardings."""

    graphdef: Any
    abstract: TrainState
    shardings: TrainState
    abstract_rest: Any
    rest_shardings: Any


def _init_fn(config: EncoderConfig, tx: optax.GradientTransformation, seed: int) -> Callable:
    def init() -> tuple[TrainState, Any]:
        model = BertForMaskedLM(config, rngs=nnx.Rngs(seed))
        _, params, rest = nnx.split(model, nnx.Param, ...)
        return TrainState(jnp.zeros((), jnp.int32), params, tx.init(params)), rest

    return init


def state_spec(config: EncoderConfig, tx: optax.GradientTransformation, mesh: Mesh, *, seed: int = 0) -> StateSpec:
    """Shapes and shardings of the train state (``eval_shape``: nothing is allocated)."""
    abstract_state, abstract_rest = jax.eval_shape(_init_fn(config, tx, seed))
    return StateSpec(
        graphdef=abstract_model(config, seed).graphdef,
        abstract=abstract_state,
        shardings=shd.tree_shardings(abstract_state, mesh),
        abstract_rest=abstract_rest,
        rest_shardings=shd.tree_shardings(abstract_rest, mesh),
    )


def rest_like(abstract_rest: Any, shardings: Any) -> Any:
    """Concrete non-parameter state (dropout streams) of the given structure: fixed keys, zero counts. The
    step reseeds the streams from (seed, step), so these values never matter. Created under jit so that it
    also works when the shardings span several processes."""

    def leaf(a: jax.ShapeDtypeStruct) -> jax.Array:
        if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
            return jax.random.key(0) if a.shape == () else jax.random.split(jax.random.key(0), a.shape)
        return jnp.zeros(a.shape, a.dtype)

    return jax.jit(lambda: jax.tree.map(leaf, abstract_rest), out_shardings=shardings)()


def init_rest(spec: StateSpec) -> Any:
    """The student's non-parameter state (see :func:`rest_like`)."""
    return rest_like(spec.abstract_rest, spec.rest_shardings)


def init_state(
    spec: StateSpec,
    config: EncoderConfig,
    tx: optax.GradientTransformation,
    *,
    seed: int = 0,
    init_params: Any | None = None,
) -> TrainState:
    """The train state created sharded inside jit: parameters and optimizer state are born on their shards.

    Args:
      init_params: parameters to start from (e.g. a converted checkpoint): put onto their shards, and the
        optimizer state is initialised from them inside jit.
    """
    if init_params is None:
        init = _init_fn(config, tx, seed)
        return jax.jit(lambda: init()[0], out_shardings=spec.shardings)()
    # Host copies first: a device_put from host memory also works when the shardings span processes.
    params = jax.device_put(jax.tree.map(np.asarray, init_params), spec.shardings.params)

    def from_params(p):
        return TrainState(jnp.zeros((), jnp.int32), p, tx.init(p))

    return jax.jit(from_params, in_shardings=(spec.shardings.params,), out_shardings=spec.shardings)(params)


def create_state(
    config: EncoderConfig,
    tx: optax.GradientTransformation,
    mesh: Mesh,
    *,
    seed: int = 0,
    init_params: Any | None = None,
) -> tuple[TrainState, Any, StateSpec]:
    """(state, rest, spec): :func:`state_spec` + :func:`init_state` + :func:`init_rest`."""
    spec = state_spec(config, tx, mesh, seed=seed)
    state = init_state(spec, config, tx, seed=seed, init_params=init_params)
    return state, init_rest(spec), spec


@dataclasses.dataclass(frozen=True)
class Teacher:
    """A frozen teacher model, split; its parameters are sharded by the same rules as the student's."""

    graphdef: Any
    params: Any
    rest: Any
    config: EncoderConfig


def shard_teacher(model: nnx.Module, mesh: Mesh) -> Teacher:
    parts = split_model(model)
    params = jax.device_put(jax.tree.map(np.asarray, parts.params), shd.tree_shardings(parts.params, mesh))
    abstract_rest = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), parts.rest)
    rest = rest_like(abstract_rest, shd.tree_shardings(parts.rest, mesh))
    return Teacher(parts.graphdef, params, rest, model.config)


def _forward(graphdef, params, rest, masked, *, deterministic: bool, dropout_key=None) -> jax.Array:
    # copy=True: fresh Variables in this trace, so reseeding the dropout streams is allowed under grad.
    model = nnx.merge(graphdef, params, rest, copy=True)
    if dropout_key is not None:
        nnx.reseed(model, default=dropout_key)
    out = model(
        masked.input_ids,
        masked.attention_mask,
        narrow_positions=masked.positions,
        narrow_valid=masked.valid,
        segment_ids=masked.segment_ids,
        deterministic=deterministic,
    )
    return out.logits


def step_keys(seed: int, step: jax.Array, micro: jax.Array | int) -> tuple[jax.Array, jax.Array]:
    """(mask key, dropout key) of a step: pure functions of (seed, step), so a resumed run draws the same.

    The mask key is the same for every micro-batch (rows fold in their global index, see
    :func:`~flax_narrow.train.masking.mask_tokens`); the dropout key also folds in the micro-batch.
    """
    base = jax.random.fold_in(jax.random.key(seed), step)
    return jax.random.fold_in(base, _MASK_STREAM), jax.random.fold_in(jax.random.fold_in(base, _DROPOUT_STREAM), micro)


def guarded_update(
    tx: optax.GradientTransformation, state: TrainState, grads: Any, loss: jax.Array
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer update, applied only when ``loss`` and the gradient norm are finite (``step`` always
    advances). Shared by every objective (pretraining, fine-tuning, vmapped candidates).

    Returns: (new state, {grad_norm, param_norm, update_norm, finite, leaf_grad_norms f32[num_params]}); the
    leaf norms name the parameters in :func:`nonfinite_message`.
    """
    leaf_norms = jnp.stack([jnp.sqrt(jnp.sum(jnp.square(g.astype(jnp.float32)))) for g in jax.tree.leaves(grads)])
    grad_norm = jnp.sqrt(jnp.sum(jnp.square(leaf_norms)))
    updates, new_opt = tx.update(grads, state.opt_state, state.params)
    new_params = optax.apply_updates(state.params, updates)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

    def keep(new, old):
        return jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)

    new_state = TrainState(state.step + 1, keep(new_params, state.params), keep(new_opt, state.opt_state))
    return new_state, {
        "grad_norm": grad_norm,
        "param_norm": optax.tree.norm(new_state.params),
        "update_norm": optax.tree.norm(updates),
        "finite": finite,
        "leaf_grad_norms": leaf_norms,
    }


def leaf_names(tree: Any) -> list[str]:
    """Key paths of the leaves of ``tree`` (the order of ``leaf_grad_norms``)."""
    return [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def nonfinite_message(step: int, rec: dict[str, Any], leaf_norms: np.ndarray, names: list[str], hint: str) -> str:
    """One line: the step, loss, gradient norm, the parameters whose gradients are not finite and the largest
    finite ones, then ``hint`` (what to change)."""
    bad = [names[i] for i in np.flatnonzero(~np.isfinite(leaf_norms))]
    top = sorted(
        ((float(leaf_norms[i]), names[i]) for i in range(len(names)) if np.isfinite(leaf_norms[i])), reverse=True
    )[:3]
    return (
        f"non-finite training at step {step}: loss={rec['loss']}, grad_norm={rec['grad_norm']}, "
        f"learning_rate={rec['learning_rate']:.3g}; the update was not applied. Parameters with non-finite "
        f"gradients: {bad[:8] or 'none'}; largest finite gradient norms: "
        + ", ".join(f"{n}={v:.3g}" for v, n in top)
        + f". {hint}"
    )


def aot_compile(
    fn: Callable,
    abstract_args: tuple,
    *,
    in_shardings: Any,
    out_shardings: Any,
    donate_argnums: tuple[int, ...] = (0,),
    name: str = "train",
) -> tuple[Any, float, dict[str, int]]:
    """``jax.jit`` with explicit shardings and donation, lowered and compiled before use; logs the compile
    time and XLA's memory analysis. Returns (compiled, seconds, memory)."""
    t0 = time.perf_counter()
    jitted = jax.jit(fn, in_shardings=in_shardings, out_shardings=out_shardings, donate_argnums=donate_argnums)
    compiled = jitted.lower(*abstract_args).compile()
    seconds = time.perf_counter() - t0
    memory = _memory(compiled)
    log.info("compiled the %s step in %.1f s; memory %s", name, seconds, memory)
    return compiled, seconds, memory


def make_train_step(
    graphdef: Any,
    tx: optax.GradientTransformation,
    masking: MaskingSpec,
    *,
    seed: int,
    schedule: optax.Schedule,
    kd: KDConfig,
    teacher_graphdef: Any | None = None,
) -> Callable:
    """The pure step ``(state, ids int32[A, Bm, L], rest, teacher_params, teacher_rest, segment_ids) ->
    (state, metrics)``; ``segment_ids`` int32[A, Bm, L] for packed rows whose documents must not see each other
    (``data.packing="segments"``), or None.

    ``metrics`` holds scalars (loss, mlm_loss, kd_loss, accuracy, predictions, tokens, grad_norm,
    param_norm, update_norm, learning_rate, finite) and ``leaf_grad_norms`` f32[num_params] for diagnostics.
    The update is applied only when the loss and gradient norm are finite; ``step`` always advances.
    """
    use_kd = kd.enabled
    if use_kd and teacher_graphdef is None:
        raise ConfigError("kd is enabled but no teacher graph was given")
    w_mlm, w_kd, temp = float(kd.mlm_weight), float(kd.kd_weight), float(kd.temperature)

    def micro_sums(params, rest, t_params, t_rest, ids_bl, seg_bl, step, micro):
        mask_key, drop_key = step_keys(seed, step, micro)
        rows = ids_bl.shape[0]
        row_ids = micro * rows + jnp.arange(rows, dtype=jnp.int32)
        masked = mask_tokens(ids_bl, mask_key, masking, row_ids, segment_ids_bl=seg_bl)

        def objective(p):
            logits = _forward(graphdef, p, rest, masked, deterministic=False, dropout_key=drop_key)
            sums = mlm_sums(logits, masked.labels, masked.valid)
            total = w_mlm * sums["ce_sum"]
            if use_kd:
                t_logits = _forward(teacher_graphdef, t_params, t_rest, masked, deterministic=True)
                sums["kd_sum"] = kd_sum(logits, t_logits, masked.valid, temp)
                total = total + w_kd * sums["kd_sum"]
            sums["objective_sum"] = total
            sums["tokens"] = masked.attention_mask.sum().astype(jnp.float32)
            return total, sums

        (_, sums), grads = jax.value_and_grad(objective, has_aux=True)(params)
        return grads, sums

    def train_step(state: TrainState, ids_abl: jax.Array, rest, t_params, t_rest, seg_abl=None):
        accum = ids_abl.shape[0]
        zero_grads = jax.tree.map(jnp.zeros_like, state.params)

        def body(carry, xs):
            g_acc, s_acc = carry
            ids_bl, seg_bl, micro = xs
            g, s = micro_sums(state.params, rest, t_params, t_rest, ids_bl, seg_bl, state.step, micro)
            g_acc = jax.tree.map(jnp.add, g_acc, g)
            s_acc = jax.tree.map(jnp.add, s_acc, s)
            return (g_acc, s_acc), None

        seg0 = None if seg_abl is None else seg_abl[0]
        s0 = jax.eval_shape(
            lambda: micro_sums(state.params, rest, t_params, t_rest, ids_abl[0], seg0, state.step, 0)[1]
        )
        s0 = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), s0)
        (grads, sums), _ = jax.lax.scan(body, (zero_grads, s0), (ids_abl, seg_abl, jnp.arange(accum)))
        count = jnp.maximum(sums["count"], 1.0)
        grads = jax.tree.map(lambda g: g / count, grads)
        loss = sums["objective_sum"] / count
        new_state, guard = guarded_update(tx, state, grads, loss)
        metrics = {
            "loss": loss,
            "mlm_loss": sums["ce_sum"] / count,
            "accuracy": sums["correct"] / count,
            "predictions": sums["count"],
            "tokens": sums["tokens"],
            **guard,
            "learning_rate": jnp.asarray(schedule(state.step), jnp.float32),
        }
        if use_kd:
            metrics["kd_loss"] = sums["kd_sum"] / count
        return new_state, metrics

    return train_step


def make_eval_step(
    graphdef: Any, masking: MaskingSpec, *, seed: int, kd: KDConfig, teacher_graphdef: Any | None = None
) -> Callable:
    """``(params, ids int32[Bm, L], index int32[], rest, t_params, t_rest, segment_ids int32[Bm, L] or None) ->
    sums``: deterministic (no dropout), masks drawn from (seed, index) so every evaluation of the same batch sees
    the same masks."""
    use_kd = kd.enabled

    def eval_step(params, ids_bl, index, rest, t_params, t_rest, seg_bl=None):
        masked = mask_tokens(ids_bl, eval_mask_key(seed, index), masking, segment_ids_bl=seg_bl)
        logits = _forward(graphdef, params, rest, masked, deterministic=True)
        sums = mlm_sums(logits, masked.labels, masked.valid)
        if use_kd:
            t_logits = _forward(teacher_graphdef, t_params, t_rest, masked, deterministic=True)
            sums["kd_sum"] = kd_sum(logits, t_logits, masked.valid, kd.temperature)
        return sums

    return eval_step


def eval_mask_key(seed: int, index: jax.Array | int) -> jax.Array:
    """The mask key of eval batch ``index``."""
    return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), _EVAL_STREAM), index)


def _concrete_shardings(tree: Any) -> Any:
    return jax.tree.map(lambda x: x.sharding, tree)


@dataclasses.dataclass
class CompiledSteps:
    """The AOT-compiled train (and eval) steps; ``compile_seconds`` is the train step's lowering + compile."""

    train: Any
    eval: Any | None
    compile_seconds: float
    memory: dict[str, int]
    xla_flops: float | None


def compile_steps(
    train_step: Callable,
    eval_step: Callable | None,
    spec: StateSpec,
    mesh: Mesh,
    *,
    accum: int,
    micro_batch: int,
    seq_len: int,
    rest: Any,
    teacher: Teacher | None,
    segment_ids: bool = False,
) -> CompiledSteps:
    """``jax.jit`` with explicit in/out shardings and the state donated, lowered and compiled before the loop.

    ``segment_ids``: the steps take the rows' segment ids too (sharded like the token ids); else None there.
    """
    state, state_sharding = spec.abstract, spec.shardings
    ids_sharding = shd.batch_sharding(mesh, 3, batch_dim=1)
    rest_sh = _concrete_shardings(rest)
    t_params = teacher.params if teacher is not None else None
    t_rest = teacher.rest if teacher is not None else None
    t_params_sh = _concrete_shardings(t_params) if teacher is not None else None
    t_rest_sh = _concrete_shardings(t_rest) if teacher is not None else None
    replicated = NamedSharding(mesh, PartitionSpec())
    metric_sh = replicated
    t0 = time.perf_counter()
    jitted = jax.jit(
        train_step,
        in_shardings=(
            state_sharding,
            ids_sharding,
            rest_sh,
            t_params_sh,
            t_rest_sh,
            ids_sharding if segment_ids else None,
        ),
        out_shardings=(state_sharding, metric_sh),
        donate_argnums=(0,),
    )
    ids_abs = jax.ShapeDtypeStruct((accum, micro_batch, seq_len), jnp.int32, sharding=ids_sharding)
    seg_abs = ids_abs if segment_ids else None
    lowered = jitted.lower(shd.abstract_with_shardings(state, state_sharding), ids_abs, rest, t_params, t_rest, seg_abs)
    compiled = lowered.compile()
    seconds = time.perf_counter() - t0
    eval_compiled = None
    if eval_step is not None:
        e_ids = shd.batch_sharding(mesh, 2)
        ejit = jax.jit(
            eval_step,
            in_shardings=(
                state_sharding.params,
                e_ids,
                replicated,
                rest_sh,
                t_params_sh,
                t_rest_sh,
                e_ids if segment_ids else None,
            ),
            out_shardings=replicated,
        )
        e_abs = jax.ShapeDtypeStruct((micro_batch, seq_len), jnp.int32, sharding=e_ids)
        eval_compiled = ejit.lower(
            shd.abstract_with_shardings(state.params, state_sharding.params),
            e_abs,
            jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated),
            rest,
            t_params,
            t_rest,
            e_abs if segment_ids else None,
        ).compile()
    memory = _memory(compiled)
    flops = _xla_flops(compiled)
    log.info("compiled the train step in %.1f s; memory %s; XLA flops/step %s", seconds, memory, flops)
    return CompiledSteps(compiled, eval_compiled, seconds, memory, flops)


def _memory(compiled: Any) -> dict[str, int]:
    try:
        m = compiled.memory_analysis()
    except Exception as e:  # not every backend implements it
        log.info("memory_analysis unavailable: %s", e)
        return {}
    if m is None:
        return {}
    names = (
        "argument_size_in_bytes",
        "output_size_in_bytes",
        "alias_size_in_bytes",
        "temp_size_in_bytes",
        "generated_code_size_in_bytes",
    )
    return {n: int(getattr(m, n)) for n in names if hasattr(m, n)}


def _xla_flops(compiled: Any) -> float | None:
    try:
        cost = compiled.cost_analysis()
    except Exception:
        return None
    if isinstance(cost, list):
        cost = cost[0] if cost else None
    return float(cost["flops"]) if cost and "flops" in cost else None
