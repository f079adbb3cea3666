"""A PyTorch NarrowBERT (SparseQueries), written from the paper's description (SPEC-narrowbert.md) and
independent of flax-narrow's JAX code.

transformers has no NarrowBERT, so this is the PyTorch model that
:func:`flax_narrow.convert.verify.verify_against_torch` (and ``flax-narrow convert/export --verify``) compares
flax-narrow's NarrowBERT with, and the one to use for your own PyTorch comparisons::

    from .torch_narrowbert import load_torch_narrowbert
    ref = load_torch_narrowbert("path/to/narrowbert-hf")            # authors' or port layout, or a hub id
    logits, _ = ref(input_ids, attention_mask, token_type_ids, narrow_mask=mask)   # (B, K, V): masked rows

Parameter names follow the authors' state dict (``bert.encoder.layer.{i}`` for the F full layers,
``bert.encoder_narrow.layer.{j}`` for the narrow ones), so ``state_dict()`` *is* the authors' layout. Selected
rows are zero-padded to the largest count in the batch, exactly as the authors' ``pad_sequence`` does, so a
row-selecting output is (B, K, ...) with K = the largest number of selected positions in a row.

Weights are read with flax-narrow's readers: safetensors, or ``torch.load(weights_only=True)`` for
``pytorch_model.bin`` (a pickle carrying code is refused, never executed).

Needs torch (``pip install 'flax-narrow[torch]'``); ``import flax_narrow`` never imports this module.
"""

from __future__ import annotations

import math
import os
import re
from typing import Any

import numpy as np

try:
    import torch
    from torch import nn
    from torch.nn.utils.rnn import pad_sequence
except ImportError as e:  # pragma: no cover - exercised only without torch
    raise ImportError("flax_narrow.convert.torch_narrowbert needs torch: pip install 'flax-narrow[torch]'") from e

from flax_narrow.config import EncoderConfig
from flax_narrow.errors import CheckpointError, ConfigError
from flax_narrow.modeling import ARCHITECTURES, architecture_for, architecture_named

from . import keymap, sources

IGNORE_INDEX = -100

_ACTIVATIONS = {
    "gelu": lambda x: nn.functional.gelu(x),  # the exact erf form, as BERT and NarrowBERT use
    "gelu_new": lambda x: nn.functional.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: nn.functional.gelu(x, approximate="tanh"),
    "relu": nn.functional.relu,
    "silu": nn.functional.silu,
}


def as_config(config: EncoderConfig | dict | str | os.PathLike) -> EncoderConfig:
    """An EncoderConfig from itself, a config.json dict (the authors' or the port's), or a config.json path."""
    cfg = config if isinstance(config, EncoderConfig) else EncoderConfig.from_hf_config(config)
    if cfg.position_offset != 0 or cfg.model_type == "roberta":
        raise ConfigError("the PyTorch NarrowBERT has BERT's absolute positions from 0; RoBERTa-style configs differ")
    return cfg


def _dict(**kw) -> nn.ModuleDict:
    return nn.ModuleDict(kw)


def _layer(h: int, f: int, eps: float) -> nn.ModuleDict:
    return _dict(
        attention=_dict(
            self=_dict(query=nn.Linear(h, h), key=nn.Linear(h, h), value=nn.Linear(h, h)),
            output=_dict(dense=nn.Linear(h, h), LayerNorm=nn.LayerNorm(h, eps=eps)),
        ),
        intermediate=_dict(dense=nn.Linear(h, f)),
        output=_dict(dense=nn.Linear(f, h), LayerNorm=nn.LayerNorm(h, eps=eps)),
    )


def _pack(x: torch.Tensor, mask: torch.Tensor, padding_value: float = 0.0) -> torch.Tensor:
    """x[b][mask[b]] for each row, padded to the largest count (the authors' ``pad_sequence``)."""
    return pad_sequence([x[i][mask[i]] for i in range(len(x))], batch_first=True, padding_value=padding_value)


class TorchNarrowBertModel(nn.Module):
    """Embeddings, F full layers, N - F narrow layers over the selected rows, optional pooler (row 0)."""

    def __init__(self, config: EncoderConfig | dict, pooler: bool = True):
        super().__init__()
        cfg = self.config = as_config(config)
        h, f, eps = cfg.hidden_size, cfg.intermediate_size, cfg.layer_norm_eps
        self.act = _ACTIVATIONS[cfg.hidden_act]
        emb = dict(
            word_embeddings=nn.Embedding(cfg.vocab_size, h),
            position_embeddings=nn.Embedding(cfg.max_position_embeddings, h),
        )
        if cfg.type_vocab_size > 0:
            emb["token_type_embeddings"] = nn.Embedding(cfg.type_vocab_size, h)
        self.embeddings = _dict(**emb, LayerNorm=nn.LayerNorm(h, eps=eps))
        self.embeddings.register_buffer("position_ids", torch.arange(cfg.max_position_embeddings)[None])
        full = cfg.num_full_layers
        self.encoder = _dict(layer=nn.ModuleList([_layer(h, f, eps) for _ in range(full)]))
        self.encoder_narrow = _dict(layer=nn.ModuleList([_layer(h, f, eps) for _ in range(cfg.num_narrow_layers)]))
        self.pooler = _dict(dense=nn.Linear(h, h)) if pooler else None

    def _attend(self, layer, x_q, x_kv, add_mask):
        n = self.config.num_attention_heads
        b, t, h = x_q.shape
        d = h // n
        sa = layer["attention"]["self"]

        def heads(x):
            return x.view(x.shape[0], x.shape[1], n, d).transpose(1, 2)

        q, k, v = heads(sa["query"](x_q)), heads(sa["key"](x_kv)), heads(sa["value"](x_kv))
        scores = q @ k.transpose(-1, -2) / math.sqrt(d) + add_mask  # (B, n, T, S)
        ctx = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, t, h)
        out = layer["attention"]["output"]
        x = out["LayerNorm"](out["dense"](ctx) + x_q)
        ffn = self.act(layer["intermediate"]["dense"](x))
        return layer["output"]["LayerNorm"](layer["output"]["dense"](ffn) + x)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, narrow_mask=None):
        """narrow_mask: bool (B, L), None for every position. Returns (sequence_output (B, K, H), pooled or None)."""
        e = self.embeddings
        length = input_ids.shape[1]
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if narrow_mask is None:
            narrow_mask = torch.ones(input_ids.shape, dtype=torch.bool)
        x = e["word_embeddings"](input_ids) + e["position_embeddings"](e.position_ids[:, :length])
        if "token_type_embeddings" in e:
            types = torch.zeros_like(input_ids) if token_type_ids is None else token_type_ids
            x = x + e["token_type_embeddings"](types)
        x = e["LayerNorm"](x)
        add_mask = (1.0 - attention_mask[:, None, None, :].float()) * -10000.0
        for layer in self.encoder["layer"]:
            x = self._attend(layer, x, x, add_mask)
        context = x  # frozen: keys/values of every narrow layer
        z = _pack(context, narrow_mask.bool())
        for layer in self.encoder_narrow["layer"]:
            z = self._attend(layer, z, context, add_mask)
        pooled = torch.tanh(self.pooler["dense"](z[:, 0])) if self.pooler is not None else None
        return z, pooled


def _rows(labels, narrow_mask):
    """The authors' rule: without an explicit mask, the narrow rows are where labels != -100."""
    if narrow_mask is not None:
        return narrow_mask.bool()
    return None if labels is None else labels != IGNORE_INDEX


class TorchNarrowBertForMaskedLM(nn.Module):
    def __init__(self, config: EncoderConfig | dict):
        super().__init__()
        cfg = as_config(config)
        h = cfg.hidden_size
        self.bert = TorchNarrowBertModel(cfg, pooler=False)
        self.cls = _dict(
            predictions=_dict(
                transform=_dict(dense=nn.Linear(h, h), LayerNorm=nn.LayerNorm(h, eps=cfg.head_layer_norm_eps))
            )
        )
        self.cls["predictions"].bias = nn.Parameter(torch.zeros(cfg.vocab_size))

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, labels=None, narrow_mask=None):
        """Logits (B, K, V) at the rows of ``narrow_mask`` (or labels != -100; every row if neither) and the loss."""
        narrow = _rows(labels, narrow_mask)
        z, _ = self.bert(input_ids, attention_mask, token_type_ids, narrow)
        t = self.cls["predictions"]["transform"]
        hcur = t["LayerNorm"](self.bert.act(t["dense"](z)))
        logits = hcur @ self.bert.embeddings["word_embeddings"].weight.T + self.cls["predictions"].bias
        loss = None
        if labels is not None:
            packed = _pack(labels, narrow if narrow is not None else torch.ones_like(labels, dtype=torch.bool), -100)
            loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), packed.reshape(-1))
        return logits, loss


class TorchNarrowBertForSequenceClassification(nn.Module):
    """Narrow layers on the CLS row only; pooler -> classifier. Returns logits (B, labels)."""

    def __init__(self, config: EncoderConfig | dict, num_labels: int | None = None):
        super().__init__()
        cfg = as_config(config)
        self.bert = TorchNarrowBertModel(cfg)
        self.classifier = nn.Linear(cfg.hidden_size, cfg.num_labels if num_labels is None else num_labels)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None):
        cls_only = torch.zeros(input_ids.shape, dtype=torch.bool)
        cls_only[:, 0] = True
        _, pooled = self.bert(input_ids, attention_mask, token_type_ids, cls_only)
        return self.classifier(pooled)


class TorchNarrowBertForMultipleChoice(TorchNarrowBertForSequenceClassification):
    """The port's head: (B, C, L) -> (B*C, L); CLS of each; Linear(H, 1) -> (B, C)."""

    def __init__(self, config: EncoderConfig | dict):
        super().__init__(config, 1)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None):
        b, c, length = input_ids.shape
        flat = [None if t is None else t.reshape(b * c, length) for t in (input_ids, attention_mask, token_type_ids)]
        return super().forward(*flat).reshape(b, c)


class TorchNarrowBertForTokenClassification(nn.Module):
    """Logits (B, K, labels) at the rows of ``narrow_mask`` (or labels != -100; every row if neither)."""

    def __init__(self, config: EncoderConfig | dict, num_labels: int | None = None):
        super().__init__()
        cfg = as_config(config)
        self.bert = TorchNarrowBertModel(cfg, pooler=False)
        self.classifier = nn.Linear(cfg.hidden_size, cfg.num_labels if num_labels is None else num_labels)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, labels=None, narrow_mask=None):
        z, _ = self.bert(input_ids, attention_mask, token_type_ids, _rows(labels, narrow_mask))
        return self.classifier(z)


# Our NarrowBERT architecture name -> its PyTorch class, from the one table (its ``torch`` column).
TORCH_NARROWBERT_CLASSES: dict[str, type[nn.Module]] = {
    a.name: globals()[a.torch] for a in ARCHITECTURES if a.family == "narrow"
}

# The checkpoint spellings this model's own names differ from (independent of convert.keymap's renames, so
# that --verify checks the key map rather than repeating it).
_RENAMES = [
    (r"^narrow_bert\.", "bert."),
    (r"\.LayerNorm\.gamma$", ".LayerNorm.weight"),
    (r"\.LayerNorm\.beta$", ".LayerNorm.bias"),
]


def load_torch_narrowbert(
    path_or_hub_id: str | os.PathLike,
    architecture: str | None = None,
    *,
    config: EncoderConfig | dict | str | os.PathLike | None = None,
    revision: str | None = None,
) -> nn.Module:
    """Build the PyTorch NarrowBERT of an HF-layout checkpoint and fill it, strictly, in fp32 (eval mode).

    The checkpoint's keys are renamed by this module's own table (``narrow_bert.`` -> ``bert.``, TF-era
    ``gamma``/``beta``) and matched to the PyTorch model's parameter names by
    :func:`flax_narrow.convert.keymap.plan_load`, the strict matcher ``from_pretrained`` uses: every parameter
    filled, every key consumed, ignored (``position_ids``, tied decoder copies) or a head the model lacks.

    Args:
      path_or_hub_id: a checkpoint directory (or weights file, or hub id) in the authors' layout
        (``bert.encoder_narrow.*``, ``full_length_layers`` in config.json) or the port's (``narrow_bert.*``,
        ``num_narrow_layers``); ``model.safetensors``, sharded, or ``pytorch_model.bin`` (``weights_only=True``).
      architecture: ``NarrowBertForMaskedLM``, ``BertModel``... (any name of a head with a PyTorch NarrowBERT);
        default: config.json's ``architectures``, else guessed from the keys.
      config: use this config instead of the checkpoint's config.json.

    Raises:
      CheckpointError: not an HF-layout checkpoint, or missing / unexpected / mis-shaped weights (all named).
      ConfigError: an architecture without a PyTorch NarrowBERT class.
    """
    opened = sources.open_source(os.fspath(path_or_hub_id), config=config, revision=revision)
    try:
        if opened.kind not in ("safetensors", "pytorch"):
            raise CheckpointError(
                f"{opened.path}: the PyTorch NarrowBERT reads HF-layout checkpoints, not {opened.kind}; "
                "`flax-narrow export` one first"
            )
        cfg = as_config(opened.config)
        src = opened.source
        keys = src.keys()
        name = architecture or opened.architecture
        named = architecture_named(name) if name else None
        head = named.head if named else keymap.guess_head(keys) if name is None else None
        row = architecture_for(head, narrow=True) if head else None
        if row is None or row.family != "narrow":
            have = ", ".join(TORCH_NARROWBERT_CLASSES)
            raise ConfigError(f"no PyTorch NarrowBERT for {name or head!r} (have {have})")
        canon: dict[str, str] = {}
        for key in keys:
            ck = key
            for pattern, repl in _RENAMES:
                ck = re.sub(pattern, repl, ck)
            canon[ck] = key
        if "cls.predictions.bias" not in canon and "cls.predictions.decoder.bias" in canon:
            canon["cls.predictions.bias"] = canon.pop("cls.predictions.decoder.bias")
        cls = TORCH_NARROWBERT_CLASSES[row.name]
        if row.head == "base":
            pooler = any(re.match(r"^(bert\.)?pooler\.", k) for k in canon)
            model: nn.Module = TorchNarrowBertModel(cfg, pooler=pooler)
        elif row.head in ("sequence-classification", "token-classification") and "classifier.weight" in canon:
            model = cls(cfg, num_labels=src.shape(canon["classifier.weight"])[0])
        else:
            model = cls(cfg)
        params = {k: tuple(p.shape) for k, p in model.named_parameters()}
        plan = keymap.plan_load(
            params, {ck: tuple(src.shape(k)) for ck, k in canon.items()}, source_format="flax", allow_fresh=False
        )
        if plan.problems:
            raise CheckpointError(
                f"{opened.path}: cannot load into the PyTorch {type(model).__name__}: " + "; ".join(plan.problems)
            )
        state = {
            name: torch.from_numpy(np.array(src.get(canon[ck]), dtype=np.float32))
            for name, (ck, _) in plan.assignments.items()
        }
        model.load_state_dict(state, strict=False)  # buffers (position_ids) keep their values
    finally:
        opened.close()
    return model.eval()


def run_narrow(model: nn.Module, batch: dict[str, Any], narrow_mask: np.ndarray | None = None) -> np.ndarray:
    """The main output of a PyTorch NarrowBERT on a numpy batch, as a numpy array (no gradients).

    Row-selecting models (base, MLM, token classification) compute the rows of ``narrow_mask`` (every row if
    None) and return (B, K, ...), K = the largest count in a row; the others return (B, labels) / (B, C).
    """
    t = {k: torch.from_numpy(np.asarray(v, np.int64)) for k, v in batch.items() if v is not None}
    with torch.no_grad():
        if isinstance(model, (TorchNarrowBertModel, TorchNarrowBertForMaskedLM, TorchNarrowBertForTokenClassification)):
            mask = None if narrow_mask is None else torch.from_numpy(np.asarray(narrow_mask, bool))
            out = model(t["input_ids"], t.get("attention_mask"), t.get("token_type_ids"), narrow_mask=mask)
        else:
            out = model(t["input_ids"], t.get("attention_mask"), t.get("token_type_ids"))
    return (out[0] if isinstance(out, tuple) else out).float().numpy()
