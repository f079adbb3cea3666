"""Candidates side by side: K fine-tuning runs of one small model trained together in one compiled step.

The step is fine-tuning's (:func:`flax_narrow.train.finetune.make_train_step`: the pretraining
:class:`~flax_narrow.train.step.TrainState`, the non-finite guard :func:`~flax_narrow.train.step.guarded_update`
and the optimizer of :mod:`flax_narrow.train.optimizer`), which keeps its learning rate, weight decay and
schedule in the optimizer state (``optax.inject_hyperparams``), so ``jax.vmap`` over stacked train states,
batches and seeds trains K candidates at once. Like ``finetune`` it runs on a ``data x fsdp`` mesh
(:mod:`flax_narrow.train.sharding`; default every device on ``data``): each candidate's batch rows are split
over the batch axes, parameters and optimizer moments are sharded by the same rules as ``finetune``'s, the
candidate axis K of the stacked state is unsharded. The step is AOT-compiled (:func:`~flax_narrow.train.step.
aot_compile`: explicit shardings, the state donated, compile time and memory logged) once per (model, task,
mesh, K, batch shape) and reused by later groups and rounds.

Candidate k's initial head and dropout come from its seed, its data order from its seed too, so the result
equals running the K candidates one by one (``train_sequential``). All candidates of a group share the batch
size and step count (group candidates by batch size and epochs).

Non-finite steps: the guard never applies an update whose loss or gradient norm is not finite, per candidate.
With ``on_nonfinite="stop"`` (the default) the run raises :class:`~flax_narrow.errors.NonFiniteError` with the
shared message (:func:`~flax_narrow.train.step.nonfinite_message`: step, loss, the parameters whose gradients
are not finite) prefixed by the candidate's name; with ``"skip"`` that candidate's update is skipped (logged as
a warning naming it) while the others train on.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from flax_narrow.errors import ConfigError, InputError, NonFiniteError

from . import sharding as shd
from . import step as S
from .finetune import (
    FINETUNE_NONFINITE_HINT,
    FinetuneConfig,
    bort_head_init,
    forward_fn,
    global_batch,
    host_batch,
    init_train_state,
    make_optimizer,
    make_train_step,
    split_model,
    train_batches,
)
from .optimizer import set_hyperparams
from .step import TrainState
from .tasks import Task

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Candidate:
    """One hyperparameter set θ."""

    learning_rate: float = 3e-5
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    batch_size: int = 16
    seed: int = 0
    epochs: float = 3.0

    @property
    def name(self) -> str:
        return (
            f"lr{self.learning_rate:g}_wd{self.weight_decay:g}_wu{self.warmup_ratio:g}"
            f"_bs{self.batch_size}_s{self.seed}_ep{self.epochs:g}"
        )

    def config(self, base: FinetuneConfig) -> FinetuneConfig:
        return dataclasses.replace(
            base,
            learning_rate=self.learning_rate,
            weight_decay=self.weight_decay,
            warmup_ratio=self.warmup_ratio,
            batch_size=self.batch_size,
            seed=self.seed,
            epochs=self.epochs,
        )


# (model class, config, task, static optimizer settings, vmapped, K, mesh, batch shapes) -> the AOT-compiled step.
_STEPS: dict[Any, Any] = {}


def _stack(trees: Sequence[Any]) -> Any:
    return jax.tree.map(lambda *xs: np.stack(xs), *trees)


def _unstack(tree: Any, k: int) -> list[Any]:
    return [jax.tree.map(lambda x, i=i: x[i], tree) for i in range(k)]


def _init(model_factory: Callable[[int], Any], cand: Candidate, base: FinetuneConfig):
    model = model_factory(cand.seed)
    if base.head == "bort":
        bort_head_init(model, cand.seed)
    return (model, *split_model(model))


def _hyperparams(cfg: FinetuneConfig, n: int) -> dict[str, float]:
    total = cfg.total_steps(n)
    return {
        "learning_rate": cfg.learning_rate,
        "weight_decay": cfg.weight_decay,
        "warmup_steps": float(round(cfg.warmup_ratio * total)),
        "total_steps": float(total),
    }


def check_group(candidates: Sequence[Candidate]) -> None:
    """Raises ConfigError unless ``candidates`` is non-empty and shares batch size and epochs."""
    if not candidates:
        raise ConfigError("a candidate group is empty")
    if len({(c.batch_size, c.epochs) for c in candidates}) != 1:
        raise ConfigError("candidates trained side by side must share batch_size and epochs; use groups()")


def mesh_rest(rest: Any, mesh: Mesh) -> Any:
    """A model's non-parameter state (dropout streams) as the step takes it: replicated on ``mesh``."""
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), rest)
    return S.rest_like(abstract, shd.tree_shardings(abstract, mesh))


def abstract_params(params: Any, mesh: Mesh, k: int | None) -> Any:
    """Shapes and shardings (``jax.ShapeDtypeStruct``) of one candidate's ``params`` on ``mesh``, stacked K
    times on an unsharded leading axis unless ``k`` is None (a restore target for saved candidates)."""
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    sh = shd.tree_shardings(abstract, mesh)
    if k is None:
        return shd.abstract_with_shardings(abstract, sh)
    stacked = jax.tree.map(lambda x: jax.ShapeDtypeStruct((k, *x.shape), x.dtype), abstract)
    return shd.abstract_with_shardings(stacked, shd.stacked_shardings(sh))


class GroupTrainer:
    """One group of candidates (shared batch size and epochs) on a mesh: their initial train state (stacked on
    a leading axis K when ``vmapped``; one candidate's plain state otherwise), their batches, and the
    AOT-compiled step. :meth:`run` trains from any step to the end or until asked to stop, so an interrupted
    group continues from a saved state exactly.

    Args:
      model_factory: seed -> a fresh task model (pretrained body, head initialised from the seed).
      train: the encoded training set (host arrays, N rows).
      candidates: share ``batch_size`` and ``epochs``; exactly one when not ``vmapped``.
      base: the shared fine-tuning settings (head, clipping, Adam betas, ``on_nonfinite``, ``log_every``).
      mesh: a ``data x fsdp`` mesh (default every device on ``data``); the batch size must divide over it.
    """

    def __init__(
        self,
        model_factory: Callable[[int], Any],
        task: Task,
        train: dict[str, np.ndarray],
        candidates: Sequence[Candidate],
        base: FinetuneConfig | None = None,
        *,
        mesh: Mesh | None = None,
        vmapped: bool = True,
    ):
        check_group(candidates)
        if not vmapped and len(candidates) != 1:
            raise ConfigError(f"an unvmapped group trains one candidate, got {len(candidates)}")
        self.candidates, self.task, self.train = list(candidates), task, train
        self.base = base or FinetuneConfig()
        self.vmapped, self.k = vmapped, len(candidates)
        n = len(train["input_ids"])
        if n == 0:
            raise InputError("the training set is empty")
        self.batch_size = candidates[0].batch_size
        self.mesh = shd.ensure_batch_mesh(mesh, batch_size=self.batch_size)
        self.cfgs = [c.config(self.base) for c in candidates]
        self.total = self.cfgs[0].total_steps(n)
        splits = [_init(model_factory, c, self.base) for c in candidates]
        self.model0, self.graphdef = splits[0][0], splits[0][1]
        self.tx = make_optimizer(self.cfgs[0], n)
        one_abstract = jax.eval_shape(lambda p: init_train_state(p, self.tx), splits[0][2])
        one_sh = shd.tree_shardings(one_abstract, self.mesh)
        self.leaf_names = S.leaf_names(one_abstract.params)
        self.rest = mesh_rest(splits[0][3], self.mesh)
        self._rest_sh = jax.tree.map(lambda x: x.sharding, self.rest)
        self._replicated = NamedSharding(self.mesh, PartitionSpec())
        if vmapped:
            self._host_params = _stack([jax.tree.map(np.asarray, s[2]) for s in splits])
            self.state_sh = shd.stacked_shardings(one_sh)
            hp = {name: [_hyperparams(c, n)[name] for c in self.cfgs] for name in _hyperparams(self.base, n)}
            self._hp = {name: np.asarray(v, np.float32) for name, v in hp.items()}
            self.seeds = jax.device_put(np.asarray([c.seed for c in candidates], np.int32), self._replicated)
        else:
            self._host_params = jax.tree.map(np.asarray, splits[0][2])
            self.state_sh = one_sh
            self._hp = None
            self.seeds = jax.device_put(np.int32(candidates[0].seed), self._replicated)
        self.abstract = jax.eval_shape(self._init_fn, self._host_params)
        self._compiled: Any = None

    def _init_fn(self, params: Any) -> TrainState:
        if not self.vmapped:
            return init_train_state(params, self.tx)
        states = jax.vmap(lambda p: init_train_state(p, self.tx))(params)
        return dataclasses.replace(states, opt_state=set_hyperparams(states.opt_state, **self._hp))

    def init_state(self) -> TrainState:
        """Step 0: the candidates' initial parameters and fresh optimizer states, on their shards."""
        params = jax.device_put(self._host_params, self.state_sh.params)
        return jax.jit(self._init_fn, out_shardings=self.state_sh)(params)

    def abstract_state(self) -> Any:
        """The train state's shapes with its shardings (an orbax restore target)."""
        return shd.abstract_with_shardings(self.abstract, self.state_sh)

    def _batch(self, host: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
        return _stack(host) if self.vmapped else host[0]

    def _batch_shardings(self, batch: dict[str, np.ndarray]) -> dict[str, NamedSharding]:
        dim = 1 if self.vmapped else 0
        return {k: shd.batch_sharding(self.mesh, v.ndim, batch_dim=dim) for k, v in batch.items()}

    def compiled_step(self, batch: dict[str, np.ndarray]) -> Any:
        """The AOT-compiled step ``(state, rest, batch, seeds) -> (state, metrics)``, cached across groups and
        rounds by (model class, config, task, static optimizer settings, vmapped, K, mesh, batch shapes): the
        hyperparameters that differ between candidates live in the optimizer state, not in the key."""
        if self._compiled is not None:
            return self._compiled
        b = self.base
        shapes = tuple(sorted((k, v.shape, str(v.dtype)) for k, v in batch.items()))
        key = (type(self.model0), self.model0.config, self.task, b.head, b.b1, b.b2, b.eps, b.max_grad_norm,
               self.vmapped, self.k, self.mesh, shapes)  # fmt: skip
        if key not in _STEPS:
            if len(_STEPS) >= 16:
                _STEPS.clear()
            step = make_train_step(self.graphdef, forward_fn(self.task, b.head), self.tx)
            if self.vmapped:
                step = jax.vmap(step, in_axes=(0, None, 0, 0))
            batch_sh = self._batch_shardings(batch)
            batch_abs = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=batch_sh[k]) for k, v in batch.items()}
            seeds_abs = jax.ShapeDtypeStruct(self.seeds.shape, jnp.int32, sharding=self._replicated)
            _STEPS[key], _, _ = S.aot_compile(
                step,
                (self.abstract_state(), self.rest, batch_abs, seeds_abs),
                in_shardings=(self.state_sh, self._rest_sh, batch_sh, self._replicated),
                out_shardings=(self.state_sh, self._replicated),
                donate_argnums=(0,),
                name=f"candidates ({self.k} {'vmapped' if self.vmapped else 'one by one'})",
            )
        self._compiled = _STEPS[key]
        return self._compiled

    def run(
        self,
        state: TrainState,
        start: int = 0,
        *,
        should_stop: Callable[[], bool] | None = None,
        progress: Callable[[int, float], None] | None = None,
    ) -> tuple[TrainState, int]:
        """Train from step ``start`` (``state`` is the state after ``start`` steps) to :attr:`total`, or stop
        after the first step at which ``should_stop()`` is true. Returns (state, steps done).

        ``progress(steps, loss)`` is called every ``log_every`` steps (and at the end) with the number of
        new steps and the mean loss of the candidates at the last one.

        Raises:
          NonFiniteError: a candidate's step was not finite and ``on_nonfinite`` is ``"stop"``.
        """
        iters = [train_batches(self.train, self.batch_size, c.seed, start) for c in self.candidates]
        pending: list[tuple[int, Any]] = []
        step = start
        while step < self.total:
            batch = self._batch([host_batch(next(it)) for it in iters])
            compiled = self.compiled_step(batch)
            state, metrics = compiled(state, self.rest, global_batch(batch, self._batch_shardings(batch)), self.seeds)
            step += 1
            pending.append((step, metrics))
            stop = should_stop is not None and should_stop()
            if step % self.base.log_every == 0 or step == self.total or stop:
                self._flush(pending, progress)
            if stop:
                break
        return state, step

    def _flush(self, pending: list[tuple[int, Any]], progress: Callable[[int, float], None] | None) -> None:
        rows = jax.device_get([m for _, m in pending])
        for (step_no, _), m in zip(pending, rows):
            finite = np.atleast_1d(m["finite"])
            for i in np.flatnonzero(~finite):
                name = self.candidates[i].name
                if self.base.on_nonfinite == "stop":
                    rec = {k: float(np.atleast_1d(m[k])[i]) for k in ("loss", "grad_norm", "learning_rate")}
                    leaf = np.asarray(m["leaf_grad_norms"]).reshape(self.k, -1)[i]
                    msg = S.nonfinite_message(step_no, rec, leaf, self.leaf_names, FINETUNE_NONFINITE_HINT)
                    raise NonFiniteError(f"candidate {name}: {msg}")
                log.warning("candidate %s: step %d non-finite loss/gradients; update skipped", name, step_no)
        if progress is not None and rows:
            progress(len(rows), float(np.nanmean(np.atleast_1d(rows[-1]["loss"]))))
        pending.clear()

    def params(self, state: TrainState) -> list[Any]:
        """Each candidate's parameters (K of them) from a state of this group."""
        return _unstack(state.params, self.k) if self.vmapped else [state.params]

    def models(self, params: Any) -> list[Any]:
        """The K trained models (nnx modules) from this group's (stacked) parameters."""
        return models_from_params(self.graphdef, self.rest, params, self.k if self.vmapped else None)


def models_from_params(graphdef: Any, rest: Any, params: Any, k: int | None) -> list[Any]:
    """nnx modules from parameters stacked K times (``k``) or one candidate's (``k`` None)."""
    plist = [params] if k is None else _unstack(params, k)
    return [nnx.merge(graphdef, p, rest) for p in plist]


def train_side_by_side(
    model_factory: Callable[[int], Any],
    task: Task,
    train: dict[str, np.ndarray],
    candidates: Sequence[Candidate],
    base: FinetuneConfig | None = None,
    *,
    mesh: Mesh | None = None,
) -> list[Any]:
    """Train every candidate with one vmapped step on ``mesh``; returns the K trained models (nnx modules).

    Args:
      model_factory: seed -> a fresh task model (pretrained body, head initialised from the seed).
      candidates: share ``batch_size`` and ``epochs`` (use :func:`groups` to split a Θ).
      mesh: default every device on ``data``; ``batch_size`` must divide over data x fsdp.
    """
    trainer = GroupTrainer(model_factory, task, train, candidates, base, mesh=mesh)
    state, _ = trainer.run(trainer.init_state())
    return trainer.models(state.params)


def train_sequential(
    model_factory: Callable[[int], Any],
    task: Task,
    train: dict[str, np.ndarray],
    candidates: Sequence[Candidate],
    base: FinetuneConfig | None = None,
    *,
    mesh: Mesh | None = None,
) -> list[Any]:
    """The reference: the same step (not vmapped), data order and seeds, one candidate after another."""
    models = []
    for c in candidates:
        trainer = GroupTrainer(model_factory, task, train, [c], base, mesh=mesh, vmapped=False)
        state, _ = trainer.run(trainer.init_state())
        models += trainer.models(state.params)
    return models


def groups(candidates: Sequence[Candidate]) -> list[list[Candidate]]:
    """Split Θ into groups that can train side by side (same batch size and epochs), order kept."""
    out: dict[tuple[int, float], list[Candidate]] = {}
    for c in candidates:
        out.setdefault((c.batch_size, c.epochs), []).append(c)
    return list(out.values())


def bort_grid(epochs: float = 50.0) -> list[Candidate]:
    """The released BORT grid ("initial Θ", 480 sets): lr {1e-4, 1e-5, 9e-6} x weight decay {0, 10, 100, 350}
    x warmup {0.35, 0.40, 0.45, 0.50} x batch {8, 16} x seeds 0-4.

    The weight decays are as released; with decoupled decay (``p -= lr * wd * p``) values >= 10 shrink the
    weights by lr*wd per step, which users reported as near-random accuracy. Prefer a pruned Θ in practice.
    """
    return [
        Candidate(lr, wd, wu, bs, seed, epochs)
        for lr in (1e-4, 1e-5, 9e-6)
        for wd in (0.0, 10.0, 100.0, 350.0)
        for wu in (0.35, 0.40, 0.45, 0.50)
        for bs in (8, 16)
        for seed in range(5)
    ]
