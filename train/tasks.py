"""Fine-tuning task types: which model class, how a batch goes through it, and the benchmark metrics.

Task kinds (``TASKS``):
  classification   single sentence or pair -> one of C labels (cross-entropy); accuracy, F1, MCC.
  regression       one real value (STS-B-like, MSE); Pearson, Spearman.
  multilabel       C independent binary labels (sigmoid BCE); micro/macro F1, subset accuracy.
  multiple_choice  (B, C, L) choices -> the right one; accuracy.
  token            a label per word on its first sub-token (B, P rows); entity F1 via ``seqeval`` (BIO tags).
  qa               extractive QA, start/end logits per token (full-length models only); SQuAD EM and F1.

Metrics come from scikit-learn, scipy and seqeval (the libraries the benchmarks' own scripts use); the
SQuAD EM/F1 is the official script's normalisation, which no maintained library ships on its own.
"""

from __future__ import annotations

import collections
import dataclasses
import re
import string
from typing import Any

import jax.numpy as jnp
import numpy as np

from flax_narrow.errors import ConfigError
from flax_narrow.modeling import architecture_for

TASKS = ("classification", "regression", "multilabel", "multiple_choice", "token", "qa")

# The metric each task selects its best checkpoint by (higher is better).
DEFAULT_METRIC = {
    "classification": "accuracy",
    "regression": "pearson",
    "multilabel": "f1_micro",
    "multiple_choice": "accuracy",
    "token": "f1",
    "qa": "f1",
}

# Keys of a batch that go to the device (others, e.g. QA offsets, stay on the host).
DEVICE_KEYS = (
    "input_ids",
    "attention_mask",
    "token_type_ids",
    "labels",
    "narrow_positions",
    "narrow_valid",
    "start_positions",
    "end_positions",
)


@dataclasses.dataclass(frozen=True)
class Task:
    """A task kind plus what its head needs: label names (classification/token/multilabel) and the metric."""

    kind: str
    label_names: tuple[str, ...] | None = None
    metric: str | None = None
    # Binary classification: the class F1 scores (default: the second label name, GLUE's order, where
    # MRPC's "equivalent" and QQP's "duplicate" are label 1).
    positive_label: str | None = None

    def __post_init__(self) -> None:
        from flax_narrow.errors import ConfigError

        if self.kind not in TASKS:
            raise ConfigError(f"unknown task {self.kind!r}; choose one of {', '.join(TASKS)}")
        if self.positive_label is not None and (not self.label_names or self.positive_label not in self.label_names):
            raise ConfigError(
                f"positive label {self.positive_label!r} is not one of the labels {list(self.label_names or ())}"
            )

    @property
    def positive(self) -> str | None:
        """The positive class of a binary classification task (what binary F1 scores), else None."""
        if self.kind != "classification" or not self.label_names or len(self.label_names) != 2:
            return None
        return self.positive_label if self.positive_label is not None else self.label_names[1]

    @property
    def num_labels(self) -> int:
        if self.kind == "regression":
            return 1
        if self.kind in ("multiple_choice", "qa"):
            return 2
        if not self.label_names:
            raise ConfigError(f"task {self.kind!r} needs label_names")
        return len(self.label_names)

    @property
    def problem_type(self) -> str | None:
        return {
            "regression": "regression",
            "multilabel": "multi_label_classification",
            "classification": "single_label_classification",
        }.get(self.kind)

    @property
    def selection_metric(self) -> str:
        return self.metric or DEFAULT_METRIC[self.kind]


# Task kind -> the head of flax_narrow.modeling.ARCHITECTURES that computes it.
TASK_HEADS = {
    "classification": "sequence-classification",
    "regression": "sequence-classification",
    "multilabel": "sequence-classification",
    "multiple_choice": "multiple-choice",
    "token": "token-classification",
    "qa": "question-answering",
}


def model_class(task: Task, narrow_model: bool) -> type:
    """The model class of a task, from the architecture table; NarrowBERT classes carry the narrow names.

    Raises:
      ConfigError: a head NarrowBERT does not have (extractive QA needs every token's output).
    """
    row = architecture_for(TASK_HEADS[task.kind], narrow_model)
    if narrow_model and row.family != "narrow":
        raise ConfigError(f"the {row.head} head needs every token's output; NarrowBERT models do not support it")
    return row.cls


def forward(task: Task, model: Any, batch: dict[str, Any], *, deterministic: bool) -> tuple[Any, Any]:
    """Run ``model`` on a device batch; returns (loss fp32 scalar, outputs).

    Outputs: classification/multilabel (B, C) logits; regression (B,); multiple choice (B, C);
    token (B, P, C) at the batch's ``narrow_positions``; qa (B, L, 2) start/end logits.
    """
    common = dict(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        token_type_ids=batch.get("token_type_ids"),
        deterministic=deterministic,
    )
    if task.kind == "qa":
        out = model(**common, start_positions=batch["start_positions"], end_positions=batch["end_positions"])
        return out.loss, jnp.stack([out.start_logits, out.end_logits], -1)
    if task.kind == "token":
        out = model(
            **common,
            labels=batch.get("labels"),
            label_layout="rows",  # the Encoder gives one label per word row (B, P), never per token
            narrow_positions=batch["narrow_positions"],
            narrow_valid=batch["narrow_valid"],
        )
        return out.loss, out.logits
    out = model(**common, labels=batch.get("labels"))
    logits = out.logits[..., 0] if task.kind == "regression" else out.logits
    return out.loss, logits


def predictions(task: Task, outputs: np.ndarray, batch: dict[str, Any] | None = None) -> Any:
    """Host-side predictions from ``forward``'s outputs: label ids, values, label sets, tag lists or spans."""
    if task.kind in ("classification", "multiple_choice"):
        return outputs.argmax(-1)
    if task.kind == "regression":
        return outputs
    if task.kind == "multilabel":
        return (outputs > 0).astype(np.int64)
    if task.kind == "token":
        return outputs.argmax(-1)
    assert batch is not None
    return decode_spans(outputs[..., 0], outputs[..., 1], batch["context_mask"])


def decode_spans(start_bl: np.ndarray, end_bl: np.ndarray, context_bl: np.ndarray, max_answer: int = 30) -> np.ndarray:
    """The best (start, end) per row with start <= end < start + ``max_answer``, both inside the context.

    Args:
      start_bl, end_bl: float[B, L] logits; context_bl: bool[B, L], True on context tokens.
    Returns: int[B, 2] token positions.
    """
    neg = np.float32(-1e9)
    s = np.where(context_bl, start_bl, neg)
    e = np.where(context_bl, end_bl, neg)
    score = s[:, :, None] + e[:, None, :]  # (B, start, end)
    length = s.shape[1]
    i, j = np.arange(length)[:, None], np.arange(length)[None, :]
    score = np.where((j >= i) & (j < i + max_answer), score, -np.inf)
    flat = score.reshape(len(score), -1).argmax(-1)
    return np.stack([flat // length, flat % length], -1)


# ------------------------------------------------------------------------------------------------ metrics
def compute_metrics(task: Task, preds: Any, refs: Any) -> dict[str, float]:
    """Benchmark metrics. ``refs``: label ids (B,), values (B,), multi-hot (B, C), tag-name lists (token), or
    answer strings (qa, with ``preds`` the predicted strings)."""
    from sklearn import metrics as skm

    if task.kind in ("classification", "multiple_choice"):
        preds, refs = np.asarray(preds), np.asarray(refs)
        out = {"accuracy": float(skm.accuracy_score(refs, preds))}
        if task.kind == "classification":
            if task.num_labels == 2:
                pos = task.label_names.index(task.positive) if task.label_names else 1
                out["f1"] = float(skm.f1_score(refs, preds, average="binary", pos_label=pos, zero_division=0))
            else:
                out["f1"] = float(skm.f1_score(refs, preds, average="macro", zero_division=0))
            out["mcc"] = float(skm.matthews_corrcoef(refs, preds))
        return out
    if task.kind == "regression":
        from scipy import stats

        preds, refs = np.asarray(preds, np.float64), np.asarray(refs, np.float64)
        constant = np.ptp(preds) == 0 or np.ptp(refs) == 0
        return {
            "pearson": 0.0 if constant else float(stats.pearsonr(preds, refs)[0]),
            "spearman": 0.0 if constant else float(stats.spearmanr(preds, refs)[0]),
            "mse": float(np.mean((preds - refs) ** 2)),
        }
    if task.kind == "multilabel":
        preds, refs = np.asarray(preds), np.asarray(refs).astype(np.int64)
        return {
            "f1_micro": float(skm.f1_score(refs, preds, average="micro", zero_division=0)),
            "f1_macro": float(skm.f1_score(refs, preds, average="macro", zero_division=0)),
            "subset_accuracy": float(skm.accuracy_score(refs, preds)),
        }
    if task.kind == "token":
        from seqeval import metrics as sq

        flat_p = [t for row in preds for t in row]
        flat_r = [t for row in refs for t in row]
        return {
            "f1": float(sq.f1_score(refs, preds, zero_division=0)),
            "precision": float(sq.precision_score(refs, preds, zero_division=0)),
            "recall": float(sq.recall_score(refs, preds, zero_division=0)),
            "accuracy": float(np.mean([a == b for a, b in zip(flat_p, flat_r)])) if flat_r else 0.0,
        }
    em = [max(_normalize(p) == _normalize(g) for g in golds) for p, golds in zip(preds, refs)]
    f1 = [max(_token_f1(p, g) for g in golds) for p, golds in zip(preds, refs)]
    return {"exact_match": float(np.mean(em)) if em else 0.0, "f1": float(np.mean(f1)) if f1 else 0.0}


def _normalize(s: str) -> str:
    """SQuAD v1.1 normalisation: lower case, no punctuation, no articles, single spaces."""
    s = "".join(ch for ch in s.lower() if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def _token_f1(pred: str, gold: str) -> float:
    p, g = _normalize(pred).split(), _normalize(gold).split()
    common = collections.Counter(p) & collections.Counter(g)
    same = sum(common.values())
    if not p or not g:
        return float(p == g)
    if same == 0:
        return 0.0
    prec, rec = same / len(p), same / len(g)
    return 2 * prec * rec / (prec + rec)
