"""Length bucketing for inference and evaluation: short texts are not padded to ``max_length``.

Real text is short (a WordNet gloss is ~15 tokens, a fortune ~40), so padding every batch to a fixed
``max_length`` of 128 or 512 computes mostly padding. :func:`plan_batches` sorts examples by length into a few
static lengths (``bucket_lengths``: powers of two, so at most ~log2(max_length) shapes) and cuts each bucket
into batches of one fixed size; every batch of a bucket has the same shape, so a jitted forward compiles once
per bucket. The last batch of a bucket is filled up with repeats of its first example (``Batch.real`` says how
many rows are real), so no other shape appears. Results come back in the input order with
:func:`in_input_order`.

Example:
    >>> plan = plan_batches([3, 40, 9, 120, 17], batch_size=2, max_length=128)
    >>> [(b.length, b.indices.tolist(), b.real) for b in plan]
    [(16, [0, 2], 2), (32, [4, 4], 1), (64, [1, 1], 1), (128, [3, 3], 1)]
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from flax_narrow.errors import InputError


def bucket_lengths(max_length: int, *, smallest: int = 16) -> tuple[int, ...]:
    """The static lengths: ``smallest``, 2·smallest, ... while below ``max_length``, then ``max_length``.

    >>> bucket_lengths(128)
    (16, 32, 64, 128)
    >>> bucket_lengths(100, smallest=32)
    (32, 64, 100)
    """
    if max_length < 1 or smallest < 1:
        raise InputError(f"bucket lengths need max_length >= 1 and smallest >= 1, got {max_length}, {smallest}")
    out = []
    n = smallest
    while n < max_length:
        out.append(n)
        n *= 2
    out.append(max_length)
    return tuple(out)


@dataclasses.dataclass(frozen=True)
class Batch:
    """One static-shape batch: ``indices`` int64[batch_size] into the inputs (the first ``real`` distinct, the
    rest repeats of ``indices[0]``), all padded to ``length`` tokens."""

    indices: np.ndarray
    length: int
    real: int


def plan_batches(
    lengths: Sequence[int],
    batch_size: int,
    max_length: int,
    buckets: Sequence[int] | None = None,
    *,
    last: str = "full",
) -> list[Batch]:
    """Group examples of the given token lengths into fixed-shape batches, shortest bucket first.

    Args:
      lengths: tokens per example (after truncation, so each <= ``max_length``).
      batch_size: rows per batch.
      max_length: the longest bucket.
      buckets: the static lengths, ascending, the last >= every length (default :func:`bucket_lengths`).
      last: the rows of a bucket's last, partial batch: "full" (``batch_size``: one shape per bucket, for
        evaluation over a data set) or "pow2" (the next power of two, at most ``batch_size``: less padding for
        a few texts, e.g. one ``fill_mask`` call, at the price of a few more shapes).

    Raises:
      InputError: a length above the largest bucket, or a batch size below 1.
    """
    if batch_size < 1:
        raise InputError(f"batch_size must be >= 1, got {batch_size}")
    if last not in ("full", "pow2"):
        raise InputError(f"last must be 'full' or 'pow2', got {last!r}")
    sizes = np.asarray(list(lengths), np.int64)
    edges = np.asarray(tuple(buckets) if buckets is not None else bucket_lengths(max_length), np.int64)
    if sizes.size == 0:
        return []
    if np.any(np.diff(edges) <= 0):
        raise InputError(f"bucket lengths must be ascending, got {edges.tolist()}")
    if sizes.max() > edges[-1]:
        i = int(sizes.argmax())
        raise InputError(f"example {i} has {int(sizes[i])} tokens, more than the largest bucket {int(edges[-1])}")
    which = np.searchsorted(edges, sizes, side="left")  # the smallest bucket >= the length
    order = np.argsort(sizes, kind="stable")
    out = []
    for b in np.unique(which[order]):
        members = order[which[order] == b]
        for start in range(0, members.size, batch_size):
            chunk = members[start : start + batch_size]
            rows = batch_size if last == "full" else min(batch_size, 1 << (int(chunk.size) - 1).bit_length())
            padded = np.concatenate([chunk, np.full(rows - chunk.size, chunk[0], np.int64)])
            out.append(Batch(indices=padded, length=int(edges[b]), real=int(chunk.size)))
    return out


def pad_rows(rows: Sequence[Sequence[int]], batch: Batch, pad_value: int = 0) -> np.ndarray:
    """int32[batch_size, length]: ``rows[i]`` for the batch's indices, right-padded with ``pad_value``."""
    out = np.full((batch.indices.size, batch.length), pad_value, np.int32)
    for r, i in enumerate(batch.indices):
        seq = rows[int(i)]
        out[r, : len(seq)] = seq
    return out


def in_input_order(n: int, plan: Sequence[Batch], results: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Per input example (in input order), its row of the batch result it was computed in.

    Args:
      n: the number of inputs.
      plan: the batches, as :func:`plan_batches` returned them.
      results: per batch, an array whose leading axis is the batch's rows.

    Raises:
      InputError: some input has no result (the plan was made for other inputs).
    """
    out: list[np.ndarray | None] = [None] * n
    for batch, res in zip(plan, results):
        for r in range(batch.real):
            out[int(batch.indices[r])] = res[r]
    missing = [i for i, x in enumerate(out) if x is None]
    if missing:
        raise InputError(f"in_input_order: no result for inputs {missing[:8]} (a plan of other inputs?)")
    return out  # type: ignore[return-value]
