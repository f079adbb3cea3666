"""Agora's labeller S: the notes' condition (accuracy >= 2/3) checked on the probe part, and a default S.

The notes require "an auxiliary trained labeller S whose accuracy is above 2/3". :func:`check_labeller`
measures S on the probe part of the dev set (gold labels known, never used for the final choice) and raises
:class:`~flax_narrow.errors.LabellerError`, naming the accuracy found, when S falls short. Only sequence
classification is checked (for regression, "accuracy" has no meaning; the check returns ``nan``).

Default S (no labeller given): :class:`PreviousBestLabeller`, the best candidate of the previous round (in round
0, the round's own best). Trade-off: it needs no extra model and is as good as the search so far, but it is
self-training -- points near a mistake tend to get the label the model already believes, so they sharpen the
decision boundary where the model is right and can entrench it where it is wrong. It is checked each round
the same way; a round whose default S is below the condition adds no points (logged and recorded), rather than
stopping the run. An explicit, independent S (a bigger model, rules, people) avoids the self-confirmation.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

from flax_narrow.errors import LabellerError

from .tasks import Task

log = logging.getLogger(__name__)

Example = dict[str, Any]
MIN_ACCURACY = 2.0 / 3.0


def probe_accuracy(labeller: Any, task: Task, encoder: Any, probe: Sequence[Example]) -> float:
    """Accuracy of ``labeller`` on ``probe`` (examples with gold labels); ``nan`` unless classification."""
    if task.kind != "classification" or not probe:
        return float("nan")
    stripped = [{k: v for k, v in e.items() if k != "label"} for e in probe]
    labels = labeller(stripped)
    gold = encoder.labels(task, [e["label"] for e in probe])
    got = encoder.labels(task, list(labels))
    return float(np.mean(got == gold))


def check_labeller(
    labeller: Any, task: Task, encoder: Any, probe: Sequence[Example], min_accuracy: float = MIN_ACCURACY
) -> float:
    """The notes' condition on S; returns the accuracy found.

    Raises:
      LabellerError: accuracy on the probe part is below ``min_accuracy``.
    """
    acc = probe_accuracy(labeller, task, encoder, probe)
    if acc == acc and acc < min_accuracy:  # nan (not checked) passes
        raise LabellerError(
            f"labeller S reaches accuracy {acc:.4f} on the {len(probe)} probe examples, below the required "
            f"{min_accuracy:.4f} (Agora needs S's accuracy >= 2/3); give a better labeller or none (the previous "
            "round's best candidate)"
        )
    return acc


@dataclasses.dataclass
class PreviousBestLabeller:
    """Default S: the best candidate of the previous round (``update`` sets it; Agora calls it every round)."""

    task: Task
    encoder: Any
    batch_size: int = 64
    model: Any = None
    # (model, task, encoder, batch_size) -> a labeller; run_agora passes agora.ClassifierLabeller (this module
    # cannot import agora, which imports it).
    make_labeller: Any = None
    _labeller: Any = dataclasses.field(default=None, init=False, repr=False)

    def update(self, model: Any) -> None:
        self.model = model
        if self._labeller is None:
            if self.make_labeller is None:
                raise LabellerError("PreviousBestLabeller needs make_labeller (e.g. agora.ClassifierLabeller)")
            self._labeller = self.make_labeller(model, self.task, self.encoder, self.batch_size)
        else:
            self._labeller.model = model

    def __call__(self, examples: Sequence[Example]) -> list[Any]:
        if self._labeller is None:
            raise LabellerError("PreviousBestLabeller has no model yet (update() it with a round's best candidate)")
        return self._labeller(examples)
