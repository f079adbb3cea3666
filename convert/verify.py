"""Compare a flax-narrow model with its PyTorch counterpart on the same batch (needs torch).

BERT, BORT and RoBERTa-shaped models are compared with transformers' classes; NarrowBERT (which transformers
lacks) with the PyTorch NarrowBERT of :mod:`flax_narrow.convert.torch_narrowbert`, on the selected rows.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from flax_narrow.errors import FlaxNarrowError, NoTorchReference
from flax_narrow.modeling import ARCHITECTURES, architecture_for, architecture_of

# Our class -> transformers class name, per HF model_type (NarrowBERT: convert.torch_narrowbert's classes).
TORCH_CLASSES = {
    "bert": {a.name: a.torch for a in ARCHITECTURES if a.family == "bert"},
    "roberta": {a.name: a.torch_roberta for a in ARCHITECTURES if a.family == "bert" and a.torch_roberta},
}


@dataclasses.dataclass
class Verification:
    output: str  # which output was compared
    max_abs_diff: float
    shape: tuple[int, ...]


def random_batch(config, batch: int = 2, length: int = 16, seed: int = 0) -> dict[str, np.ndarray]:
    """A padded batch: row 0 full, others padded at the end; token types split each row in two."""
    rng = np.random.default_rng(seed)
    low = min(5, config.vocab_size - 1)
    ids = rng.integers(low, config.vocab_size, size=(batch, length)).astype(np.int64)
    ids = np.where(ids == config.pad_token_id, low, ids)
    mask = np.ones((batch, length), np.int64)
    for b in range(1, batch):
        mask[b, length - (b * length) // (2 * batch) - 1 :] = 0
    ids = np.where(mask == 1, ids, config.pad_token_id)
    types = np.zeros_like(ids)
    if config.type_vocab_size > 1:
        types[:, length // 2 :] = 1
        types = types * mask
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}


def random_narrow_mask(attention_mask: np.ndarray, fraction: float = 0.3, seed: int = 0) -> np.ndarray:
    """Rows for a NarrowBERT to compute: about ``fraction`` of each row's real tokens (at least one, never
    padding), so that rows select different counts and the static-P padding is exercised."""
    rng = np.random.default_rng(seed)
    real = np.asarray(attention_mask).astype(bool)
    sel = (rng.random(real.shape) < fraction) & real
    empty = np.flatnonzero(~sel.any(axis=1) & real.any(axis=1))
    sel[empty, real[empty].argmax(axis=1)] = True
    sel[~real.any(axis=1), 0] = True  # an all-padding row: its first position, as every row needs one
    return sel


def verify_against_torch(
    model,
    checkpoint_dir: str | os.PathLike,
    batch: dict[str, np.ndarray] | None = None,
    *,
    narrow_mask: np.ndarray | None = None,
) -> Verification:
    """Run ``model`` and its PyTorch counterpart loaded from ``checkpoint_dir`` (an HF directory) in fp32.

    Compares the main output on non-padded positions and returns the max abs difference. NarrowBERT is
    compared with :mod:`flax_narrow.convert.torch_narrowbert` on the rows of ``narrow_mask`` (bool (B, L);
    default :func:`random_narrow_mask`) for the base, MLM and token-classification models, and on the CLS
    row for sequence classification and multiple choice. Multiple-choice models given a (B, L) batch run it
    as two choices per example (the rows, and the rows reversed).
    """
    try:
        import torch
        import transformers
    except ImportError:
        raise FlaxNarrowError("verification needs torch: pip install 'flax-narrow[torch]'") from None
    cfg = model.config
    name = type(model).hf_architecture
    batch = dict(batch or random_batch(cfg))
    if "attention_mask" not in batch:
        batch["attention_mask"] = np.ones_like(batch["input_ids"])
    if cfg.type_vocab_size <= 1 or "token_type_ids" not in batch:
        batch["token_type_ids"] = np.zeros_like(batch["input_ids"])
    if architecture_of(type(model)).head == "multiple-choice" and np.ndim(batch["input_ids"]) == 2:
        batch = {k: np.stack([v, v[::-1]], axis=1) for k, v in batch.items()}
    if cfg.is_narrow:
        return _verify_narrow(model, checkpoint_dir, batch, narrow_mask)
    torch_name = TORCH_CLASSES.get("roberta" if cfg.model_type == "roberta" else "bert", {}).get(name)
    if torch_name is None:
        raise NoTorchReference(f"no transformers architecture to verify {name} ({cfg.model_type}) against")
    tmodel = getattr(transformers, torch_name).from_pretrained(os.fspath(checkpoint_dir), dtype=torch.float32)
    tmodel.eval()
    _retie_decoder(tmodel)
    with torch.no_grad():
        tout = tmodel(**{k: torch.from_numpy(v) for k, v in batch.items()})
    out = model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
    head = architecture_of(type(model)).head
    field = {"base": "last_hidden_state", "question-answering": "start_logits"}.get(head, "logits")
    ref = getattr(tout, field).float().numpy()
    got = np.asarray(getattr(out, field), dtype=np.float32)
    if ref.ndim >= 2 and ref.shape[:2] == batch["attention_mask"].shape:
        keep = batch["attention_mask"].astype(bool)
        diff = np.abs(got - ref)[keep]
    else:
        diff = np.abs(got - ref)
    return Verification(field, float(diff.max()), tuple(ref.shape))


def _verify_narrow(model, checkpoint_dir, batch: dict[str, np.ndarray], narrow_mask) -> Verification:
    """NarrowBERT against the PyTorch NarrowBERT: logits (hidden states for the base model) on the rows."""
    from flax_narrow.ops import positions_from_mask

    from .torch_narrowbert import load_torch_narrowbert, run_narrow

    head = architecture_of(type(model)).head
    row = architecture_for(head, narrow=True)  # BertForMaskedLM on a narrow config: NarrowBertForMaskedLM's row
    if row.family != "narrow":
        raise NoTorchReference(f"no PyTorch NarrowBERT architecture to verify {type(model).hf_architecture} against")
    tmodel = load_torch_narrowbert(checkpoint_dir, row.name)
    field = "last_hidden_state" if head == "base" else "logits"
    args = (batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
    if head in ("sequence-classification", "multiple-choice"):  # the CLS row of each sequence
        ref = run_narrow(tmodel, batch)
        got = np.asarray(getattr(model(*args), field), np.float32)
        return Verification(field, float(np.abs(got - ref).max()), tuple(ref.shape))
    sel = random_narrow_mask(batch["attention_mask"]) if narrow_mask is None else np.asarray(narrow_mask, bool)
    ref = run_narrow(tmodel, batch, sel)  # (B, K, ...): K = the largest count, rows in ascending order
    positions, valid = positions_from_mask(sel)
    got = np.asarray(getattr(model(*args, narrow_positions=positions, narrow_valid=valid), field), np.float32)
    diff = np.abs(got - ref)[np.asarray(valid)]  # P = K: both padded to the largest count
    return Verification(field, float(diff.max()), tuple(ref.shape))


def _retie_decoder(tmodel) -> None:
    """Tie the PyTorch MLM decoder to the word embeddings, as flax-narrow always does.

    transformers 5 leaves the decoder untied when a checkpoint stores a copy that differs from the embeddings
    (``amazon/bort`` does: its conversion broke the tie); the faithful model is the tied one.
    """
    out = tmodel.get_output_embeddings() if hasattr(tmodel, "get_output_embeddings") else None
    if out is not None and getattr(tmodel.config, "tie_word_embeddings", True):
        out.weight = tmodel.get_input_embeddings().weight
