"""Declarative key maps between checkpoints and flax-narrow parameter paths.

A checkpoint key goes through three tables:

1. ``SOURCE_RENAMES`` — regex rewrites that bring every known layout to canonical HF BERT names
   (RoBERTa's ``roberta.``/``lm_head.``, the NarrowBERT port's ``narrow_bert.``, TF-era ``gamma``/``beta``);
   NarrowBERT's ``encoder_narrow.layer.{j}`` becomes ``encoder.layer.{F + j}``.
2. ``LEAF_RULES`` — a flax leaf name (``kernel``, ``scale``, ``embedding``, ``bias``) is the HF leaf
   (``weight``/``bias``) plus a transform (PyTorch Linear weights are (out, in): transpose).
3. ``IGNORED`` — buffers and tied copies that are dropped on load (``position_ids``, the MLM decoder copy).

Since module attribute names mirror transformers', the rest of the path is the same string on both sides.
:func:`plan_load` matches a checkpoint to a model's parameter tree strictly: every parameter filled (or
reported as a fresh head), every checkpoint key consumed, ignored, or reported; shapes checked.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable

import numpy as np

SOURCE_RENAMES: list[tuple[str, str]] = [
    (r"^roberta\.", "bert."),
    (r"^narrow_bert\.", "bert."),
    (r"^lm_head\.dense\.", "cls.predictions.transform.dense."),
    (r"^lm_head\.layer_norm\.", "cls.predictions.transform.LayerNorm."),
    (r"^lm_head\.bias$", "cls.predictions.bias"),
    (r"^lm_head\.decoder\.", "cls.predictions.decoder."),
    (r"\.LayerNorm\.gamma$", ".LayerNorm.weight"),
    (r"\.LayerNorm\.beta$", ".LayerNorm.bias"),
]
NARROW_LAYER = re.compile(r"(^|\.)encoder_narrow\.layer\.(\d+)\.")

# flax leaf -> (HF leaf, transform applied to the HF array to get the flax array)
LEAF_RULES: dict[str, tuple[str, str | None]] = {
    "kernel": ("weight", "transpose"),
    "scale": ("weight", None),
    "embedding": ("weight", None),
    "bias": ("bias", None),
}

IGNORED: list[str] = [
    r"(^|\.)position_ids$",
    r"(^|\.)embeddings\.token_type_ids$",
    r"^cls\.predictions\.decoder\.(weight|bias)$",  # tied to the word embeddings / cls.predictions.bias
]
# Keys of heads the target model may not have: dropped with a warning rather than an error.
OTHER_HEADS: list[str] = [r"^cls\.", r"^classifier\.", r"^qa_outputs\.", r"^(bert\.)?pooler\."]
# Target parameters that may be freshly initialised when absent from the checkpoint (heads, pooler).
FRESH_OK = re.compile(r"^(?!(bert\.)?(embeddings|encoder)\.)")

TRANSFORMS: dict[str | None, Callable[[np.ndarray], np.ndarray]] = {
    None: lambda a: a,
    "transpose": lambda a: np.ascontiguousarray(a.T),
}


def canonical_source_key(key: str, full_length_layers: int | None) -> str | None:
    """A checkpoint key in canonical HF BERT spelling (see ``SOURCE_RENAMES``); None for a NarrowBERT layer
    key when the model has no narrow layers (``full_length_layers`` None)."""
    for pattern, repl in SOURCE_RENAMES:
        key = re.sub(pattern, repl, key)
    m = NARROW_LAYER.search(key)
    if m:
        if full_length_layers is None:
            return None
        key = NARROW_LAYER.sub(lambda mm: f"{mm.group(1)}encoder.layer.{full_length_layers + int(mm.group(2))}.", key)
    return key


def hf_key_for(flax_path: str) -> tuple[str, str | None]:
    """The canonical HF key of a flax parameter path and the transform HF -> flax."""
    stem, _, leaf = flax_path.rpartition(".")
    hf_leaf, transform = LEAF_RULES[leaf]
    return f"{stem}.{hf_leaf}" if stem else hf_leaf, transform


def flax_to_hf_transform(transform: str | None) -> Callable[[np.ndarray], np.ndarray]:
    """Inverse of a LEAF_RULES transform (both are involutions today)."""
    return TRANSFORMS[transform]


@dataclasses.dataclass
class LoadPlan:
    """How each target parameter is filled. ``problems`` non-empty means the load must fail."""

    assignments: dict[str, tuple[str, str | None]]  # flax path -> (source key, transform)
    fresh: list[str]  # flax paths to keep freshly initialised (warned about)
    dropped_heads: list[str]  # source keys of heads the target lacks (warned about)
    ignored: list[str]  # buffers and tied copies
    missing: list[str]
    unexpected: list[str]
    mismatched: list[str]  # "key: checkpoint (a, b) vs model (c, d)"

    @property
    def problems(self) -> list[str]:
        out = []
        if self.missing:
            out.append(f"missing keys {self.missing}")
        if self.unexpected:
            out.append(f"unexpected keys {self.unexpected}")
        if self.mismatched:
            out.append(f"mis-shaped keys {self.mismatched}")
        return out


def plan_load(
    targets: dict[str, tuple[int, ...]],
    source_shapes: dict[str, tuple[int, ...]],
    *,
    source_format: str,
    full_length_layers: int | None = None,
    allow_fresh: bool = True,
) -> LoadPlan:
    """Match checkpoint keys to the model's parameters.

    Args:
      targets: flax path ('bert.encoder.layer.0.attention.self.query.kernel') -> shape, for the model to fill.
      source_shapes: checkpoint key -> shape.
      source_format: 'flax' (keys are the target's own paths already: a flax-narrow checkpoint, or a PyTorch
        model whose parameter names are the checkpoint's) or 'hf' (PyTorch state-dict names, renamed here).
      full_length_layers: F, to place NarrowBERT's ``encoder_narrow.layer.j`` at layer F + j.
      allow_fresh: let head/pooler parameters absent from the checkpoint stay freshly initialised.
    """
    canon: dict[str, str] = {}  # canonical key -> original key
    unexpected: list[str] = []
    for key in source_shapes:
        ck = key if source_format == "flax" else canonical_source_key(key, full_length_layers)
        if ck is None:
            unexpected.append(key)  # narrow layers in a checkpoint for a model without any
            continue
        canon[ck] = key

    target_prefixed = any(p.startswith("bert.") for p in targets)
    source_prefixed = any(k.startswith("bert.") for k in canon)
    if target_prefixed and not source_prefixed:  # a base checkpoint into a task model
        canon = {(k if _is_head_key(k) else f"bert.{k}"): v for k, v in canon.items()}
    elif source_prefixed and not target_prefixed:  # a task checkpoint into the base model
        canon = {(k[5:] if k.startswith("bert.") else k): v for k, v in canon.items()}

    assignments, fresh, missing, mismatched = {}, [], [], []
    used: set[str] = set()
    for path, shape in targets.items():
        if source_format == "flax":
            key, transform = path, None
        else:
            key, transform = hf_key_for(path)
            if key == "cls.predictions.bias" and key not in canon and "cls.predictions.decoder.bias" in canon:
                key = "cls.predictions.decoder.bias"
        if key not in canon:
            (fresh if allow_fresh and FRESH_OK.match(path) else missing).append(path)
            continue
        used.add(key)
        src_shape = tuple(source_shapes[canon[key]])
        expect = tuple(reversed(shape)) if transform == "transpose" else tuple(shape)
        if src_shape != expect:
            mismatched.append(f"{canon[key]}: checkpoint {src_shape} vs model {expect}")
            continue
        assignments[path] = (canon[key], transform)

    ignored, dropped = [], []
    target_stems = {p.rpartition(".")[0] for p in targets}
    for ck, orig in canon.items():
        if ck in used:
            continue
        if any(re.search(p, ck) for p in IGNORED):
            ignored.append(orig)
        elif any(re.search(p, ck) for p in OTHER_HEADS) and ck.rpartition(".")[0] not in target_stems:
            dropped.append(orig)
        else:
            unexpected.append(orig)
    return LoadPlan(
        assignments, sorted(fresh), sorted(dropped), sorted(ignored), sorted(missing), sorted(unexpected), mismatched
    )


def _is_head_key(key: str) -> bool:
    return any(re.search(p, key) for p in OTHER_HEADS if "pooler" not in p)


def guess_head(keys: list[str]) -> str:
    """The head a checkpoint without an architecture name holds, from its keys ('mlm', 'base', ...)."""

    def has(pattern: str) -> bool:
        return any(re.search(pattern, k) for k in keys)

    if has(r"(^|\.)(cls\.predictions|lm_head)\."):
        return "mlm"
    if has(r"^qa_outputs\."):
        return "question-answering"
    if has(r"^classifier\."):
        return "sequence-classification" if has(r"pooler\.dense\.") else "token-classification"
    return "base"
