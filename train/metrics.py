"""Metric sinks, written by process 0 only: JSON lines (one record per step / evaluation) and TensorBoard
event files (``tensorboardX``), plus a tqdm progress bar."""

from __future__ import annotations

import json
import logging
import math
import os
from typing import Any

import jax

log = logging.getLogger(__name__)


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf
    return value


class MetricsWriter:
    """``write(step, {name: float})`` to ``metrics.jsonl`` and ``tensorboard/`` under ``directory``.

    Does nothing on processes other than 0, or when ``directory`` is None. The JSONL file is appended to
    (a resumed run continues it) and flushed after every record; ``resume_step`` first drops the records of
    steps after it (written after the checkpoint a run resumes from), so no step appears twice.
    """

    def __init__(self, directory: str | None, *, enabled: bool | None = None, resume_step: int | None = None):
        self.enabled = (jax.process_index() == 0 if enabled is None else enabled) and directory is not None
        self.jsonl_path = os.path.join(directory, "metrics.jsonl") if directory else None
        self._fh = None
        self._tb = None
        if self.enabled:
            os.makedirs(directory, exist_ok=True)
            if resume_step is not None:
                drop_records_after(self.jsonl_path, resume_step)
            self._fh = open(self.jsonl_path, "a", encoding="utf-8")
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(os.path.join(directory, "tensorboard"))

    def write(self, step: int, values: dict[str, Any], *, kind: str = "train") -> None:
        if not self.enabled:
            return
        record = {"kind": kind, "step": int(step), **{k: _clean(v) for k, v in values.items()}}
        self._fh.write(json.dumps(record) + "\n")
        self._fh.flush()
        for name, value in values.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                self._tb.add_scalar(f"{kind}/{name}", value, int(step))

    def flush(self) -> None:
        if self.enabled:
            self._fh.flush()
            self._tb.flush()

    def close(self) -> None:
        if self.enabled:
            self._fh.close()
            self._tb.close()
            self.enabled = False


def drop_records_after(path: str, step: int) -> int:
    """Rewrite the JSONL file at ``path`` without the records of steps > ``step``; returns how many went."""
    if not os.path.isfile(path):
        return 0
    with open(path, encoding="utf-8") as fh:
        lines = [line for line in fh if line.strip()]
    keep = [line for line in lines if int(json.loads(line).get("step", 0)) <= step]
    if len(keep) != len(lines):
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.writelines(keep)
        os.replace(tmp, path)
        log.info("%s: dropped %d records after step %d (resumed run)", path, len(lines) - len(keep), step)
    return len(lines) - len(keep)


def read_jsonl(path: str, kind: str = "train") -> dict[int, dict[str, Any]]:
    """{step: record} of one kind; a step written twice (a resumed run redoing steps) keeps the last record."""
    out: dict[int, dict[str, Any]] = {}
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            line = line.strip()
            if not line:
                continue
            rec = json.loads(line)
            if rec.get("kind") == kind:
                out[int(rec["step"])] = rec
    return out


def progress_bar(total: int, initial: int, enabled: bool, desc: str = "pretrain"):
    """A tqdm bar on process 0 (stderr), or None."""
    if not enabled or jax.process_index() != 0:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True)
