"""``pretrain(cfg)``: the MLM (+ distillation) pretraining program as one importable function.

Order of work: data and tokenizer (cached), mesh, state shapes and shardings, then either a restore (resume)
or a sharded init (optionally from a converted checkpoint), the AOT-compiled step, and the loop: feed ids,
step, log, evaluate, checkpoint, and on SIGTERM (or a multi-host preemption notice) save and return.

Step numbers in logs, metrics and checkpoints count completed optimizer steps (the first step is 1).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import signal
import threading
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flax_narrow.config import SHAPE_FIELDS
from flax_narrow.errors import ConfigError, NonFiniteError
from flax_narrow.modeling import BertForMaskedLM

from . import checkpoint as ckpt
from . import data as D
from . import flops as F
from . import sharding as shd
from . import step as S
from .config import PretrainConfig
from .masking import MaskingSpec
from .metrics import MetricsWriter, progress_bar
from .optimizer import learning_rate_schedule, make_optimizer

log = logging.getLogger(__name__)

# A run directory: the run's config, its tokenizer (saved at the start, reused on resume), its step checkpoints
# (each with the model config and tokenizer too, so each one is a checkpoint every command reads) and, once
# finished, the model as a flax-narrow checkpoint (config.json + flax_model.safetensors + tokenizer files) that
# ``from_pretrained``, ``finetune --model``, ``export``, ``inspect`` and ``fill_mask`` read.
PRETRAIN_CONFIG = "pretrain_config.json"
RUN_TOKENIZER = "tokenizer"


tokenizer_fingerprint = D.tokenizer_fingerprint


def export_run(run_dir: str, model: Any, tokenizer: Any) -> None:
    """Write the model and tokenizer into ``run_dir`` (process 0): the run directory becomes a checkpoint."""
    if jax.process_index() != 0:
        return
    tokenizer.save_pretrained(run_dir)
    model.save_pretrained(run_dir)  # config.json last: a directory with it is complete
    log.info("wrote the trained model and tokenizer to %s", run_dir)


@dataclasses.dataclass
class PretrainResult:
    """What a run produced. ``history``: per-step metric dicts of the steps run by this call."""

    history: list[dict[str, Any]]
    evals: list[dict[str, Any]]
    start_step: int
    final_step: int
    preempted: bool
    state: S.TrainState
    spec: S.StateSpec
    rest: Any
    tokenizer: Any
    compile_seconds: float
    memory: dict[str, int]
    steps_per_second: float | None
    tokens_per_second: float | None
    flops_per_step: float
    run_dir: str | None
    checkpoint_dir: str | None
    skipped_steps: int = 0
    # The signal that stopped the run (SIGTERM / SIGINT), or None.
    stop_signal: int | None = None

    def model(self) -> BertForMaskedLM:
        """The trained model (merged from the final state)."""
        return nnx.merge(self.spec.graphdef, self.state.params, self.rest)


@dataclasses.dataclass
class Pipeline:
    """The data side of a run, built before any device state."""

    tokenizer: Any
    train_iter: Any
    eval_sets: list[D.Rows]
    shard: D.HostShard
    masking: MaskingSpec
    train_source: Any = None  # the map-style training rows (None for streaming data)


def check_tokenizer(cfg: PretrainConfig, tokenizer: Any) -> None:
    """The tokenizer must fit the model: ids below vocab_size, and the same padding id."""
    n = len(tokenizer)
    if n > cfg.model.vocab_size:
        raise ConfigError(
            f"the tokenizer has {n} ids but model.vocab_size is {cfg.model.vocab_size}; set model.vocab_size>={n}"
        )
    if tokenizer.pad_token_id != cfg.model.pad_token_id:
        raise ConfigError(
            f"the tokenizer pads with id {tokenizer.pad_token_id} but model.pad_token_id is "
            f"{cfg.model.pad_token_id}; set model.pad_token_id={tokenizer.pad_token_id}"
        )


def host_shard(mesh: jax.sharding.Mesh, micro_batch: int, seq_len: int, accum: int) -> D.HostShard:
    """Which contiguous rows of each global micro-batch this process feeds (from the batch sharding)."""
    n_batch_shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if micro_batch % n_batch_shards:
        raise ConfigError(
            f"the micro-batch of {micro_batch} sequences (global_batch_size / grad_accum_steps) is not divisible "
            f"by data x fsdp = {n_batch_shards} batch shards"
        )
    sharding = shd.batch_sharding(mesh, 3, batch_dim=1)
    start, rows = shd.host_row_range(sharding, (accum, micro_batch, seq_len), batch_dim=1)
    if micro_batch % rows or start % rows:
        raise ConfigError(f"process rows [{start}, {start + rows}) do not tile a micro-batch of {micro_batch}")
    return D.HostShard(index=start // rows, count=micro_batch // rows, rows=rows)


def build_pipeline(cfg: PretrainConfig, mesh: jax.sharding.Mesh, tokenizer: Any = None) -> Pipeline:
    """Documents -> tokenizer -> packed rows (cached) -> this host's checkpointable iterator + eval batches.

    ``tokenizer``: use this one (a resumed run's own) instead of ``data.tokenizer`` / the cached WordPiece."""
    dcfg, tcfg = cfg.data, cfg.train
    cache_dir = os.path.expanduser(dcfg.cache_dir)
    docs, eval_docs = D.load_documents(dcfg, cache_dir)
    if tokenizer is None:
        tokenizer = D.get_tokenizer(dcfg, docs, cache_dir)
    check_tokenizer(cfg, tokenizer)
    accum, micro = tcfg.grad_accum_steps, tcfg.micro_batch_size
    shard = host_shard(mesh, micro, dcfg.seq_len, accum)
    source = None
    if dcfg.streaming:
        ds = D.streaming_dataset(docs, tokenizer, dcfg, seed=tcfg.seed, accum=accum, rows=shard.rows)
    else:
        source = D.PackedRows(D.packed_cached(docs, tokenizer, dcfg, cache_dir, "train"))
        if len(source) < micro:
            raise ConfigError(f"the corpus packs into {len(source)} rows, fewer than one micro-batch of {micro}")
        log.info("training rows: %d of %d tokens", len(source), dcfg.seq_len)
        ds = D.train_dataset(source, seed=tcfg.seed, accum=accum, shard=shard)
    eval_sets: list[np.ndarray] = []
    if tcfg.eval_every > 0 or tcfg.eval_every_seconds > 0:
        if eval_docs is None:
            raise ConfigError(
                "train.eval_every (or eval_every_seconds) > 0 needs an eval split: data.eval_files or "
                "data.eval_fraction > 0"
            )
        eval_src = D.PackedRows(D.packed_cached(eval_docs, tokenizer, dcfg, cache_dir, "eval"))
        eval_sets = D.eval_batches(eval_src, micro, tcfg.eval_batches, shard)
    masking = MaskingSpec.from_tokenizer(
        tokenizer,
        max_predictions=tcfg.max_predictions,
        vocab_size=cfg.model.vocab_size,
        mask_prob=tcfg.mask_prob,
        mask_token_prob=tcfg.mask_token_prob,
        random_token_prob=tcfg.random_token_prob,
    )
    return Pipeline(tokenizer, D.to_iterator(ds, dcfg.prefetch), eval_sets, shard, masking, source)


def load_init_params(cfg: PretrainConfig) -> Any:
    """Parameters of ``checkpoint.init_from`` (any checkpoint ``from_pretrained`` reads), checked against the
    configured model's shape fields."""
    model = BertForMaskedLM.from_pretrained(
        cfg.checkpoint.init_from, dtype=cfg.model.dtype, param_dtype=cfg.model.param_dtype
    )
    diff = {
        f: (getattr(model.config, f), getattr(cfg.model, f))
        for f in SHAPE_FIELDS
        if getattr(model.config, f) != getattr(cfg.model, f)
    }
    if diff:
        raise ConfigError(
            f"checkpoint.init_from {cfg.checkpoint.init_from!r} does not match the model config: "
            + ", ".join(f"{k}: checkpoint {a} vs config {b}" for k, (a, b) in diff.items())
        )
    return nnx.state(model, nnx.Param)


def load_teacher(cfg: PretrainConfig, mesh: jax.sharding.Mesh) -> S.Teacher:
    """The frozen distillation teacher, sharded by the same rules; its vocabulary must equal the student's."""
    dtype = cfg.kd.teacher_dtype or cfg.model.dtype
    model = BertForMaskedLM.from_pretrained(cfg.kd.teacher, dtype=dtype)
    if model.config.vocab_size != cfg.model.vocab_size:
        raise ConfigError(
            f"kd.teacher {cfg.kd.teacher!r} has vocab_size {model.config.vocab_size}, the student "
            f"{cfg.model.vocab_size}; distillation needs the same vocabulary"
        )
    if model.config.pad_token_id != cfg.model.pad_token_id:
        raise ConfigError(
            f"kd.teacher pads with id {model.config.pad_token_id}, the student with {cfg.model.pad_token_id}"
        )
    return S.shard_teacher(model, mesh)


class StopSignals:
    """Sets ``raised`` (and ``signum``) on SIGTERM or SIGINT while installed (single process, main thread only):
    the loop saves a checkpoint after the current step and returns, so Ctrl-C loses nothing.

    With several processes, SIGTERM belongs to ``jax.distributed``'s preemption notifier, which tells every
    process; they agree on a step through ``reached_preemption`` (orbax / coordination service) instead.
    """

    def __init__(self) -> None:
        self.raised = False
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        log.warning("%s: saving a checkpoint after the current step, then stopping", signal.Signals(signum).name)
        self.raised = True
        self.signum = signum

    def __exit__(self, *exc: Any) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous = {}


_SigtermFlag = StopSignals  # the former name


PRETRAIN_NONFINITE_HINT = (
    "Lower train.learning_rate, set train.clip_norm, or train.on_nonfinite=skip to skip such steps."
)


def _nonfinite_message(step: int, rec: dict[str, Any], leaf_norms: np.ndarray, names: list[str]) -> str:
    return S.nonfinite_message(step, rec, leaf_norms, names, PRETRAIN_NONFINITE_HINT)


def pretrain(
    cfg: PretrainConfig, *, mesh: jax.sharding.Mesh | None = None, stop_at: int | None = None
) -> PretrainResult:
    """Run (or resume) MLM pretraining as configured; see the module docstring.

    Args:
      cfg: the run's configuration.
      mesh: a device mesh to use instead of building one from ``cfg.mesh``.
      stop_at: stop after this step (saving a checkpoint when checkpointing is on); the learning-rate
        schedule still spans ``train.steps``, so a later ``checkpoint.resume`` run continues the same run.
        For notebooks that train in chunks, and for tests.
    """
    tcfg, ccfg = cfg.train, cfg.checkpoint
    run_dir = os.path.expanduser(cfg.output_dir) if cfg.output_dir else None
    is_main = jax.process_index() == 0
    mesh = shd.make_mesh(cfg.mesh) if mesh is None else mesh
    log.info("mesh %s over %d processes", dict(mesh.shape), jax.process_count())
    run_tok = os.path.join(run_dir, RUN_TOKENIZER) if run_dir else None
    saved_tok = None
    if ccfg.resume and run_tok and os.path.isdir(run_tok):
        from flax_narrow.tokenization import load_tokenizer

        saved_tok = load_tokenizer(run_tok)  # the run's own tokenizer, whatever the data cache holds now
        if cfg.data.tokenizer is not None:
            asked = load_tokenizer(os.path.expanduser(cfg.data.tokenizer))
            if tokenizer_fingerprint(asked) != tokenizer_fingerprint(saved_tok):
                raise ConfigError(
                    f"data.tokenizer {cfg.data.tokenizer!r} is not the tokenizer this run was trained with "
                    f"({run_tok}); a resumed run keeps its tokenizer"
                )
        log.info("resuming with the run's tokenizer %s", run_tok)
    pipe = build_pipeline(cfg, mesh, tokenizer=saved_tok)
    fingerprint = tokenizer_fingerprint(pipe.tokenizer)
    tx = make_optimizer(tcfg)
    schedule = learning_rate_schedule(tcfg)
    spec = S.state_spec(cfg.model, tx, mesh, seed=tcfg.seed)
    rest = S.init_rest(spec)
    teacher = load_teacher(cfg, mesh) if cfg.kd.enabled else None

    ck_dir = cfg.checkpoint_dir
    if ck_dir and not ccfg.resume and ckpt.has_checkpoints(ck_dir):
        raise ConfigError(
            f"{ck_dir} already holds checkpoints; pass checkpoint.resume=true (--resume) to continue, or choose "
            "another output_dir"
        )
    if run_dir and is_main:  # written once the inputs are known to be good: nothing half-written before
        os.makedirs(run_dir, exist_ok=True)
        with open(os.path.join(run_dir, PRETRAIN_CONFIG), "w", encoding="utf-8") as fh:
            json.dump(cfg.to_dict(), fh, indent=2)
        if saved_tok is None:
            pipe.tokenizer.save_pretrained(run_tok)
    checkpointer = ckpt.Checkpointer(ck_dir, keep=ccfg.keep, async_save=ccfg.async_save) if ck_dir else None
    step_items: dict[str, Any] = {}  # what makes each step checkpoint readable on its own
    if checkpointer is not None:
        from flax_narrow.pretrained import model_config_json

        step_items = {
            "model_config": model_config_json(BertForMaskedLM, cfg.model),
            "tokenizer": ckpt.tokenizer_item(pipe.tokenizer),
        }
    latest = checkpointer.latest_step() if checkpointer is not None else None
    if ccfg.resume and latest is not None:
        meta = checkpointer.read_meta(latest)
        _check_resume_meta(cfg, meta, ck_dir)
        saved_fp = meta.get("tokenizer_fingerprint")
        if saved_fp is not None and saved_fp != fingerprint:
            raise ConfigError(
                f"{ck_dir}: cannot resume with a different tokenizer (fingerprint {fingerprint[:12]} vs the "
                f"run's {saved_fp[:12]}); keep data.tokenizer as it was"
            )
        state, _ = checkpointer.restore(
            latest, ckpt.abstract_with_shardings(spec.abstract, spec.shardings), pipe.train_iter
        )
        log.info("resumed from %s step %d", ck_dir, latest)
    else:
        if ccfg.resume:
            log.info("checkpoint.resume: no checkpoint under %s yet; starting from step 0", ck_dir)
        if latest is not None and not ccfg.resume:
            raise ConfigError(
                f"{ck_dir} already holds checkpoints (latest step {latest}); pass checkpoint.resume=true "
                "(--resume) to continue, or choose another output_dir"
            )
        init_params = load_init_params(cfg) if ccfg.init_from else None
        state = S.init_state(spec, cfg.model, tx, seed=tcfg.seed, init_params=init_params)
        if tcfg.output_bias_init == "unigram":
            state = _unigram_output_bias(state, spec, pipe, cfg.model.vocab_size)
    start_step = int(jax.device_get(state.step))

    t_graph = teacher.graphdef if teacher is not None else None
    train_fn = S.make_train_step(
        spec.graphdef, tx, pipe.masking, seed=tcfg.seed, schedule=schedule, kd=cfg.kd, teacher_graphdef=t_graph
    )
    eval_fn = (
        S.make_eval_step(spec.graphdef, pipe.masking, seed=tcfg.seed, kd=cfg.kd, teacher_graphdef=t_graph)
        if pipe.eval_sets
        else None
    )
    accum, micro, seq_len = tcfg.grad_accum_steps, tcfg.micro_batch_size, cfg.data.seq_len
    segments = D.uses_segments(cfg.data)
    compiled = S.compile_steps(
        train_fn,
        eval_fn,
        spec,
        mesh,
        accum=accum,
        micro_batch=micro,
        seq_len=seq_len,
        rest=rest,
        teacher=teacher,
        segment_ids=segments,
    )
    log.info("train step compiled in %.1f s; memory analysis %s", compiled.compile_seconds, compiled.memory)
    flops_per_step = F.train_step_flops(
        cfg.model,
        batch=tcfg.global_batch_size,
        seq_len=seq_len,
        predictions=tcfg.max_predictions,
        teacher=teacher.config if teacher is not None else None,
    )
    peak = F.peak_flops_per_device(jax.devices()[0].device_kind, tcfg.peak_tflops)
    if peak is None:
        log.info("peak FLOP/s of %r unknown: MFU not reported (set train.peak_tflops)", jax.devices()[0].device_kind)

    writer = MetricsWriter(run_dir, resume_step=start_step)
    bar = progress_bar(tcfg.steps, start_step, tcfg.progress_bar)
    ids_sharding = shd.batch_sharding(mesh, 3, batch_dim=1)
    eval_sharding = shd.batch_sharding(mesh, 2)
    global_shape = (accum, micro, seq_len)
    t_params = teacher.params if teacher is not None else None
    t_rest = teacher.rest if teacher is not None else None
    names = S.leaf_names(spec.abstract.params)

    history: list[dict[str, Any]] = []
    evals: list[dict[str, Any]] = []
    pending: list[tuple[int, dict[str, Any]]] = []
    skipped = 0
    preempted = False
    stop_signal: int | None = None
    timed_steps, timed_seconds = 0, 0.0
    window_start, window_steps = time.perf_counter(), 0
    first_flush = True
    train_seconds = 0.0  # wall-clock of the training steps so far (train.max_seconds, eval_every_seconds)
    next_eval_seconds = tcfg.eval_every_seconds

    def flush() -> None:
        nonlocal skipped, window_start, window_steps, timed_steps, timed_seconds, first_flush, train_seconds
        if not pending:
            return
        fetched = jax.device_get([m for _, m in pending])
        now = time.perf_counter()
        dt = now - window_start
        train_seconds += dt
        # The first window includes the first dispatch; later windows give the steady-state throughput.
        if not first_flush:
            timed_steps += window_steps
            timed_seconds += dt
        first_flush = False
        rate = window_steps / dt if dt > 0 else 0.0
        for (step_no, _), m in zip(pending, fetched):
            leaf = np.asarray(m.pop("leaf_grad_norms"))
            rec = {k: (bool(v) if k == "finite" else float(v)) for k, v in m.items()}
            if not rec["finite"]:
                if tcfg.on_nonfinite == "stop":
                    writer.write(step_no, rec)
                    raise NonFiniteError(_nonfinite_message(step_no, rec, leaf, names))
                skipped += 1
                log.warning("step %d: non-finite loss/gradients; update skipped (%d so far)", step_no, skipped)
            history.append({"step": step_no, **rec})
            extra = {}
            if step_no == pending[-1][0]:
                extra = {
                    "steps_per_s": rate,
                    "tokens_per_s": rate * tcfg.global_batch_size * seq_len,
                    "seconds": dt,
                }
                util = F.mfu(flops_per_step, rate, mesh.devices.size, peak)
                if util is not None:
                    extra["mfu"] = util
            writer.write(step_no, {**rec, **extra})
        if bar is not None:
            latest = history[-1]
            bar.set_postfix(loss=f"{latest['loss']:.3f}", acc=f"{latest['accuracy']:.3f}", refresh=False)
            bar.update(len(pending))
        pending.clear()
        window_start, window_steps = time.perf_counter(), 0

    def evaluate(step_no: int) -> None:
        totals: dict[str, float] = {}
        for i, local in enumerate(pipe.eval_sets):
            local_ids, local_seg = D.split_rows(local)
            ids = D.global_array(local_ids, eval_sharding, (micro, seq_len))
            seg = None if local_seg is None else D.global_array(local_seg, eval_sharding, (micro, seq_len))
            sums = jax.device_get(compiled.eval(state.params, ids, np.int32(i), rest, t_params, t_rest, seg))
            for k, v in sums.items():
                totals[k] = totals.get(k, 0.0) + float(v)
        count = max(totals["count"], 1.0)
        rec = {"eval_loss": totals["ce_sum"] / count, "eval_accuracy": totals["correct"] / count}
        if "kd_sum" in totals:
            rec["eval_kd_loss"] = totals["kd_sum"] / count
        rec["eval_predictions"] = totals["count"]
        rec["train_seconds"] = train_seconds
        evals.append({"step": step_no, **rec})
        writer.write(step_no, rec, kind="eval")
        log.info("step %d eval: %s", step_no, rec)

    def save(step_no: int) -> None:
        meta = {
            "step": step_no,
            "config": cfg.to_dict(),
            "time": time.time(),
            "process_count": jax.process_count(),
            "tokenizer_fingerprint": fingerprint,
        }
        checkpointer.save(step_no, state, pipe.train_iter, meta, **step_items)

    try:
        with StopSignals() as sigterm:
            end = tcfg.steps if stop_at is None else min(stop_at, tcfg.steps)
            for step in range(start_step, end):
                local_ids, local_seg = D.split_rows(next(pipe.train_iter))
                ids = D.global_array(local_ids, ids_sharding, global_shape)
                seg = None if local_seg is None else D.global_array(local_seg, ids_sharding, global_shape)
                state, metrics = compiled.train(state, ids, rest, t_params, t_rest, seg)
                step_no = step + 1
                pending.append((step_no, metrics))
                window_steps += 1
                last = step_no == end
                stop = sigterm.raised or (checkpointer is not None and checkpointer.reached_preemption(step_no))
                do_ckpt = checkpointer is not None and (step_no % ccfg.every_steps == 0 or last or stop)
                every = tcfg.eval_every
                do_eval = eval_fn is not None and ((every > 0 and step_no % every == 0) or last)
                out_of_time = False
                if step_no % tcfg.log_every == 0 or last or stop or do_ckpt or do_eval:
                    flush()
                    out_of_time = tcfg.max_seconds is not None and train_seconds >= tcfg.max_seconds
                    if eval_fn is not None and next_eval_seconds > 0 and train_seconds >= next_eval_seconds:
                        do_eval = True
                        while next_eval_seconds <= train_seconds:
                            next_eval_seconds += tcfg.eval_every_seconds
                    if out_of_time:  # the end of the run, as at the last step
                        do_ckpt, do_eval = checkpointer is not None, eval_fn is not None
                if do_eval:
                    evaluate(step_no)
                if do_ckpt:
                    save(step_no)
                if do_eval or do_ckpt:  # keep evaluation and checkpoint time out of the throughput
                    window_start = time.perf_counter()
                if stop:
                    preempted = True
                    stop_signal = sigterm.signum
                    log.warning("stopping at step %d after a termination request (checkpoint saved)", step_no)
                    break
                if out_of_time:
                    log.info("stopping at step %d: train.max_seconds=%s reached", step_no, tcfg.max_seconds)
                    break
            flush()
    finally:
        if bar is not None:
            bar.close()
        if checkpointer is not None:
            checkpointer.close()
        writer.close()
        close = getattr(pipe.train_iter, "close", None)
        if close is not None:
            close()
    final_step = int(jax.device_get(state.step))
    if run_dir and final_step == tcfg.steps and not preempted:
        export_run(run_dir, nnx.merge(spec.graphdef, state.params, rest), pipe.tokenizer)
    sps = timed_steps / timed_seconds if timed_seconds > 0 else None
    return PretrainResult(
        history=history,
        evals=evals,
        start_step=start_step,
        final_step=final_step,
        preempted=preempted,
        state=state,
        spec=spec,
        rest=rest,
        tokenizer=pipe.tokenizer,
        compile_seconds=compiled.compile_seconds,
        memory=compiled.memory,
        steps_per_second=sps,
        tokens_per_second=sps * tcfg.global_batch_size * seq_len if sps else None,
        flops_per_step=flops_per_step,
        run_dir=run_dir,
        checkpoint_dir=ck_dir,
        skipped_steps=skipped,
        stop_signal=stop_signal,
    )


def restore_model(
    run_dir: str, step: int | None = None, *, mesh: jax.sharding.Mesh | None = None
) -> tuple[BertForMaskedLM, dict[str, Any]]:
    """The model of a pretraining checkpoint (the latest, or ``step``) and the checkpoint's metadata.

    Reads ``<run_dir>/config.json`` (written by :func:`pretrain`) and restores the train state onto ``mesh``
    (default: one device), e.g. to evaluate or ``save_pretrained`` a run. The data-iterator state is not read.
    """
    from flax_narrow.errors import CheckpointError

    from .config import MeshConfig, config_from_dict

    path = os.path.join(os.path.expanduser(run_dir), PRETRAIN_CONFIG)
    if not os.path.isfile(path):
        legacy = os.path.join(os.path.expanduser(run_dir), "config.json")  # runs written before the rename
        with open(legacy if os.path.isfile(legacy) else os.devnull, encoding="utf-8") as fh:
            text = fh.read()
        if '"train"' not in text:
            raise CheckpointError(f"{run_dir}: no {PRETRAIN_CONFIG} (not a pretraining run directory)")
        path = legacy
    with open(path, encoding="utf-8") as fh:
        cfg = config_from_dict(json.load(fh))
    mesh = shd.make_mesh(MeshConfig(1, 1, 1)) if mesh is None else mesh
    local = os.path.join(os.path.expanduser(run_dir), "checkpoints")
    ck_dir = local if os.path.isdir(local) else cfg.checkpoint_dir
    if ck_dir is None or not os.path.isdir(ck_dir):
        raise CheckpointError(f"{run_dir}: no checkpoint directory")
    checkpointer = ckpt.Checkpointer(ck_dir)
    try:
        step = checkpointer.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"{checkpointer.directory}: no checkpoints")
        tx = make_optimizer(cfg.train)
        spec = S.state_spec(cfg.model, tx, mesh, seed=cfg.train.seed)
        state, meta = checkpointer.restore(step, ckpt.abstract_with_shardings(spec.abstract, spec.shardings), None)
    finally:
        checkpointer.close()
    return nnx.merge(spec.graphdef, state.params, S.init_rest(spec)), meta


def _unigram_output_bias(state: S.TrainState, spec: S.StateSpec, pipe: Pipeline, vocab_size: int) -> S.TrainState:
    """``state`` with the MLM decoder bias set to the training rows' token log-frequencies (every host counts
    the same rows, so the bias agrees across processes); shardings unchanged."""
    rows, _ = D.split_rows(pipe.train_source.rows(0, len(pipe.train_source)))
    exclude = sorted(set(pipe.masking.special_token_ids) | {pipe.masking.pad_token_id})
    logp = jnp.asarray(D.unigram_log_probs(rows, vocab_size, exclude))
    log.info(
        "train.output_bias_init=unigram: the MLM bias starts at the log-frequencies of %d training rows", len(rows)
    )

    return jax.jit(with_output_bias, out_shardings=spec.shardings)(state, logp)


def with_output_bias(state: S.TrainState, bias: jax.Array) -> S.TrainState:
    """``state`` with the MLM decoder bias (``cls/predictions/bias``, float[vocab_size]) replaced by ``bias``."""

    def one(path: tuple[Any, ...], leaf: jax.Array) -> jax.Array:
        keys = tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in path)
        return bias.astype(leaf.dtype) if keys[:3] == ("cls", "predictions", "bias") else leaf

    return dataclasses.replace(state, params=jax.tree_util.tree_map_with_path(one, state.params))


def _check_resume_meta(cfg: PretrainConfig, meta: dict[str, Any], where: str | None) -> None:
    """Refuse to resume a checkpoint written with a different model shape or batch layout."""
    saved = meta.get("config", {})
    mine = cfg.to_dict()
    problems = []
    for f in SHAPE_FIELDS:
        a, b = saved.get("model", {}).get(f), mine["model"][f]
        if a != b:
            problems.append(f"model.{f}: checkpoint {a} vs now {b}")
    for section, f in (("train", "global_batch_size"), ("train", "grad_accum_steps"), ("data", "seq_len")):
        a, b = saved.get(section, {}).get(f), mine[section][f]
        if a != b:
            problems.append(f"{section}.{f}: checkpoint {a} vs now {b}")
    packing = saved.get("data", {}).get("packing", "concat")  # runs saved before the option: concat
    if packing != mine["data"]["packing"]:
        problems.append(f"data.packing: checkpoint {packing} vs now {mine['data']['packing']}")
    if problems:
        raise ConfigError(f"{where}: cannot resume, the run changed: " + "; ".join(problems))
    if saved.get("train", {}).get("seed") != mine["train"]["seed"]:
        log.warning("resuming with a different train.seed: data order and masks will differ from the original run")
    if not math.isclose(float(saved.get("train", {}).get("learning_rate", 0)), mine["train"]["learning_rate"]):
        log.warning("resuming with a different learning rate")
