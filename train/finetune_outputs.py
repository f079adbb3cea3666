"""The files a finished fine-tuning run writes: ``best/``, ``history.jsonl``, ``predictions.jsonl`` (id, gold
label when known, predicted label, probabilities) and ``summary.json``."""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from . import collapse
from .tasks import Task


def write_outputs(
    output_dir: str, task: Task, result: Any, config: dict[str, Any], test: Any, gold: Any, tokenizer: Any
) -> None:
    """Write a finished run's ``best/`` (model and tokenizer), ``history.jsonl``, ``predictions.jsonl`` (with
    ``test``; ``gold`` its reference labels or None) and, last, ``summary.json`` (its presence marks a finished run).
    ``result`` is a :class:`~flax_narrow.train.finetune.FinetuneResult`."""
    best_dir = os.path.join(output_dir, "best")
    result.model.save_pretrained(best_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(best_dir)
    with open(os.path.join(output_dir, "history.jsonl"), "w", encoding="utf-8") as fh:
        for rec in result.history:
            fh.write(json.dumps(rec) + "\n")
    if result.predictions is not None:
        _write_predictions(os.path.join(output_dir, "predictions.jsonl"), task, result, test, gold)
    summary: dict[str, Any] = {
        "best_metric": result.best_metric,
        "best_step": result.best_step,
        "metric": task.selection_metric,
        "final_step": result.final_step,
    }
    if task.kind == "classification" and task.label_names and len(task.label_names) == 2:
        summary["positive_label"] = task.positive
    if result.test_metrics:
        summary["test"] = result.test_metrics
    best_rec = next((h for h in result.history if h["step"] == result.best_step), {})
    summary["collapse"] = {k: v for k, v in best_rec.items() if k in collapse.FIELD_NAMES} or None
    summary["config"] = config
    tmp = os.path.join(output_dir, "summary.json.tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(summary, fh, indent=2)
    os.replace(tmp, os.path.join(output_dir, "summary.json"))  # written last: marks a finished run


def _write_predictions(path: str, task: Task, result: Any, test: dict[str, Any], gold: Any) -> None:
    names = task.label_names
    outputs = result.test_outputs
    ids = test.get("example_ids") if test is not None else None
    with open(path, "w", encoding="utf-8") as fh:
        for i, p in enumerate(result.predictions):
            rec: dict[str, Any] = {"id": _plain(ids[i]) if ids is not None else i}
            if gold is not None:
                rec["label"] = _label_text(task, gold[i])
            rec["prediction"] = _label_text(task, p)
            if outputs is not None and task.kind in ("classification", "multiple_choice"):
                z = np.asarray(outputs[i], np.float64)
                e = np.exp(z - z.max())
                rec["probabilities"] = _probs(names, e / e.sum(), task)
            elif outputs is not None and task.kind == "multilabel":
                rec["probabilities"] = _probs(names, 1 / (1 + np.exp(-np.asarray(outputs[i], np.float64))), task)
            fh.write(json.dumps(rec) + "\n")


def _probs(names: Any, p: np.ndarray, task: Task) -> Any:
    if names and task.kind != "multiple_choice":
        return {str(n): round(float(x), 6) for n, x in zip(names, p)}
    return [round(float(x), 6) for x in p]


def _plain(x: Any) -> Any:
    return x.item() if hasattr(x, "item") else x


def _label_text(task: Task, p: Any) -> Any:
    p = p.tolist() if hasattr(p, "tolist") else p
    names = task.label_names
    if task.kind == "classification" and names:
        return names[int(p)]
    if task.kind == "multilabel" and names:
        return [names[j] for j, on in enumerate(p) if on]
    return p
