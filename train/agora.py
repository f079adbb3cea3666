"""An Agora-style fine-tuning scaffold (SPEC-agora.md): every unknown of the unreleased procedure is a typed,
swappable component with a documented default.

Round r, while Θ is not empty:
  1. fine-tune one model per θ in Θ on the current train set D (side by side with ``jax.vmap`` when
     ``side_by_side``); score each on the *probe* part of the dev set E;
  2. take the best model's mistakes on the probe part;
  3. apply the transformation g to each mistake (``points_per_mistake`` new points), label them with S, add to D;
  4. rank Θ by probe score and prune it (default: keep the better half; ``NotesPrefixRule`` as an option).
After Θ has one member left (or ``max_rounds``), ``replay`` more rounds re-train the survivors on the grown D.
The final model is the round best with the highest score on the *held-out* part of E, which mining never sees.

Candidates train on the fine-tuning machinery (:mod:`candidates`: the one step builder, guard and AOT compile)
on a ``data x fsdp`` device mesh (``AgoraConfig.mesh``, default every device on ``data``); they are scored on
the same mesh.

Each round writes ``round_XXX/state.json`` (Θ left, scores, what was added), ``round_XXX/added.jsonl`` and the
round's best model (``round_XXX/best``); a run restarted with the same ``out_dir`` resumes after the last
finished round. SIGINT/SIGTERM during a round's training save a checkpoint at the current step
(:mod:`agora_train`, ``round_XXX/checkpoint``) and the rerun continues the round from there, ending as an
uninterrupted run would. ``log.jsonl`` holds one line per round, ``summary.md`` a table.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flax_narrow.errors import ConfigError

from . import agora_train, augment, collapse
from . import sharding as shd
from .candidates import Candidate
from .config import MeshConfig
from .finetune import FinetuneConfig, MeshEvalStep, evaluate, forward_fn, make_eval_step, split_model
from .finetune_data import Encoder
from .labeller import MIN_ACCURACY, PreviousBestLabeller, check_labeller, probe_accuracy
from .tasks import Task

log = logging.getLogger(__name__)

Example = dict[str, Any]


class Transformation(Protocol):
    """g: a mistake -> new points "similar but not too similar" (labels are assigned later by S)."""

    def __call__(self, example: Example, k: int, rng: np.random.Generator) -> list[Example]: ...


class Labeller(Protocol):
    """S: points -> labels (in the task's label form: names for classification, floats for regression)."""

    def __call__(self, examples: Sequence[Example]) -> list[Any]: ...


class PruningRule(Protocol):
    """Ranked (θ, score) pairs, best first -> the θ to keep (never empty unless the input is)."""

    def __call__(self, ranked: Sequence[tuple[Candidate, float]]) -> list[Candidate]: ...


# ------------------------------------------------------------------------------------------------ g
@dataclasses.dataclass
class MLMInfill:
    """Default g: mask ~``mask_prob`` of a text's tokens and sample replacements from one of our MLM models.

    ``model`` is a ``BertForMaskedLM`` (BORT/BERT/NarrowBERT with dense output) sharing ``tokenizer``'s
    vocabulary; ``fields`` are the text fields to rewrite; ``temperature`` scales the logits. An MLM whose head
    was never trained is refused (:func:`augment.check_mlm_head`; ``run_agora`` also calls :meth:`check` on the
    train texts) unless ``allow_untrained``.
    """

    model: Any
    tokenizer: Any
    mask_prob: float = 0.15
    max_length: int = 64
    temperature: float = 1.0
    fields: tuple[str, ...] = ("text_a", "text_b")
    allow_untrained: bool = False

    def __post_init__(self) -> None:
        augment.check_mlm_head(self.model, allow_untrained=self.allow_untrained)
        graphdef, state = nnx.split(self.model)
        self._state = state
        self._logits = jax.jit(lambda st, ids, mask: nnx.merge(graphdef, st)(ids, mask).logits)

    def __call__(self, example: Example, k: int, rng: np.random.Generator) -> list[Example]:
        outs = [dict(example) for _ in range(k)]
        for field in self.fields:
            if not example.get(field):
                continue
            for out, text in zip(outs, self.infill(str(example[field]), k, rng)):
                out[field] = text
        for out in outs:
            out.pop("label", None)
        return outs

    def check(self, texts: Sequence[str]) -> None:
        """Refuse the MLM if it predicts ``texts``' masked tokens no better than their unigram distribution."""
        augment.check_infiller(self.model, self.tokenizer, texts, allow_untrained=self.allow_untrained,
                               max_length=self.max_length)  # fmt: skip

    def infill(self, text: str, k: int, rng: np.random.Generator) -> list[str]:
        """``k`` rewrites of ``text``; every masked token is replaced by a different token."""
        tok, n = self.tokenizer, self.max_length
        ids = tok(text, truncation=True, max_length=n)["input_ids"]
        special = set(tok.all_special_ids)
        cand = np.array([i for i, t in enumerate(ids) if t not in special])
        if len(cand) == 0:
            return [text] * k
        batch = np.full((k, n), tok.pad_token_id, np.int32)
        batch[:, : len(ids)] = ids
        masks = []
        for row in range(k):
            pick = cand[rng.random(len(cand)) < self.mask_prob]
            if len(pick) == 0:
                pick = rng.choice(cand, 1)
            batch[row, pick] = tok.mask_token_id
            masks.append(pick)
        attn = (np.arange(n)[None] < len(ids)).astype(np.int32).repeat(k, 0)
        logits = np.asarray(self._logits(self._state, jnp.asarray(batch), jnp.asarray(attn)), np.float64)
        logits[..., sorted(special)] = -np.inf
        out = []
        for row, pick in enumerate(masks):
            z = logits[row, pick] / self.temperature
            z[np.arange(len(pick)), np.asarray(ids)[pick]] = -np.inf  # a replacement always differs
            p = np.exp(z - z.max(-1, keepdims=True))
            p /= p.sum(-1, keepdims=True)
            new = list(ids)
            for j, pos in enumerate(pick):
                new[pos] = int(rng.choice(len(p[j]), p=p[j]))
            out.append(tok.decode(new, skip_special_tokens=True))
        return out


# ------------------------------------------------------------------------------------------------ S
@dataclasses.dataclass
class ClassifierLabeller:
    """S from one of our fine-tuned sequence classifiers (or regressors)."""

    model: Any
    task: Task
    encoder: Encoder
    batch_size: int = 64
    # (graphdef, jitted eval step), built on the first call and reused every round (it compiles once per
    # shape); rebuilt only if ``model`` is replaced by one of another structure.
    _eval: tuple[Any, Any] | None = dataclasses.field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.label_names = labeller_label_names(self.model, self.task)

    def __call__(self, examples: Sequence[Example]) -> list[Any]:
        if not examples:
            return []
        graphdef, params, rest = split_model(self.model)
        if self._eval is None or self._eval[0] != graphdef:
            self._eval = (graphdef, make_eval_step(graphdef, forward_fn(self.task, "standard")))
        ev = self._eval[1]
        _, pred = evaluate(self.task, ev, params, rest, self.encoder.encode(self.task, examples), self.batch_size)
        if self.task.kind == "regression":
            return [float(x) for x in pred]
        # The labeller's own class order, mapped to the task's labels by name (never by position).
        return [self.label_names[int(x)] for x in pred]


def load_labeller_model(path: str, task: Task) -> Any:
    """A fine-tuned classifier (local path or hub id) with its *own* config: its label names are kept, so
    :class:`ClassifierLabeller` maps its outputs by name. Its classifier head must be in the checkpoint.

    Raises:
      CheckpointError: no such checkpoint, or no classifier head in it.
    """
    from flax_narrow.pretrained import read_checkpoint_config, resolve_path

    from . import tasks as tasks_lib

    local = resolve_path(path)
    cfg, _, _ = read_checkpoint_config(local if os.path.isdir(local) else os.path.dirname(local))
    return tasks_lib.model_class(task, cfg.is_narrow).from_pretrained(local, strict=True)


def labeller_label_names(model: Any, task: Task) -> tuple[str, ...] | None:
    """The label name of each of a labeller's outputs, in its own order (from its config).

    Raises:
      ConfigError: the labeller's label names are not the task's (a different set), or it has a different
        number of outputs and no names.
    """
    from flax_narrow.errors import ConfigError

    if task.kind != "classification":
        return None
    own = tuple(getattr(model.config, "label_names", None) or ())
    want = tuple(task.label_names or ())
    if not own:
        if model.config.num_labels != len(want):
            raise ConfigError(
                f"the labeller has {model.config.num_labels} outputs, the task {len(want)} labels {list(want)}"
            )
        log.warning("the labeller's checkpoint names no labels; assuming the task's order %s", list(want))
        return want
    if set(own) != set(want):
        raise ConfigError(
            f"the labeller's labels {list(own)} are not the task's {list(want)}; fine-tune the labeller on this task"
        )
    if own != want:
        log.info("labeller label order %s mapped by name to the task's %s", list(own), list(want))
    return own


@dataclasses.dataclass
class CallableLabeller:
    """S from any function text(s) -> label, e.g. a rule or a model outside this package."""

    fn: Callable[[Example], Any]

    def __call__(self, examples: Sequence[Example]) -> list[Any]:
        return [self.fn(e) for e in examples]


# ------------------------------------------------------------------------------------------------ pruning
@dataclasses.dataclass(frozen=True)
class KeepBetterHalf:
    """Default: keep the better ceil(|Θ|/2) by probe score."""

    def __call__(self, ranked: Sequence[tuple[Candidate, float]]) -> list[Candidate]:
        return [c for c, _ in ranked[: max(math.ceil(len(ranked) / 2), 1)]] if len(ranked) > 1 else []


@dataclasses.dataclass(frozen=True)
class NotesPrefixRule:
    """The notes' rule, as we read it (the exact rule is unpublished): write each θ as the sequence of its
    values in ``fields`` order; take the longest prefix the worst-ranked θ shares with any other θ ("the
    longest common sequence, rooted at the first element") and remove every θ with that prefix. The best θ is
    always kept; at least the worst is removed.
    """

    fields: tuple[str, ...] = ("learning_rate", "weight_decay", "warmup_ratio", "batch_size", "seed", "epochs")

    def __call__(self, ranked: Sequence[tuple[Candidate, float]]) -> list[Candidate]:
        if len(ranked) <= 1:
            return []
        seqs = [tuple(getattr(c, f) for f in self.fields) for c, _ in ranked]
        worst = seqs[-1]

        def common(a: tuple, b: tuple) -> int:
            n = 0
            while n < len(a) and a[n] == b[n]:
                n += 1
            return n

        depth = max(common(worst, s) for s in seqs[:-1])
        drop = {i for i, s in enumerate(seqs) if depth > 0 and s[:depth] == worst[:depth]} | {len(seqs) - 1}
        drop.discard(0)
        return [c for i, (c, _) in enumerate(ranked) if i not in drop]


# ------------------------------------------------------------------------------------------------ the run
@dataclasses.dataclass(frozen=True)
class AgoraConfig:
    """Knobs of the procedure; ``finetune`` holds the shared (non-θ) fine-tuning settings."""

    out_dir: str
    probe_fraction: float = 0.5
    points_per_mistake: int = 2
    max_mistakes: int = 64
    max_rounds: int | None = None
    replay: int = 0
    side_by_side: bool = True
    seed: int = 0
    finetune: FinetuneConfig = FinetuneConfig()
    # The device mesh candidates train and are scored on (data x fsdp; default every device on data). Every
    # candidate's batch_size and finetune.eval_batch_size must divide over data x fsdp.
    mesh: MeshConfig = MeshConfig()


@dataclasses.dataclass
class AgoraResult:
    model: Any
    round: int
    heldout: float
    rounds: list[dict[str, Any]]
    # Stopped by SIGINT/SIGTERM: the finished rounds and a checkpoint of the round in progress (``round``) are on
    # disk; a rerun with the same out_dir resumes at that round's current step.
    preempted: bool = False
    stop_signal: int | None = None


def survivors(rounds: Sequence[dict[str, Any]], remaining: Sequence[Candidate], theta: Sequence[Candidate]) -> list:
    """The Θ a replay round re-trains: the candidates pruning left, else the last non-replay round's Θ."""
    if remaining:
        return list(remaining)
    trained = [s for s in rounds if not s.get("replay")]
    return [Candidate(**c) for c in trained[-1]["theta"]] if trained else list(theta)


def split_dev(dev: Sequence[Example], probe_fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """E -> (probe, held-out), a fixed shuffle by ``seed``."""
    order = np.random.default_rng(seed).permutation(len(dev))
    cut = int(round(len(dev) * probe_fraction))
    if not 0 < cut < len(dev):
        raise ConfigError(f"probe_fraction {probe_fraction} leaves an empty probe or held-out part of {len(dev)}")
    return [dev[i] for i in order[:cut]], [dev[i] for i in order[cut:]]


def run_agora(
    task: Task,
    encoder: Encoder,
    train: Sequence[Example],
    dev: Sequence[Example],
    theta: Sequence[Candidate],
    model_factory: Callable[[int], Any],
    transform: Transformation,
    labeller: Labeller | None,
    cfg: AgoraConfig,
    prune: PruningRule = KeepBetterHalf(),
    *,
    min_labeller_accuracy: float = MIN_ACCURACY,
) -> AgoraResult:
    """Run (or resume) the procedure; see the module docstring. ``model_factory(seed)`` -> a fresh task model.

    ``labeller=None`` uses the previous round's best candidate (:class:`labeller.PreviousBestLabeller`); a given
    S must reach ``min_labeller_accuracy`` on the probe part (:class:`~flax_narrow.errors.LabellerError`
    otherwise). A transformation with a ``check(texts)`` method (``MLMInfill``) is checked on the train texts.
    Candidates whose probe predictions collapse (:mod:`collapse`) rank below every healthy one.
    """
    if task.kind not in ("classification", "regression"):
        raise ConfigError(f"Agora mines mistakes of sequence classification/regression, not {task.kind!r}")
    mesh = shd.make_mesh(cfg.mesh)
    sizes = {f"candidate {c.name}: batch_size": c.batch_size for c in theta}
    shd.ensure_batch_mesh(mesh, **sizes, eval_batch_size=cfg.finetune.eval_batch_size)
    probe, heldout = split_dev(dev, cfg.probe_fraction, cfg.seed)
    probe_data, heldout_data = encoder.encode(task, probe), encoder.encode(task, heldout)
    if labeller is None:
        labeller = PreviousBestLabeller(task, encoder, cfg.finetune.eval_batch_size, make_labeller=ClassifierLabeller)
    else:
        log.info("labeller S: accuracy %.4f on the probe part",
                 check_labeller(labeller, task, encoder, probe, min_labeller_accuracy))  # fmt: skip
    if hasattr(transform, "check"):
        transform.check([str(e.get("text_a", "")) for e in train])
    os.makedirs(cfg.out_dir, exist_ok=True)  # after the role checks: a refused run writes nothing
    added: list[Example] = []
    remaining, rounds = list(theta), []
    r = 0
    while os.path.isfile(_state_path(cfg.out_dir, r)):  # resume after the last finished round
        with open(_state_path(cfg.out_dir, r), encoding="utf-8") as fh:
            state = json.load(fh)
        rounds.append(state)
        remaining = [Candidate(**c) for c in state["theta_left"]]
        added += _read_jsonl(os.path.join(_round_dir(cfg.out_dir, r), "added.jsonl"))
        r += 1
    if rounds and isinstance(labeller, PreviousBestLabeller):
        labeller.update(_load_round_model(model_factory, cfg.out_dir, r - 1))
    if rounds:
        log.info("resuming after round %d (%d candidates left, %d points added)", r - 1, len(remaining), len(added))
    max_rounds = cfg.max_rounds if cfg.max_rounds is not None else len(theta)
    replays_done = sum(1 for s in rounds if s.get("replay"))
    stop_signal = None
    from .loop import StopSignals

    with StopSignals() as signals:
        while True:
            replay = not remaining or r >= max_rounds
            if replay and replays_done >= cfg.replay:
                break
            if signals.raised:  # between rounds: the finished ones are on disk
                stop_signal = signals.signum or 15
                log.warning("agora stopped before round %d; a rerun starts it", r)
                break
            # Replay re-trains the survivors: what pruning left, or, once Θ is empty, the last round's Θ.
            # A function of the finished rounds only, so a fresh run and a resumed one replay the same Θ.
            this_theta = survivors(rounds, remaining, theta) if replay else remaining
            state = _round(task, encoder, list(train) + added, probe, probe_data, heldout_data, this_theta,
                           model_factory, transform, labeller, prune, cfg, r, replay, added, signals,
                           min_labeller_accuracy, mesh)  # fmt: skip
            if state is None:  # SIGINT / SIGTERM: a checkpoint at the current step is saved; a rerun continues
                stop_signal = signals.signum or 15
                log.warning("agora stopped in round %d; a rerun continues it from the saved step", r)
                break
            rounds.append(state)
            if replay:
                replays_done += 1
            else:
                remaining = [Candidate(**c) for c in rounds[-1]["theta_left"]]
            r += 1
    if stop_signal is not None:
        return AgoraResult(None, r, math.nan, rounds, preempted=True, stop_signal=stop_signal)
    if not rounds:
        raise ConfigError("Θ is empty: nothing to train")
    best = max(rounds, key=lambda s: (not s.get("heldout_collapsed", False), s["heldout"]))
    _write_summary(cfg.out_dir, rounds, best)
    model = _load_round_model(model_factory, cfg.out_dir, best["round"])
    return AgoraResult(model, best["round"], best["heldout"], rounds)


def _round(task, encoder, train, probe, probe_data, heldout_data, theta, factory, transform, labeller, prune, cfg,
           r, replay, added, signals, min_acc, mesh) -> dict[str, Any] | None:  # fmt: skip
    t0 = time.perf_counter()
    data = encoder.encode(task, train)
    rdir = _round_dir(cfg.out_dir, r)
    models = agora_train.train_round(factory, task, data, theta, cfg.finetune, mesh, side_by_side=cfg.side_by_side,
                                     round_dir=rdir, should_stop=lambda: signals.raised,
                                     desc=f"agora round {r}")  # fmt: skip
    if models is None:
        return None
    order = [c for u in agora_train.units(theta, cfg.side_by_side) for c in u]
    metric = task.selection_metric
    scores, preds, guards = [], [], []
    graphdef = split_model(models[0])[0]
    ev = MeshEvalStep(graphdef, forward_fn(task, "standard"), mesh)
    for m in models:
        _, params, rest = split_model(m)
        met, pred = evaluate(task, ev, params, rest, probe_data, cfg.finetune.eval_batch_size)
        scores.append(met[metric])
        preds.append(pred)
        guards.append(collapse.detect(task.kind, pred, probe_data["labels"]))
    # Best first; collapsed candidates count as failed and rank after every healthy one.
    ranked = [(order[i], scores[i], i) for i in collapse.rank(scores, guards)]
    best_c, best_score, bi = ranked[0]
    _, params, rest = split_model(models[bi])
    held, held_pred = evaluate(task, ev, params, rest, heldout_data, cfg.finetune.eval_batch_size)
    held_guard = collapse.detect(task.kind, held_pred, heldout_data["labels"])
    collapse.warn(held_guard, f"agora round {r} best candidate {best_c.name} (held-out part)")
    models[bi].save_pretrained(os.path.join(rdir, "best"))
    # Mistakes of the best model on the probe part -> g -> S -> D.
    mistakes = _mistakes(task, probe, probe_data, preds[bi])[: cfg.max_mistakes]
    rng = np.random.default_rng(cfg.seed * 1000 + r)
    new = [p for ex in mistakes for p in transform(ex, cfg.points_per_mistake, rng)]
    s_acc = float("nan")
    if isinstance(labeller, PreviousBestLabeller):  # default S: the previous round's best (round 0: its own)
        if labeller.model is None:
            labeller.update(models[bi])
        s_acc = probe_accuracy(labeller, task, encoder, probe)
        if s_acc < min_acc:
            log.warning("round %d: default labeller accuracy %.4f < %.4f on the probe part; no points added",
                        r, s_acc, min_acc)  # fmt: skip
            new = []
        labeller.update(models[bi])
    labels = labeller(new) if new else []
    for p, y in zip(new, labels):
        p["label"] = y
    added += new
    with open(os.path.join(rdir, "added.jsonl"), "w", encoding="utf-8") as fh:
        for p in new:
            fh.write(json.dumps(p) + "\n")
    kept = list(theta) if replay else prune([(c, s) for c, s, _ in ranked])
    pruned = [c.name for c in theta if c not in kept]
    dist = collections.Counter(str(y) for y in labels) if task.kind == "classification" else {}
    state = {
        "round": r,
        "replay": replay,
        "theta": [dataclasses.asdict(c) for c in theta],
        "scores": {c.name: s for c, s, _ in ranked},
        "best": best_c.name,
        "probe": best_score,
        "heldout": held[metric],
        "metric": metric,
        "mistakes": len(mistakes),
        "collapsed": [c.name for c, _, i in ranked if collapse.is_failed(guards[i])],
        "heldout_collapsed": collapse.is_failed(held_guard),
        "labeller_accuracy": None if s_acc != s_acc else s_acc,
        "added": len(new),
        "added_labels": dict(dist),
        "train_size": len(train) + len(new),
        "pruned": pruned,
        "theta_left": [dataclasses.asdict(c) for c in kept],
        "time_s": round(time.perf_counter() - t0, 2),
    }
    with open(_state_path(cfg.out_dir, r), "w", encoding="utf-8") as fh:
        json.dump(state, fh, indent=2)
    agora_train.remove_checkpoint(rdir)
    with open(os.path.join(cfg.out_dir, "log.jsonl"), "a", encoding="utf-8") as fh:
        fh.write(json.dumps(state) + "\n")
    log.info("agora round %d: best %s probe %.4f held-out %.4f, +%d points, pruned %d", r, best_c.name,
             best_score, held[metric], len(new), len(pruned))  # fmt: skip
    return state


def _mistakes(task: Task, probe: Sequence[Example], data: dict[str, np.ndarray], pred: np.ndarray) -> list[Example]:
    gold = data["labels"]
    if task.kind == "regression":
        err = np.abs(pred - gold)
        wrong = err > np.quantile(err, 0.75)  # the worst quarter counts as mistakes
    else:
        wrong = pred != gold
    return [probe[i] for i in np.flatnonzero(wrong)]


def _round_dir(out: str, r: int) -> str:
    return os.path.join(out, f"round_{r:03d}")


def _state_path(out: str, r: int) -> str:
    return os.path.join(_round_dir(out, r), "state.json")


def _read_jsonl(path: str) -> list[Example]:
    if not os.path.isfile(path):
        return []
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def _load_round_model(factory: Callable[[int], Any], out: str, r: int) -> Any:
    from flax_narrow.pretrained import from_pretrained

    return from_pretrained(type(factory(0)), os.path.join(_round_dir(out, r), "best"))


def _write_summary(out: str, rounds: list[dict[str, Any]], best: dict[str, Any]) -> None:
    lines = [
        "| round | replay | Θ | best θ | probe | held-out | mistakes | added | labels of added | pruned | time s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in rounds:
        lines.append(
            f"| {s['round']} | {'yes' if s['replay'] else ''} | {len(s['theta'])} | {s['best']} | {s['probe']:.4f} "
            f"| {s['heldout']:.4f} | {s['mistakes']} | {s['added']} | {s['added_labels']} | {len(s['pruned'])} "
            f"| {s['time_s']} |"
        )
    lines.append(f"\nFinal model: round {best['round']} ({best['best']}), held-out {best['metric']} "
                 f"{best['heldout']:.4f}.")  # fmt: skip
    with open(os.path.join(out, "summary.md"), "w", encoding="utf-8") as fh:
        fh.write("\n".join(lines) + "\n")
