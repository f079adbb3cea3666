"""What is in a checkpoint: detected format, config, parameter count, dtypes, and whatever would stop a load.

Reads headers and shapes only (plus, for an untied MLM decoder copy, a chunked comparison with the embeddings).
"""

from __future__ import annotations

import collections
import dataclasses
import os
from typing import Any

import numpy as np

from flax_narrow.config import SHAPE_FIELDS, EncoderConfig
from flax_narrow.errors import FlaxNarrowError

from . import sources
from .plan import plan_conversion


@dataclasses.dataclass
class InspectReport:
    path: str
    layout: str
    files: dict[str, int]  # file -> size in bytes
    config: EncoderConfig | None
    config_origin: str
    architecture: str | None
    num_tensors: int
    num_parameters: int  # excluding ignored buffers / tied copies
    dtypes: dict[str, tuple[int, int]]  # dtype -> (tensors, elements)
    ignored: list[str]
    notes: list[str]
    problems: list[str]

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["config"] = self.config.to_dict() if self.config is not None else None
        return d


def inspect_checkpoint(
    src: str | os.PathLike, *, config: EncoderConfig | str | os.PathLike | None = None, head: str = "auto"
) -> InspectReport:
    """Describe a checkpoint without converting it.

    Problems that would stop ``flax-narrow convert`` (missing/unexpected/mis-shaped keys, a config that
    contradicts the weights) are collected in ``problems`` rather than raised.

    Raises:
      CheckpointError: the files cannot be read at all (corrupt, truncated, refused pickle, not found).
    """
    opened = sources.open_source(os.fspath(src), config=config)
    try:
        src_ = opened.source
        keys = src_.keys()
        counts: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0])
        for k in keys:
            c = counts[sources.dtype_name(src_.dtype(k))]
            c[0] += 1
            c[1] += int(np.prod(src_.shape(k), dtype=np.int64))
        problems: list[str] = []
        notes: list[str] = []
        ignored: list[str] = []
        architecture = opened.architecture
        try:
            plan = plan_conversion(opened, head=head, raise_problems=False)
            architecture = plan.architecture
            problems += plan.load.problems
            notes += plan.notes
            ignored = plan.load.ignored
        except FlaxNarrowError as e:
            problems.append(str(e))
        num_parameters = sum(int(np.prod(src_.shape(k), dtype=np.int64)) for k in keys if k not in set(ignored))
        return InspectReport(
            path=opened.path,
            layout=opened.layout,
            files={f: os.path.getsize(f) for f in opened.files},
            config=opened.config,
            config_origin=opened.config_origin,
            architecture=architecture,
            num_tensors=len(keys),
            num_parameters=num_parameters,
            dtypes={k: (v[0], v[1]) for k, v in sorted(counts.items())},
            ignored=ignored,
            notes=notes,
            problems=problems,
        )
    finally:
        opened.close()


def describe(report: InspectReport) -> list[str]:
    """Human-readable lines (the CLI prints them)."""
    lines = [f"path:         {report.path}", f"format:       {report.layout}"]
    for f, size in report.files.items():
        lines.append(f"file:         {os.path.basename(f)} ({size / 2**20:.1f} MiB)")
    cfg = report.config
    if cfg is not None:
        lines.append(f"config:       from {report.config_origin}")
        default = EncoderConfig()
        fields = [f.name for f in dataclasses.fields(cfg)]
        main = [f for f in SHAPE_FIELDS if getattr(cfg, f) is not None]  # full_length_layers: NarrowBERT only
        shown = main + [f for f in fields if f not in SHAPE_FIELDS and getattr(cfg, f) != getattr(default, f)]
        lines.append("  " + " ".join(f"{f}={getattr(cfg, f)}" for f in shown))
    lines.append(f"architecture: {report.architecture or 'unknown'}")
    lines.append(
        f"parameters:   {report.num_parameters:,} in {report.num_tensors - len(report.ignored)} tensors"
        + (f" (+{len(report.ignored)} ignored: {', '.join(report.ignored)})" if report.ignored else "")
    )
    for dt, (n, elems) in report.dtypes.items():
        lines.append(f"dtype:        {dt}: {n} tensors, {elems:,} elements")
    lines += [f"note:         {n}" for n in report.notes]
    if report.problems:
        lines += [f"PROBLEM:      {p}" for p in report.problems]
    else:
        lines.append("problems:     none (flax-narrow convert would succeed)")
    return lines
