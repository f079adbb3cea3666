"""What a conversion or an export will write, decided before anything is written: the architecture to keep
(from the one table, :data:`flax_narrow.modeling.ARCHITECTURES`), the strict key plan
(:func:`flax_narrow.convert.loading.plan_model_load`), and the lazily produced, cast tensors.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterator

import numpy as np

from flax_narrow.config import EncoderConfig, canonical_dtype
from flax_narrow.errors import CheckpointError, ConfigError
from flax_narrow.modeling import HEADS, architecture_for, architecture_named

from . import keymap, loading, sources, writers
from .readers import TensorSource

CHUNK_BYTES = 8 * 2**20  # tensors above this (untransformed) are converted in row blocks of this size


def model_class(architecture: str, config: EncoderConfig, where: str | None = None) -> type:
    """Our class for an architecture name in config.json (``RobertaForMaskedLM``, ``NarrowBertModel``, ...):
    the NarrowBERT class of that head for a narrow config, so that the NarrowBERT name goes into the checkpoint.

    Raises:
      ConfigError: a name flax-narrow does not implement (the message starts with ``where``, when given).
    """
    row = architecture_named(architecture)
    if row is None:
        raise ConfigError(
            f"{where + ': ' if where else ''}architecture {architecture!r} is not one flax-narrow implements; "
            f"pass --head ({', '.join(HEADS)}) to choose what to keep"
        )
    return head_class(row.head, config, where)


def head_class(head: str, config: EncoderConfig, where: str | None = None) -> type:
    """Our class for a ``--head`` choice (the NarrowBERT class of that head for a narrow config).

    Raises:
      ConfigError: an unknown head, or a head NarrowBERT does not have for a narrow config.
    """
    row = architecture_for(head, config.is_narrow)
    at = where + ": " if where else ""
    if row is None:
        raise ConfigError(f"{at}unknown head {head!r}; choose one of auto, {', '.join(HEADS)}")
    if config.is_narrow and row.family != "narrow":
        raise ConfigError(
            f"{at}a NarrowBERT (full_length_layers={config.full_length_layers}) has no {head} head: it needs "
            "every token's output; choose another --head"
        )
    return row.cls


@dataclasses.dataclass
class ConversionPlan:
    """What a conversion will write (before anything is written)."""

    opened: sources.OpenedSource
    config: EncoderConfig
    model_class: type
    load: keymap.LoadPlan
    targets: dict[str, tuple[int, ...]]  # flax path -> shape, of the parameters written
    notes: list[str]

    @property
    def architecture(self) -> str:
        return self.model_class.hf_architecture


def plan_conversion(
    opened: sources.OpenedSource, *, head: str = "auto", strict: bool = False, raise_problems: bool = True
) -> ConversionPlan:
    """Match a checkpoint to the parameters of the architecture to keep, strictly.

    Args:
      opened: from :func:`flax_narrow.convert.sources.open_source`.
      head: 'auto' (the checkpoint's architecture, else guessed from its keys) or one of ``HEADS``.
      strict: parameters of the kept architecture absent from the checkpoint are an error (by default the
        pooler/head is left out of the output and ``from_pretrained`` initialises it, with a warning).
      raise_problems: raise on key problems (else they stay in ``plan.load.problems``, for ``inspect``).

    Raises:
      ConfigError: the config contradicts the weights, or an unknown head or architecture.
      CheckpointError: missing, unexpected or mis-shaped keys (all named).
    """
    config, src = opened.config, opened.source
    assert config is not None
    keys = src.keys()
    if head != "auto":
        cls = head_class(head, config, opened.path)
    elif opened.architecture:
        cls = model_class(opened.architecture, config, os.path.join(opened.directory, "config.json"))
    else:
        cls = head_class(keymap.guess_head(keys), config, opened.path)
    targets = loading.param_shapes(cls, config)
    load = loading.plan_model_load(
        opened, cls, config, strict=strict, raise_problems=raise_problems, action="convert to", targets=targets
    )
    notes: list[str] = []
    if load.fresh:
        notes.append(
            f"not in the checkpoint, left for from_pretrained to initialise: {_summarise(load.fresh)} "
            "(use --strict to refuse)"
        )
    if load.dropped_heads:
        notes.append(f"dropped (not part of {cls.__name__}): {_summarise(load.dropped_heads)}")
    stale = loading.stale_decoder_gap(src, load)
    if stale:
        notes.append(
            f"untied MLM decoder copy differs from the word embeddings by up to {stale:.3g}: ignored, the decoder "
            "is tied to the word embeddings"
        )
    written = {p: s for p, s in targets.items() if p in load.assignments}
    return ConversionPlan(opened, config, cls, load, written, notes)


def _summarise(names: list[str], limit: int = 6) -> str:
    head = ", ".join(names[:limit])
    return head + (f" (+{len(names) - limit} more)" if len(names) > limit else "")


def lazy_tensor(
    src: TensorSource, key: str, transform: str | None, dtype: np.dtype
) -> Callable[[], np.ndarray | Iterator[np.ndarray]]:
    """A producer for :class:`writers.TensorSpec`: the transformed, cast tensor; large untransformed tensors
    (embedding tables) come as row blocks, so no whole copy in the output dtype is ever held."""

    def produce() -> np.ndarray | Iterator[np.ndarray]:
        shape = src.shape(key)
        row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * max(dtype.itemsize, 4)
        if transform is not None or len(shape) == 0 or shape[0] * row_bytes <= CHUNK_BYTES:
            return keymap.TRANSFORMS[transform](src.get(key)).astype(dtype, copy=False)
        step = max(1, CHUNK_BYTES // max(row_bytes, 1))
        return (
            src.get_rows(key, i, min(i + step, shape[0])).astype(dtype, copy=False) for i in range(0, shape[0], step)
        )

    return produce


def storage_dtype_for(choice: str | None, param_dtype: str, source_dtype: str) -> np.dtype:
    """The dtype a tensor is written in: 'param' (the config's param dtype), 'source', or a dtype name."""
    if choice in (None, "param"):
        return np.dtype(canonical_dtype(param_dtype))
    if choice == "source":
        dt = np.dtype(canonical_dtype(sources.dtype_name(source_dtype)))
        return dt if dt.kind == "f" or dt.name == "bfloat16" else np.dtype(np.float32)
    try:
        dt = np.dtype(canonical_dtype(choice))
    except TypeError:
        raise ConfigError(f"storage dtype {choice!r} is not a dtype name") from None
    if not (dt.kind == "f" or dt.name == "bfloat16"):
        raise ConfigError(f"storage dtype must be a float dtype, got {dt.name}")
    return dt


def tensor_specs(plan: ConversionPlan, storage: str | None) -> list[writers.TensorSpec]:
    """One lazily produced tensor per written parameter: read, transform (transpose), cast."""
    src = plan.opened.source
    specs = []
    for path in sorted(plan.load.assignments):
        key, transform = plan.load.assignments[path]
        dt = storage_dtype_for(storage, plan.config.param_dtype, src.dtype(key))

        specs.append(writers.TensorSpec(path, dt, plan.targets[path], lazy_tensor(src, key, transform, dt)))
    return specs


@dataclasses.dataclass
class VerifyResult:
    """``--verify`` outcome: the compared output and its max abs difference, or why it was skipped."""

    output: str | None = None
    shape: tuple[int, ...] | None = None
    max_abs_diff: float | None = None
    reference: str | None = None
    skipped: str | None = None


def check_destination(src: str, dst: str | os.PathLike, overwrite: bool) -> str:
    """Refuse early (before any work) a destination that exists without ``overwrite`` or that is the source."""
    dest = os.path.abspath(os.fspath(dst))
    if os.path.exists(dest) and not overwrite:
        raise CheckpointError(f"{dest}: already exists; pass --overwrite (overwrite=True) to replace it")
    if os.path.exists(src):
        s = os.path.realpath(src)
        d = os.path.realpath(dest)
        if d == s or s.startswith(d + os.sep) or (os.path.isdir(s) and d.startswith(s + os.sep)):
            raise CheckpointError(f"{dest}: the destination must not be, contain, or lie inside the source {src}")
    return dest
