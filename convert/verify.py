"""Compare a flax-narrow model with the transformers PyTorch model on the same batch (needs torch)."""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from flax_narrow.errors import FlaxNarrowError

# Our class -> transformers class name, per HF model_type.
TORCH_CLASSES = {
    "bert": {
        "BertModel": "BertModel",
        "BertForMaskedLM": "BertForMaskedLM",
        "BertForSequenceClassification": "BertForSequenceClassification",
        "BertForMultipleChoice": "BertForMultipleChoice",
        "BertForTokenClassification": "BertForTokenClassification",
        "BertForQuestionAnswering": "BertForQuestionAnswering",
    },
    "roberta": {"BertModel": "RobertaModel", "BertForMaskedLM": "RobertaForMaskedLM"},
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


def verify_against_torch(
    model,
    checkpoint_dir: str | os.PathLike,
    batch: dict[str, np.ndarray] | None = None,
) -> Verification:
    """Run ``model`` and transformers' counterpart loaded from ``checkpoint_dir`` (an HF directory) in fp32.

    Compares the main output on non-padded positions and returns the max abs difference.
    """
    try:
        import torch
        import transformers
    except ImportError:
        raise FlaxNarrowError("verification needs torch: pip install 'flax-narrow[torch]'") from None
    cfg = model.config
    name = type(model).hf_architecture
    torch_name = TORCH_CLASSES.get("roberta" if cfg.model_type == "roberta" else "bert", {}).get(name)
    if torch_name is None or cfg.is_narrow:
        raise FlaxNarrowError(f"no transformers architecture to verify {name} ({cfg.model_type}) against")
    batch = batch or random_batch(cfg)
    if cfg.type_vocab_size <= 1:
        batch = {**batch, "token_type_ids": np.zeros_like(batch["input_ids"])}
    tmodel = getattr(transformers, torch_name).from_pretrained(os.fspath(checkpoint_dir), dtype=torch.float32)
    tmodel.eval()
    _retie_decoder(tmodel)
    with torch.no_grad():
        tout = tmodel(**{k: torch.from_numpy(v) for k, v in batch.items()})
    out = model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
    field = "last_hidden_state" if name == "BertModel" else ("start_logits" if "Question" in name else "logits")
    ref = getattr(tout, field).float().numpy()
    got = np.asarray(getattr(out, field), dtype=np.float32)
    if ref.ndim >= 2 and ref.shape[:2] == batch["attention_mask"].shape:
        keep = batch["attention_mask"].astype(bool)
        diff = np.abs(got - ref)[keep]
    else:
        diff = np.abs(got - ref)
    return Verification(field, float(diff.max()), tuple(ref.shape))


def _retie_decoder(tmodel) -> None:
    """Tie the PyTorch MLM decoder to the word embeddings, as flax-narrow always does.

    transformers 5 leaves the decoder untied when a checkpoint stores a copy that differs from the embeddings
    (``amazon/bort`` does: its conversion broke the tie); the faithful model is the tied one.
    """
    out = tmodel.get_output_embeddings() if hasattr(tmodel, "get_output_embeddings") else None
    if out is not None and getattr(tmodel.config, "tie_word_embeddings", True):
        out.weight = tmodel.get_input_embeddings().weight
