"""Fine-tuning: one pure jitted step (AdamW with per-run scalars), evaluation, best checkpoint, early stopping,
prediction files.

The optimizer is AdamW written from optax pieces (global-norm clipping, ``scale_by_adam``) with the learning
rate, weight decay and warmup given as *arrays* to the step, not baked into the optimizer. That is what lets
:mod:`flax_narrow.train.candidates` ``jax.vmap`` the very same step over K candidates with different
hyperparameters. Schedule: linear warmup over ``warmup_ratio`` of the steps, then linear decay to 0. Weight
decay is decoupled (``p -= lr * wd * p``) and applies to kernels and embeddings only.

BORT recipe: ``head="bort"`` gives the released head (first-token row -> dropout -> Dense tanh -> dropout ->
Dense, weights U(-0.5, 0.5), biases 0); use ``pair_format="single_sep"`` (``<s> A </s> B </s>``), many epochs
and warmup ratios 0.35-0.5 (see docs/finetuning.md).
"""

from __future__ import annotations

import dataclasses
import json
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

from flax_narrow.errors import ConfigError, NonFiniteError

from . import tasks as tasks_lib
from .finetune_data import batches
from .tasks import Task

log = logging.getLogger(__name__)

HEADS = ("standard", "bort")


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
    # Evaluate every N steps (0: at the end of every epoch).
    eval_every: int = 0
    # Stop after this many evaluations without improvement (0: never).
    patience: int = 0
    head: str = "standard"

    def __post_init__(self) -> None:
        if self.head not in HEADS:
            raise ConfigError(f"head must be one of {HEADS}, got {self.head!r}")
        if self.batch_size < 1 or self.epochs <= 0:
            raise ConfigError("batch_size must be >= 1 and epochs > 0")
        if not 0 <= self.warmup_ratio <= 1:
            raise ConfigError(f"warmup_ratio must be in [0, 1], got {self.warmup_ratio}")

    def total_steps(self, n_train: int) -> int:
        per_epoch = max(n_train // self.batch_size, 1)
        return max(int(math.ceil(per_epoch * self.epochs)), 1)

    def hparams(self, n_train: int) -> dict[str, jax.Array]:
        """The per-run scalars the step takes (fp32 arrays; vmappable)."""
        total = self.total_steps(n_train)
        return {
            "lr": jnp.float32(self.learning_rate),
            "wd": jnp.float32(self.weight_decay),
            "warmup": jnp.float32(round(self.warmup_ratio * total)),
            "total": jnp.float32(total),
        }


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
def decay_mask(params: Any) -> Any:
    """True for Linear kernels and embedding tables (decayed), False for biases and LayerNorm."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: any(getattr(k, "key", None) in ("kernel", "embedding") for k in path), params
    )


def adam_init(params: Any, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8) -> Any:
    return optax.scale_by_adam(b1, b2, eps).init(params)


def learning_rate(hp: dict[str, jax.Array], step: jax.Array) -> jax.Array:
    """Linear warmup 0 -> lr over ``hp['warmup']`` steps, then linear decay to 0 at ``hp['total']``."""
    t = step.astype(jnp.float32)
    warm = hp["lr"] * t / jnp.maximum(hp["warmup"], 1.0)
    decay = hp["lr"] * jnp.maximum(hp["total"] - t, 0.0) / jnp.maximum(hp["total"] - hp["warmup"], 1.0)
    return jnp.where(t < hp["warmup"], warm, decay)


def make_train_step(graphdef: Any, forward: Callable, cfg: FinetuneConfig) -> Callable:
    """The pure step ``(params, rest, opt_state, batch, hp, step) -> (params, rest, opt_state, loss)``.

    ``rest`` is the non-parameter state (dropout RNG counters); it is a jit argument and is merged with
    ``copy=True`` inside the differentiated function (NNX: avoids a TraceContextError on RNG mutation).
    Not jitted here: callers jit it, or ``jax.vmap`` it first (candidates).
    """
    adam = optax.scale_by_adam(cfg.b1, cfg.b2, cfg.eps)
    clip = optax.clip_by_global_norm(cfg.max_grad_norm) if cfg.max_grad_norm > 0 else optax.identity()

    def step(params, rest, opt_state, batch, hp, step_no):
        def loss_fn(p):
            model = nnx.merge(graphdef, p, rest, copy=True)
            loss, _ = forward(model, batch, False)
            return loss, nnx.state(model, nnx.Not(nnx.Param))

        (loss, new_rest), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        grads, _ = clip.update(grads, clip.init(params))
        updates, opt_state = adam.update(grads, opt_state, params)
        lr = learning_rate(hp, step_no)
        mask = decay_mask(params)
        params = jax.tree.map(lambda p, u, m: p - lr * (u + jnp.where(m, hp["wd"], 0.0) * p), params, updates, mask)
        return params, new_rest, opt_state, loss

    return step


def make_eval_step(graphdef: Any, forward: Callable) -> Callable:
    """``(params, rest, batch) -> outputs`` without dropout (jitted)."""

    @jax.jit
    def ev(params, rest, batch):
        model = nnx.merge(graphdef, params, rest, copy=True)
        return forward(model, batch, True)[1]

    return ev


def device_batch(batch: dict[str, Any]) -> dict[str, Any]:
    return {k: jnp.asarray(v) for k, v in batch.items() if k in tasks_lib.DEVICE_KEYS}


def split_model(model: Any) -> tuple[Any, Any, Any]:
    return nnx.split(model, nnx.Param, nnx.Not(nnx.Param))


# ------------------------------------------------------------------------------------------------ evaluation
def evaluate(
    task: Task, eval_step: Callable, params: Any, rest: Any, data: dict[str, np.ndarray], batch_size: int, refs=None
) -> tuple[dict[str, float], Any]:
    """Metrics (when ``data`` has labels or ``refs`` is given) and host predictions for every row."""
    outs, preds = [], []
    for b in batches(data, batch_size):
        o = np.asarray(eval_step(params, rest, device_batch(b)))[: b["_n"]]
        outs.append(o)
        host = {k: v[: b["_n"]] for k, v in b.items() if k != "_n"}
        preds.append(tasks_lib.predictions(task, o, host))
    pred = np.concatenate(preds)
    gold = refs if refs is not None else reference_labels(task, data)
    metrics = {} if gold is None else tasks_lib.compute_metrics(task, readable(task, pred, data), gold)
    return metrics, pred


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
) -> FinetuneResult:
    """Fine-tune ``model`` on encoded ``train``; evaluate on ``dev`` every epoch or ``cfg.eval_every`` steps.

    Keeps the best model by ``task.selection_metric`` (in memory, and with ``save_pretrained`` under
    ``output_dir/best`` when given), stops early after ``cfg.patience`` evaluations without improvement,
    writes ``output_dir/history.jsonl`` and, with ``test``, ``output_dir/predictions.jsonl`` from the best model.
    """
    if cfg.head == "bort":
        bort_head_init(model, cfg.seed)
    forward = forward_fn(task, cfg.head)
    graphdef, params, rest = split_model(model)
    opt_state = adam_init(params, cfg.b1, cfg.b2, cfg.eps)
    n = len(train["input_ids"])
    hp = cfg.hparams(n)
    total = cfg.total_steps(n)
    step_fn = jax.jit(make_train_step(graphdef, forward, cfg), donate_argnums=(0, 2))
    eval_step = make_eval_step(graphdef, forward)
    metric_name = task.selection_metric
    rng = np.random.default_rng(cfg.seed)
    per_epoch = max(n // cfg.batch_size, 1)
    eval_every = cfg.eval_every or per_epoch
    best, best_step, best_params, bad, history = -math.inf, -1, None, 0, []
    step, t0, losses = 0, time.perf_counter(), []
    if output_dir:
        os.makedirs(output_dir, exist_ok=True)
    stop = False
    while step < total and not stop:
        for b in batches(train, cfg.batch_size, rng=rng, drop_last=n >= cfg.batch_size):
            params, rest, opt_state, loss = step_fn(params, rest, opt_state, device_batch(b), hp, jnp.int32(step))
            step += 1
            losses.append(loss)
            if step % eval_every == 0 or step == total:
                metrics, _ = evaluate(task, eval_step, params, rest, dev, cfg.eval_batch_size, dev_refs)
                loss_val = float(np.mean(jax.device_get(losses)))
                if not math.isfinite(loss_val):
                    raise NonFiniteError(f"training loss is {loss_val} at step {step}; lower the learning rate")
                rec = {"step": step, "epoch": step / per_epoch, "train_loss": loss_val, **metrics}
                rec["time_s"] = round(time.perf_counter() - t0, 2)
                history.append(rec)
                losses = []
                log.info("step %d: %s", step, json.dumps(rec))
                score = metrics.get(metric_name, -math.inf)
                if score > best:
                    best, best_step, bad = score, step, 0
                    best_params = jax.tree.map(jnp.copy, (params, rest))
                else:
                    bad += 1
                    if cfg.patience and bad >= cfg.patience:
                        log.info("early stop at step %d (best %s %.4f at %d)", step, metric_name, best, best_step)
                        stop = True
                        break
            if step >= total:
                break
    if best_params is None:
        best_params = jax.tree.map(jnp.copy, (params, rest))
    best_model = nnx.merge(graphdef, *best_params)
    result = FinetuneResult(best, best_step, history, best_model)
    if test is not None:
        _, pred = evaluate(task, eval_step, *best_params, test, cfg.eval_batch_size, refs=None)
        result.predictions = readable(task, pred, test)
    if output_dir:
        _write_outputs(output_dir, task, result, cfg)
    return result


def _write_outputs(output_dir: str, task: Task, result: FinetuneResult, cfg: FinetuneConfig) -> None:
    result.model.save_pretrained(os.path.join(output_dir, "best"))
    with open(os.path.join(output_dir, "history.jsonl"), "w", encoding="utf-8") as fh:
        for rec in result.history:
            fh.write(json.dumps(rec) + "\n")
    summary = {"best_metric": result.best_metric, "best_step": result.best_step, "metric": task.selection_metric}
    summary["config"] = dataclasses.asdict(cfg)
    with open(os.path.join(output_dir, "summary.json"), "w", encoding="utf-8") as fh:
        json.dump(summary, fh, indent=2)
    if result.predictions is not None:
        names = task.label_names
        with open(os.path.join(output_dir, "predictions.jsonl"), "w", encoding="utf-8") as fh:
            for i, p in enumerate(result.predictions):
                p = p.tolist() if hasattr(p, "tolist") else p
                if task.kind == "classification" and names:
                    p = names[int(p)]
                elif task.kind == "multilabel" and names:
                    p = [names[j] for j, on in enumerate(p) if on]
                fh.write(json.dumps({"index": i, "prediction": p}) + "\n")
