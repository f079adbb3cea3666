"""Collapse guard: flag a fine-tuned classifier that is no better than predicting one class.

BORT's known failure (alexa/bort issue 2: 0.68 on MRPC, exactly the constant predictor's dev accuracy) is a run
that *looks* trained -- the loss went down, a checkpoint was written -- but predicts (almost) one class for
every input. A run is flagged as collapsed when, on an evaluation set of n labelled rows,

* its most frequent predicted class covers at least ``max_class_fraction`` (default 0.95) of the rows (unless
  the gold labels are themselves that skewed), or
* its accuracy is within noise of the best constant predictor: ``acc < p0 + z * sqrt(p0 (1 - p0) / n)``,
  where ``p0`` is the frequency of the most common gold class (the accuracy of always predicting it) and the
  square root is the binomial standard error of an accuracy measured on n rows at ``p0``; ``z = 2`` by default:
  a run must beat the constant predictor by two standard errors (one-sided, about 2.3% of runs that are only
  as good as the constant predictor get past it by luck) before it counts as trained.

Regression has one analogue: predictions that (almost) do not vary (their standard deviation is below
``1e-3`` of the gold values' one). Other task kinds are not checked (``detect`` returns ``None``).

:func:`detect` gives a :class:`CollapseReport`; :func:`rank` (by :func:`rank_key`) is how Agora and candidate
searches order candidates, so that a collapsed candidate ranks below every healthy one (it counts as failed)
whatever its score.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

MAX_CLASS_FRACTION = 0.95
Z = 2.0
# The keys CollapseReport.fields() writes into metrics records and summary.json.
FIELD_NAMES = ("collapsed", "collapse_reason", "top_class_fraction", "constant_accuracy", "collapse_margin")


@dataclasses.dataclass(frozen=True)
class CollapseReport:
    """What the guard saw on one evaluation set.

    Attributes:
      collapsed: the run counts as failed.
      reason: why (empty when not collapsed).
      n: rows evaluated.
      accuracy: the run's accuracy (classification) or the std of its predictions (regression).
      constant_accuracy: the best constant predictor's accuracy ``p0`` (classification; 0 for regression).
      margin: ``z * sqrt(p0 (1 - p0) / n)``, the noise band above ``p0``.
      top_class_fraction: the share of rows given the most frequent predicted class (1 for regression
        collapse, else 0).
    """

    collapsed: bool
    reason: str
    n: int
    accuracy: float
    constant_accuracy: float
    margin: float
    top_class_fraction: float

    def fields(self) -> dict[str, Any]:
        """Flat fields for a metrics record / ``summary.json``."""
        return {
            "collapsed": self.collapsed,
            "collapse_reason": self.reason,
            "top_class_fraction": round(self.top_class_fraction, 4),
            "constant_accuracy": round(self.constant_accuracy, 4),
            "collapse_margin": round(self.margin, 4),
        }


def noise_margin(p0: float, n: int, z: float = Z) -> float:
    """``z`` binomial standard errors of an accuracy measured on ``n`` rows at true accuracy ``p0``."""
    return z * math.sqrt(max(p0 * (1.0 - p0), 0.0) / max(n, 1))


def detect(
    kind: str,
    pred: Any,
    gold: Any,
    *,
    max_class_fraction: float = MAX_CLASS_FRACTION,
    z: float = Z,
) -> CollapseReport | None:
    """Check one evaluation.

    Args:
      kind: the task kind (``Task.kind``); only ``classification`` and ``regression`` are checked.
      pred: predicted class ids (n,) (or values (n,) for regression).
      gold: gold class ids (n,) (or values).
      max_class_fraction: flag when the top predicted class covers at least this share of the rows.
      z: the noise band is ``z`` binomial standard errors above the constant predictor.

    Returns:
      The report, or ``None`` when the kind is not checked or there are no rows.
    """
    if kind not in ("classification", "regression") or pred is None or gold is None:
        return None
    pred, gold = np.asarray(pred).reshape(-1), np.asarray(gold).reshape(-1)
    n = len(gold)
    if n == 0:
        return None
    if kind == "regression":
        spread, ref = float(np.std(pred)), float(np.std(gold))
        flat = spread <= 1e-3 * max(ref, 1e-12)
        reason = f"predictions barely vary (std {spread:.3g} vs gold {ref:.3g})" if flat else ""
        return CollapseReport(flat, reason, n, spread, 0.0, 0.0, 1.0 if flat else 0.0)
    _, pred_counts = np.unique(pred, return_counts=True)
    _, gold_counts = np.unique(gold, return_counts=True)
    top = float(pred_counts.max() / n)
    p0 = float(gold_counts.max() / n)
    acc = float(np.mean(pred == gold))
    margin = noise_margin(p0, n, z)
    reasons = []
    if top >= max_class_fraction > p0:  # a dev set that is itself one class is left to the accuracy test
        reasons.append(f"{top:.1%} of the {n} predictions are one class")
    if acc < p0 + margin:
        reasons.append(f"accuracy {acc:.4f} is within noise of the constant predictor ({p0:.4f} + {margin:.4f})")
    return CollapseReport(bool(reasons), "; ".join(reasons), n, acc, p0, margin, top)


def warn(report: CollapseReport | None, what: str) -> None:
    """Log a warning naming ``what`` when ``report`` says collapsed."""
    if report is not None and report.collapsed:
        log.warning("%s collapsed: %s (BORT's known failure mode; see docs/finetuning.md, Agora)", what, report.reason)


def is_failed(report: CollapseReport | None) -> bool:
    """True when a candidate must count as failed (collapsed)."""
    return report is not None and report.collapsed


def rank(scores: Sequence[float], reports: Sequence[CollapseReport | None]) -> list[int]:
    """Indices of candidates best first: healthy ones by score, then collapsed ones by score (ties keep order).

    A collapsed candidate counts as failed: it ranks below every healthy one even when its score is higher,
    as a constant "paraphrase" predictor's F1 on MRPC (0.81) is above that of many trained models.
    """
    return sorted(range(len(scores)), key=lambda i: rank_key(scores[i], reports[i]), reverse=True)


def rank_key(score: float, report: CollapseReport | None) -> tuple[int, float]:
    """Sort key, larger is better: healthy candidates first (by score), collapsed ones after every healthy one."""
    s = score if isinstance(score, (int, float)) and math.isfinite(score) else -math.inf
    return (0 if is_failed(report) else 1, s)
