"""Fine-tuning on the pretraining machinery: one objective (a task loss and its data), not a second loop.

The optimizer is :func:`flax_narrow.train.optimizer.make_finetune_optimizer` (optax AdamW with decoupled
weight decay on kernels and embeddings, global-norm clipping, linear warmup over ``warmup_ratio`` of the steps
then linear decay to 0), with its learning rate, weight decay and schedule injected into the optimizer state
(``optax.inject_hyperparams``): that is what lets :mod:`flax_narrow.train.candidates` ``jax.vmap`` the very
same step over K candidates with different hyperparameters. The state is the pretraining
:class:`~flax_narrow.train.step.TrainState`; the update goes through the same non-finite guard; the step is
AOT-compiled with explicit shardings on a device mesh; metrics go to the same writer; checkpoints are orbax
checkpoints (:mod:`flax_narrow.train.checkpoint`) and a resumed run is bit-exact.

BORT recipe: ``head="bort"`` gives the released head (first-token row -> dropout -> Dense tanh -> dropout ->
Dense, weights U(-0.5, 0.5), biases 0); use ``pair_format="single_sep"`` (``<s> A </s> B </s>``), many epochs
and warmup ratios 0.35-0.5 (see docs/finetuning.md).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from flax_narrow.errors import ConfigError, InputError, NonFiniteError

from . import checkpoint as ckpt
from . import collapse
from . import sharding as shd
from . import step as S
from . import tasks as tasks_lib
from .finetune_data import batches
from .finetune_outputs import write_outputs
from .metrics import MetricsWriter, progress_bar
from .optimizer import current_learning_rate, make_finetune_optimizer
from .step import TrainState
from .tasks import Task

log = logging.getLogger(__name__)

HEADS = ("standard", "bort")
NONFINITE_ACTIONS = ("stop", "skip")
_DROPOUT_STREAM = 1


@dataclasses.dataclass(frozen=True)
class FinetuneConfig:
    """Hyperparameters of one fine-tuning run."""

    learning_rate: float = 3e-5
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    epochs: float = 3.0
    batch_size: int = 16
    eval_batch_size: int = 64
    seed: int = 0
    max_grad_norm: float = 1.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    # Evaluate (and checkpoint) every N steps (0: at the end of every epoch).
    eval_every: int = 0
    # Stop after this many evaluations without improvement (0: never).
    patience: int = 0
    head: str = "standard"
    # Train metrics (loss, grad norm, learning rate) are fetched and written every N steps.
    log_every: int = 10
    progress_bar: bool = True
    # A step whose loss or gradients are not finite is never applied; "stop" raises, "skip" goes on.
    on_nonfinite: str = "stop"
    keep_checkpoints: int = 2

    def __post_init__(self) -> None:
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ConfigError(msg)

        need(self.head in HEADS, f"head must be one of {HEADS}, got {self.head!r}")
        need(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")
        need(self.eval_batch_size >= 1, f"eval_batch_size must be >= 1, got {self.eval_batch_size}")
        need(math.isfinite(self.epochs) and self.epochs > 0, f"epochs must be > 0, got {self.epochs}")
        need(
            math.isfinite(self.learning_rate) and self.learning_rate > 0,
            f"learning rate must be > 0, got {self.learning_rate}",
        )
        need(self.weight_decay >= 0, f"weight decay must be >= 0, got {self.weight_decay}")
        need(0 <= self.warmup_ratio <= 1, f"warmup_ratio must be in [0, 1], got {self.warmup_ratio}")
        need(self.eval_every >= 0, f"eval_every must be >= 0 (0: every epoch), got {self.eval_every}")
        need(self.patience >= 0, f"patience must be >= 0 (0: off), got {self.patience}")
        need(self.log_every >= 1, f"log_every must be >= 1, got {self.log_every}")
        need(self.max_grad_norm >= 0, f"max_grad_norm must be >= 0 (0: no clipping), got {self.max_grad_norm}")
        need(
            self.on_nonfinite in NONFINITE_ACTIONS,
            f"on_nonfinite must be one of {NONFINITE_ACTIONS}, got {self.on_nonfinite!r}",
        )
        need(self.keep_checkpoints >= 1, f"keep_checkpoints must be >= 1, got {self.keep_checkpoints}")

    def total_steps(self, n_train: int) -> int:
        per_epoch = max(n_train // self.batch_size, 1)
        return max(int(math.ceil(per_epoch * self.epochs)), 1)


# ------------------------------------------------------------------------------------------------ the head
def bort_head_init(model: Any, seed: int) -> None:
    """BORT's released head init: pooler and classifier kernels U(-0.5, 0.5), biases 0 (in place)."""
    keys = jax.random.split(jax.random.key(seed), 2)
    for key, layer in zip(keys, (model.bert.pooler.dense, model.classifier)):
        k = layer.kernel
        k.set_value(jax.random.uniform(key, k.shape, k.dtype, -0.5, 0.5))
        layer.bias.set_value(jnp.zeros_like(layer.bias[...]))


def bort_head_forward(model: Any, batch: dict[str, Any], *, deterministic: bool, task: Task) -> tuple[Any, Any]:
    """The released head: first-token row -> dropout -> Dense tanh (the pooler) -> dropout -> classifier.

    Same parameters as ``BertForSequenceClassification`` (checkpoints load into it; at evaluation, where
    dropout is off, the two are the same function); only the extra dropout before the pooler differs.
    """
    from flax_narrow.modeling.losses import classification_loss

    out = model.bert(
        batch["input_ids"],
        batch["attention_mask"],
        batch.get("token_type_ids"),
        cls_only=True,
        deterministic=deterministic,
    )
    h = model.dropout(out.last_hidden_state[:, 0], deterministic=deterministic)
    pooled = jnp.tanh(model.bert.pooler.dense(h))
    logits = model.classifier(model.dropout(pooled, deterministic=deterministic))
    cfg = model.config
    labels = batch.get("labels")
    loss = None if labels is None else classification_loss(logits, labels, cfg.num_labels, cfg.problem_type)
    return loss, (logits[..., 0] if task.kind == "regression" else logits)


def forward_fn(task: Task, head: str) -> Callable[..., tuple[Any, Any]]:
    if head == "bort":
        if task.kind not in ("classification", "regression", "multilabel"):
            raise ConfigError(f"the BORT head is a sequence-classification head; task {task.kind!r} cannot use it")
        return lambda model, batch, deterministic: bort_head_forward(
            model, batch, deterministic=deterministic, task=task
        )
    return lambda model, batch, deterministic: tasks_lib.forward(task, model, batch, deterministic=deterministic)


# ------------------------------------------------------------------------------------------------ the step
def make_optimizer(cfg: FinetuneConfig, n_train: int) -> optax.GradientTransformation:
    """The fine-tuning optimizer of :mod:`flax_narrow.train.optimizer` (AdamW, clipping, warmup + linear decay),
    with this run's hyperparameters injected into its state."""
    total = cfg.total_steps(n_train)
    return make_finetune_optimizer(
        learning_rate=cfg.learning_rate,
        weight_decay=cfg.weight_decay,
        warmup_steps=round(cfg.warmup_ratio * total),
        total_steps=total,
        b1=cfg.b1,
        b2=cfg.b2,
        eps=cfg.eps,
        clip_norm=cfg.max_grad_norm if cfg.max_grad_norm > 0 else None,
    )


def dropout_key(seed: jax.Array, step: jax.Array) -> jax.Array:
    """The dropout key of a step: a pure function of (seed, step), so a resumed run draws the same masks."""
    return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), step), _DROPOUT_STREAM)


def make_train_step(graphdef: Any, forward: Callable, tx: optax.GradientTransformation) -> Callable:
    """The pure step ``(state, rest, batch, seed int32[]) -> (state, metrics)`` on a :class:`TrainState`.

    Dropout is reseeded from (seed, step) (``rest``, the RNG state, is only a template); the update goes
    through :func:`~flax_narrow.train.step.guarded_update`, the pretraining guard (skipped when the loss or
    gradient norm is not finite). ``metrics``: loss, learning_rate, grad_norm, param_norm, update_norm,
    finite, leaf_grad_norms. Not jitted here: :func:`finetune` AOT-compiles it with shardings, candidates
    ``jax.vmap`` it first.
    """

    def step(state: TrainState, rest: Any, batch: dict[str, Any], seed: jax.Array):
        key = dropout_key(seed, state.step)

        def loss_fn(p):
            model = nnx.merge(graphdef, p, rest, copy=True)
            nnx.reseed(model, default=key)
            loss, _ = forward(model, batch, False)
            return loss

        loss, grads = jax.value_and_grad(loss_fn)(state.params)
        new_state, guard = S.guarded_update(tx, state, grads, loss)
        return new_state, {"loss": loss, "learning_rate": current_learning_rate(state.opt_state), **guard}

    return step


def init_train_state(params: Any, tx: optax.GradientTransformation) -> TrainState:
    """Step 0, ``params`` and a fresh optimizer state (pure: jit or vmap it)."""
    return TrainState(jnp.zeros((), jnp.int32), params, tx.init(params))


def make_eval_step(graphdef: Any, forward: Callable) -> Callable:
    """``(params, rest, batch) -> outputs`` without dropout (jitted)."""

    @jax.jit
    def ev(params, rest, batch):
        model = nnx.merge(graphdef, params, rest, copy=True)
        return forward(model, batch, True)[1]

    return ev


class MeshEvalStep:
    """The eval step on a mesh: ``(params, rest, batch) -> outputs`` with the batch rows split over the batch
    axes and the outputs replicated, so every process (one or many) reads them whole."""

    def __init__(self, graphdef: Any, forward: Callable, mesh: Mesh):
        self.mesh = mesh

        def ev(params, rest, batch):
            model = nnx.merge(graphdef, params, rest, copy=True)
            return forward(model, batch, True)[1]

        self._jit = jax.jit(ev, out_shardings=NamedSharding(mesh, PartitionSpec()))

    def __call__(self, params: Any, rest: Any, batch: dict[str, Any]) -> jax.Array:
        host = {k: np.asarray(v) for k, v in batch.items()}
        shardings = {k: shd.batch_sharding(self.mesh, v.ndim) for k, v in host.items()}
        return self._jit(params, rest, global_batch(host, shardings))


def device_batch(batch: dict[str, Any]) -> dict[str, Any]:
    return {k: jnp.asarray(v) for k, v in batch.items() if k in tasks_lib.DEVICE_KEYS}


def host_batch(batch: dict[str, Any]) -> dict[str, np.ndarray]:
    """The device keys of a host batch, as numpy arrays."""
    return {k: np.asarray(v) for k, v in batch.items() if k in tasks_lib.DEVICE_KEYS}


def global_batch(batch: dict[str, np.ndarray], shardings: dict[str, Any]) -> dict[str, jax.Array]:
    """Every process holds the whole batch; each puts the rows of its own devices (works with one or many
    processes)."""
    return {k: jax.make_array_from_callback(v.shape, shardings[k], lambda idx, v=v: v[idx]) for k, v in batch.items()}


def split_model(model: Any) -> tuple[Any, Any, Any]:
    return nnx.split(model, nnx.Param, nnx.Not(nnx.Param))


def check_fits(config: Any, data: dict[str, np.ndarray], where: str) -> None:
    """Refuse token ids or token types the model has no embedding for (they would give NaN or garbage)."""
    checks = (("input_ids", "vocab_size", "token id"), ("token_type_ids", "type_vocab_size", "token type"))
    for key, field, what in checks:
        if key in data and data[key].size:
            top, limit = int(data[key].max()), int(getattr(config, field))
            if top >= limit:
                raise InputError(
                    f"{where}: {what} {top} is out of range for the model ({field}={limit})"
                    + (
                        "; BORT-like models have one token type: encode pairs with token_types=False"
                        if key == "token_type_ids"
                        else "; the tokenizer does not match the model"
                    )
                )


# ------------------------------------------------------------------------------------------------ evaluation
def evaluate(
    task: Task, eval_step: Callable, params: Any, rest: Any, data: dict[str, np.ndarray], batch_size: int, refs=None
) -> tuple[dict[str, float], Any]:
    """Metrics (when ``data`` has labels or ``refs`` is given) and host predictions for every row."""
    metrics, pred, _ = _evaluate(task, eval_step, params, rest, data, batch_size, refs)
    return metrics, pred


# Task kinds whose outputs do not depend on the padded length: their evaluation runs in length buckets.
BUCKETED_KINDS = ("classification", "regression", "multilabel", "multiple_choice")
# The arrays with a token axis (the last axis) in those kinds' data.
_TOKEN_KEYS = ("input_ids", "attention_mask", "token_type_ids")


def eval_batches(task: Task, data: dict[str, np.ndarray], batch_size: int) -> list[tuple[dict[str, Any], np.ndarray]]:
    """The evaluation batches of ``data``: (batch with ``_n`` real rows, int64[_n] row indices into ``data``).

    Sequence-level tasks (:data:`BUCKETED_KINDS`) are sorted by length into a few static lengths
    (:func:`flax_narrow.bucketing.plan_batches`: 16, 32, ... up to the padded length), so short texts are not
    computed at full length; the attention mask hides the padding either way, so the outputs are those of the
    full-length batches (within float rounding). Token-level and QA tasks keep the padded length.
    """
    from flax_narrow.bucketing import plan_batches

    n = len(data["input_ids"])
    full = data["input_ids"].shape[-1]
    if task.kind not in BUCKETED_KINDS or "attention_mask" not in data or n == 0:
        out, start = [], 0
        for b in batches(data, batch_size):
            out.append((b, np.arange(start, start + b["_n"])))
            start += b["_n"]
        return out
    mask = np.asarray(data["attention_mask"])
    lengths = mask.reshape(n, -1, full).sum(-1).max(-1)  # multiple choice: the longest choice
    plan = plan_batches(np.maximum(lengths, 1), batch_size, full, last="full")
    out = []
    for p in plan:
        b = {k: v[p.indices] for k, v in data.items()}
        for k in _TOKEN_KEYS:
            if k in b:
                b[k] = b[k][..., : p.length]
        b["_n"] = p.real
        out.append((b, p.indices[: p.real]))
    return out


def _evaluate(task, eval_step, params, rest, data, batch_size, refs=None) -> tuple[dict[str, float], Any, Any]:
    """(metrics, predictions, raw outputs of every row), rows in the order of ``data``."""
    outs, preds, where = [], [], []
    for b, idx in eval_batches(task, data, batch_size):
        o = np.asarray(eval_step(params, rest, device_batch(b)))[: b["_n"]]
        outs.append(o)
        host = {k: v[: b["_n"]] for k, v in b.items() if k != "_n"}
        preds.append(tasks_lib.predictions(task, o, host))
        where.append(idx)
    order = np.argsort(np.concatenate(where), kind="stable")
    outs = [np.concatenate(outs)[order]]
    pred = np.concatenate(preds)[order]
    gold = refs if refs is not None else reference_labels(task, data)
    metrics = {} if gold is None else tasks_lib.compute_metrics(task, readable(task, pred, data), gold)
    return metrics, pred, np.concatenate(outs)


def reference_labels(task: Task, data: dict[str, np.ndarray]) -> Any:
    """Gold labels in the form ``compute_metrics`` takes (tag names for token tasks)."""
    if task.kind == "qa":
        return list(data["answer_texts"]) if "answer_texts" in data else None
    if "labels" not in data:
        return None
    if task.kind == "token":
        names = task.label_names
        return [[names[x] for x in row[v]] for row, v in zip(data["labels"], data["narrow_valid"])]
    return data["labels"]


def readable(task: Task, pred: Any, data: dict[str, np.ndarray]) -> Any:
    if task.kind == "token":
        names = task.label_names
        return [[names[x] for x in row[v]] for row, v in zip(pred, data["narrow_valid"])]
    if task.kind == "qa":
        return [span_text(data, i, s, e) for i, (s, e) in enumerate(pred)]
    return pred


def span_text(data: dict[str, Any], i: int, s: int, e: int) -> str:
    """The context substring of tokens s..e of row i (needs ``context_text`` in ``data``)."""
    off = data["offsets"][i]
    return str(data["context_text"][i])[int(off[s][0]) : int(off[e][1])]


def build_model(task: Task, source: Any, *, seed: int = 0, **overrides: Any) -> Any:
    """A task model from an ``EncoderConfig`` (random init) or a checkpoint (local path or hub id, resolved as
    ``from_pretrained`` resolves it), sized for ``task``."""
    from flax_narrow.config import EncoderConfig

    fields: dict[str, Any] = {"num_labels": task.num_labels, "problem_type": task.problem_type, **overrides}
    if task.label_names and task.kind in ("classification", "multilabel"):
        fields["label_names"] = tuple(task.label_names)
    if task.kind in ("multiple_choice", "qa"):
        fields.pop("num_labels")
    if isinstance(source, EncoderConfig):
        cfg = source.replace(**fields)
        return tasks_lib.model_class(task, cfg.is_narrow).from_config(cfg, seed=seed)
    from flax_narrow.pretrained import read_checkpoint_config, resolve_path

    local = resolve_path(source)  # a hub id becomes its downloaded snapshot, once
    base, _, _ = read_checkpoint_config(local if os.path.isdir(local) else os.path.dirname(local))
    cls = tasks_lib.model_class(task, base.is_narrow)
    return cls.from_pretrained(local, seed=seed, **fields)


# ------------------------------------------------------------------------------------------------ the loop
@dataclasses.dataclass
class FinetuneResult:
    best_metric: float
    best_step: int
    history: list[dict[str, Any]]
    model: Any  # the best model (an nnx module)
    predictions: Any = None
    test_metrics: dict[str, float] | None = None
    final_step: int = 0
    # Stopped by SIGINT/SIGTERM after saving a checkpoint (``resume=True`` continues); outputs not written.
    preempted: bool = False
    stop_signal: int | None = None
    compile_seconds: float = 0.0
    # Raw outputs on the test set (logits), one row per example.
    test_outputs: Any = None
    collapsed: bool = False  # the best model's dev predictions collapsed (train/collapse.py)


def train_batches(data: dict[str, np.ndarray], batch_size: int, seed: int, start: int = 0):
    """Host batches in training order from step ``start`` on: each epoch a permutation drawn from one
    ``default_rng(seed)``, full batches only (one short batch when the set is smaller than a batch). A pure
    function of (data, batch size, seed), so a resumed run sees the batches the first run would have."""
    rng = np.random.default_rng(seed)
    n = len(data["input_ids"])
    t = 0
    while True:
        for b in batches(data, batch_size, rng=rng, drop_last=n >= batch_size):
            if t >= start:
                yield b
            t += 1


def _ensure_mesh(mesh: Mesh | None, batch_size: int, eval_batch_size: int) -> Mesh:
    return shd.ensure_batch_mesh(mesh, batch_size=batch_size, eval_batch_size=eval_batch_size)


def finetune(
    model: Any,
    task: Task,
    train: dict[str, np.ndarray],
    dev: dict[str, np.ndarray],
    cfg: FinetuneConfig,
    *,
    output_dir: str | None = None,
    test: dict[str, np.ndarray] | None = None,
    dev_refs: Any = None,
    mesh: Mesh | None = None,
    resume: bool = False,
    tokenizer: Any = None,
    stop_at: int | None = None,
) -> FinetuneResult:
    """Fine-tune ``model`` on encoded ``train``; evaluate on ``dev`` every epoch or ``cfg.eval_every`` steps.

    Runs on the pretraining machinery: the optimizer of :mod:`~flax_narrow.train.optimizer`, a
    :class:`~flax_narrow.train.step.TrainState` sharded over ``mesh`` (default: every device on the ``data``
    axis), the step AOT-compiled with explicit shardings and donation, the non-finite guard, the metrics
    writer (``output_dir/metrics.jsonl`` + TensorBoard) and orbax checkpoints (``output_dir/checkpoints``,
    written at every evaluation and on SIGINT/SIGTERM; ``resume=True`` continues bit-exactly).

    Keeps the best model by ``task.selection_metric``, stops early after ``cfg.patience`` evaluations
    without improvement. When the run finishes (and only then) writes ``output_dir/best`` (config, weights
    and ``tokenizer`` when given), ``history.jsonl``, ``summary.json`` (with test metrics when ``test`` has
    labels) and, with ``test``, ``predictions.jsonl`` (id, gold label when known, prediction, probabilities).

    Args:
      stop_at: stop after this step as if interrupted (a checkpoint is saved; for tests and notebooks).
    """
    from .loop import StopSignals

    if cfg.head == "bort":
        bort_head_init(model, cfg.seed)
    n = len(train["input_ids"])
    if n == 0:
        raise InputError("the training set is empty")
    for where, d in (("train", train), ("dev", dev), ("test", test)):
        if d is not None:
            check_fits(model.config, d, where)
    forward = forward_fn(task, cfg.head)
    graphdef, params, rest = split_model(model)
    tx = make_optimizer(cfg, n)
    total = cfg.total_steps(n)
    mesh = _ensure_mesh(mesh, cfg.batch_size, cfg.eval_batch_size)
    abstract = jax.eval_shape(lambda p: init_train_state(p, tx), params)
    state_sh = shd.tree_shardings(abstract, mesh)
    abstract_rest = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), rest)
    rest = S.rest_like(abstract_rest, shd.tree_shardings(abstract_rest, mesh))
    replicated = NamedSharding(mesh, PartitionSpec())

    ck = None
    restored_window: list[float] = []
    step_items: dict[str, Any] = {}
    if output_dir:
        ck_dir = os.path.join(output_dir, "checkpoints")
        latest = _latest_step(ck_dir)
        if latest is not None and not resume:
            raise ConfigError(
                f"{output_dir} already holds fine-tuning checkpoints (latest step {latest}); pass --resume "
                "(resume=True) to continue, or choose another output directory"
            )
        ck = ckpt.Checkpointer(ck_dir, keep=cfg.keep_checkpoints, async_save=False)
        from flax_narrow.pretrained import model_config_json

        # Each step checkpoint reads as a checkpoint (the train state's weights at that step, not the best).
        step_items["model_config"] = model_config_json(model)
        if tokenizer is not None:
            step_items["tokenizer"] = ckpt.tokenizer_item(tokenizer)
    metric_name = task.selection_metric
    best, best_step, bad, history = -math.inf, -1, 0, []
    start = 0
    if ck is not None and resume and ck.latest_step() is not None:
        latest = ck.latest_step()
        target = {"train": abstract, "best": abstract.params}
        shardings = {"train": state_sh, "best": state_sh.params}
        restored, meta = ck.restore(latest, ckpt.abstract_with_shardings(target, shardings), None)
        _check_resume(meta, cfg, n, output_dir)
        state, best_params = restored["train"], restored["best"]
        best, best_step, bad, history = meta["best"], meta["best_step"], meta["bad"], meta["history"]
        best = -math.inf if best is None else best
        restored_window = list(meta.get("window_losses", []))
        start = int(jax.device_get(state.step))
        log.info("resumed fine-tuning from %s step %d", ck.directory, start)
    else:
        if resume:
            log.info("resume: no fine-tuning checkpoint under %s yet; starting from step 0", output_dir)
        host_params = jax.device_put(jax.tree.map(np.asarray, params), state_sh.params)
        state = jax.jit(lambda p: init_train_state(p, tx), out_shardings=state_sh)(host_params)
        best_params = None

    first = next(train_batches(train, cfg.batch_size, cfg.seed))
    sample = host_batch(first)
    batch_sh = {k: shd.batch_sharding(mesh, v.ndim) for k, v in sample.items()}
    batch_abs = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=batch_sh[k]) for k, v in sample.items()}
    seed_arr = jnp.int32(cfg.seed)
    compiled, compile_s, _ = S.aot_compile(
        make_train_step(graphdef, forward, tx),
        (ckpt.abstract_with_shardings(abstract, state_sh), rest, batch_abs, jax.ShapeDtypeStruct((), jnp.int32)),
        in_shardings=(state_sh, shd.tree_shardings(abstract_rest, mesh), batch_sh, replicated),
        out_shardings=(state_sh, replicated),
        donate_argnums=(0,),
        name="fine-tuning",
    )
    eval_step = MeshEvalStep(graphdef, forward, mesh)
    per_epoch = max(n // cfg.batch_size, 1)
    eval_every = cfg.eval_every or per_epoch
    end = total if stop_at is None else min(stop_at, total)
    writer = MetricsWriter(output_dir, resume_step=start) if output_dir else MetricsWriter(None)
    bar = progress_bar(total, start, cfg.progress_bar, desc="finetune")
    names = S.leaf_names(abstract.params)
    t0, pending = time.perf_counter(), []
    stopped = done = False
    stop_signal = None
    last_eval: dict[str, Any] = history[-1] if history else {}
    if best_params is None:
        best_params = jax.tree.map(jnp.copy, state.params)

    def flush() -> list[dict[str, Any]]:
        rows = jax.device_get([m for _, m in pending])
        out = []
        for (step_no, _), m in zip(pending, rows):
            leaf = np.asarray(m.pop("leaf_grad_norms"))
            rec = {k: (bool(v) if k == "finite" else float(v)) for k, v in m.items()}
            writer.write(step_no, rec)
            if not rec["finite"]:
                if cfg.on_nonfinite == "stop":
                    raise NonFiniteError(S.nonfinite_message(step_no, rec, leaf, names, FINETUNE_NONFINITE_HINT))
                log.warning("step %d: non-finite loss/gradients; update skipped", step_no)
            out.append(rec)
        if bar is not None and out:
            post = {"loss": f"{out[-1]['loss']:.4f}"}
            if metric_name in last_eval:
                post[metric_name] = f"{last_eval[metric_name]:.4f}"
            bar.set_postfix(post, refresh=False)
            bar.update(len(out))
        pending.clear()
        return out

    def save(step_no: int) -> None:
        if ck is None:
            return
        meta = {
            "step": step_no,
            "best": None if best == -math.inf else best,
            "best_step": best_step,
            "bad": bad,
            "history": history,
            "config": _jsonable(dataclasses.asdict(cfg)),
            "n_train": n,
            "window_losses": window_losses,
        }
        ck.save(step_no, {"train": state, "best": best_params}, None, meta, **step_items)

    window_losses: list[float] = restored_window  # the train losses since the last evaluation
    try:
        with StopSignals() as signals:
            batches_iter = train_batches(train, cfg.batch_size, cfg.seed, start)
            step = start
            while step < end:
                b = next(batches_iter)
                state, metrics = compiled(state, rest, global_batch(host_batch(b), batch_sh), seed_arr)
                step += 1
                pending.append((step, metrics))
                is_eval = step % eval_every == 0 or step == total
                if step % cfg.log_every == 0 or is_eval or step == end or signals.raised:
                    window_losses += [r["loss"] for r in flush()]
                if is_eval:
                    metrics_d, dev_pred = evaluate(
                        task, eval_step, state.params, rest, dev, cfg.eval_batch_size, dev_refs
                    )
                    finite = [x for x in window_losses if math.isfinite(x)]
                    rec = {"step": step, "epoch": step / per_epoch, "train_loss": float(np.mean(finite or [np.nan]))}
                    rec.update(metrics_d)
                    guard = collapse.detect(
                        task.kind, dev_pred, reference_labels(task, dev) if dev_refs is None else dev_refs
                    )
                    rec.update(guard.fields() if guard else {})
                    rec["time_s"] = round(time.perf_counter() - t0, 2)
                    history.append(rec)
                    last_eval = rec
                    window_losses = []
                    writer.write(step, {k: v for k, v in rec.items() if k != "step"}, kind="eval")
                    log.info("finetune step %d/%d: %s", step, total, _fmt(rec))
                    score = metrics_d.get(metric_name, -math.inf)
                    if score > best:
                        best, best_step, bad = score, step, 0
                        best_params = jax.tree.map(jnp.copy, state.params)
                    else:
                        bad += 1
                    stop_early = bool(cfg.patience and bad >= cfg.patience)
                    save(step)
                    if stop_early:
                        log.info("early stop at step %d (best %s %.4f at %d)", step, metric_name, best, best_step)
                        done = True
                        break
                if signals.raised:
                    stopped, stop_signal = True, signals.signum
                    if not is_eval:
                        save(step)
                    log.warning("fine-tuning stopped at step %d (checkpoint saved; resume to continue)", step)
                    break
            else:
                done = end == total
                if not done:  # stop_at: as if interrupted
                    stopped = True
                    if step % eval_every and step != total:
                        save(step)
    finally:
        if bar is not None:
            bar.close()
        writer.close()
        if ck is not None:
            ck.close()
    final_step = int(jax.device_get(state.step))
    best_model = nnx.merge(graphdef, best_params, rest)
    result = FinetuneResult(
        best, best_step, history, best_model, final_step=final_step, preempted=stopped and not done,
        stop_signal=stop_signal, compile_seconds=compile_s,
    )  # fmt: skip
    if result.preempted:
        return result
    best_rec = next((h for h in history if h["step"] == best_step), {})
    result.collapsed = bool(best_rec.get("collapsed", False))
    if result.collapsed:
        log.warning(
            "fine-tuning run (its best dev evaluation) collapsed: %s "
            "(BORT's known failure mode; see docs/finetuning.md, Agora)",
            best_rec.get("collapse_reason"),
        )
    if test is not None:
        test_metrics, pred, outputs = _evaluate(task, eval_step, best_params, rest, test, cfg.eval_batch_size)
        result.predictions = readable(task, pred, test)
        result.test_metrics = test_metrics or None
        result.test_outputs = outputs
    if output_dir and jax.process_index() == 0:
        gold = reference_labels(task, test) if test is not None else None
        write_outputs(output_dir, task, result, dataclasses.asdict(cfg), test, gold, tokenizer)
    return result


FINETUNE_NONFINITE_HINT = "Lower the learning rate (--lr), or keep gradient clipping on (max_grad_norm > 0)."


def _fmt(rec: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in rec.items())


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def _latest_step(ck_dir: str) -> int | None:
    if not os.path.isdir(ck_dir):
        return None
    steps = [int(x) for x in os.listdir(ck_dir) if x.isdigit()]
    return max(steps) if steps else None


def _check_resume(meta: dict[str, Any], cfg: FinetuneConfig, n: int, where: str | None) -> None:
    saved = meta.get("config", {})
    mine = _jsonable(dataclasses.asdict(cfg))
    diff = [f"{k}: checkpoint {saved.get(k)!r} vs now {v!r}" for k, v in mine.items()
            if k in RESUME_FIELDS and saved.get(k) != v]  # fmt: skip
    if meta.get("n_train") != n:
        diff.append(f"training rows: checkpoint {meta.get('n_train')} vs now {n}")
    if diff:
        raise ConfigError(f"{where}: cannot resume, the run changed: " + "; ".join(diff))


# Settings that change what a resumed run would compute.
RESUME_FIELDS = (
    "learning_rate", "weight_decay", "warmup_ratio", "epochs", "batch_size", "seed", "max_grad_norm", "head",
    "eval_every",
)  # fmt: skip
