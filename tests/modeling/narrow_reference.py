"""A PyTorch NarrowBERT (SparseQueries) written from SPEC-narrowbert.md, independent of flax-narrow.

Parameter names follow the authors' state dict (``bert.encoder.layer.{i}`` for the F full layers,
``bert.encoder_narrow.layer.{j}`` for the narrow ones), so ``state_dict()`` *is* the authors' layout. Selected
rows are padded with zeros to the largest count in the batch, exactly as the authors' ``pad_sequence`` does.
"""

from __future__ import annotations

import json
import math
import os

import torch
from safetensors.torch import save_file
from torch import nn
from torch.nn.utils.rnn import pad_sequence


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


class RefNarrowBert(nn.Module):
    """The base model: embeddings, F full layers, N-F narrow layers, optional pooler."""

    def __init__(self, cfg: dict, pooler: bool = True):
        super().__init__()
        h, f, eps = cfg["hidden_size"], cfg["intermediate_size"], cfg["layer_norm_eps"]
        self.cfg = cfg
        self.embeddings = _dict(
            word_embeddings=nn.Embedding(cfg["vocab_size"], h),
            position_embeddings=nn.Embedding(cfg["max_position_embeddings"], h),
            token_type_embeddings=nn.Embedding(cfg["type_vocab_size"], h),
            LayerNorm=nn.LayerNorm(h, eps=eps),
        )
        self.embeddings.register_buffer("position_ids", torch.arange(cfg["max_position_embeddings"])[None])
        full = cfg["full_length_layers"]
        self.encoder = _dict(layer=nn.ModuleList([_layer(h, f, eps) for _ in range(full)]))
        self.encoder_narrow = _dict(
            layer=nn.ModuleList([_layer(h, f, eps) for _ in range(cfg["num_hidden_layers"] - full)])
        )
        self.pooler = _dict(dense=nn.Linear(h, h)) if pooler else None

    def _attend(self, layer, x_q, x_kv, add_mask):
        n = self.cfg["num_attention_heads"]
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
        ffn = nn.functional.gelu(layer["intermediate"]["dense"](x))  # exact erf GELU
        return layer["output"]["LayerNorm"](layer["output"]["dense"](ffn) + x)

    def forward(self, input_ids, attention_mask, token_type_ids, narrow_mask):
        """narrow_mask: bool (B, L). Returns (sequence_output (B, K, H), pooled (B, H) or None)."""
        e = self.embeddings
        length = input_ids.shape[1]
        x = e["word_embeddings"](input_ids) + e["position_embeddings"](e.position_ids[:, :length])
        x = e["LayerNorm"](x + e["token_type_embeddings"](token_type_ids))
        add_mask = (1.0 - attention_mask[:, None, None, :].float()) * -10000.0
        for layer in self.encoder["layer"]:
            x = self._attend(layer, x, x, add_mask)
        context = x  # frozen: keys/values of every narrow layer
        z = pad_sequence([context[i][narrow_mask[i]] for i in range(len(context))], batch_first=True)
        for layer in self.encoder_narrow["layer"]:
            z = self._attend(layer, z, context, add_mask)
        pooled = torch.tanh(self.pooler["dense"](z[:, 0])) if self.pooler is not None else None
        return z, pooled


class RefForMaskedLM(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        h = cfg["hidden_size"]
        self.bert = RefNarrowBert(cfg, pooler=False)
        self.cls = _dict(
            predictions=_dict(
                transform=_dict(dense=nn.Linear(h, h), LayerNorm=nn.LayerNorm(h, eps=cfg["layer_norm_eps"]))
            )
        )
        self.cls["predictions"].bias = nn.Parameter(torch.zeros(cfg["vocab_size"]))

    def forward(self, input_ids, attention_mask, token_type_ids, labels):
        """The authors' rule: the narrow rows are where labels != -100. Returns (logits (B, K, V), loss)."""
        narrow = labels > -100
        z, _ = self.bert(input_ids, attention_mask, token_type_ids, narrow)
        t = self.cls["predictions"]["transform"]
        hcur = t["LayerNorm"](nn.functional.gelu(t["dense"](z)))
        logits = hcur @ self.bert.embeddings["word_embeddings"].weight.T + self.cls["predictions"].bias
        packed = pad_sequence([labels[i][narrow[i]] for i in range(len(labels))], batch_first=True, padding_value=-100)
        loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), packed.reshape(-1))
        return logits, loss


class RefForSequenceClassification(nn.Module):
    def __init__(self, cfg, num_labels: int):
        super().__init__()
        self.bert = RefNarrowBert(cfg)
        self.classifier = nn.Linear(cfg["hidden_size"], num_labels)

    def forward(self, input_ids, attention_mask, token_type_ids):
        cls_only = torch.zeros(input_ids.shape, dtype=torch.bool)
        cls_only[:, 0] = True
        _, pooled = self.bert(input_ids, attention_mask, token_type_ids, cls_only)
        return self.classifier(pooled)


class RefForMultipleChoice(RefForSequenceClassification):
    """The port's head: (B, C, L) -> (B*C, L); CLS of each; Linear(H, 1) -> (B, C)."""

    def __init__(self, cfg):
        super().__init__(cfg, 1)

    def forward(self, input_ids, attention_mask, token_type_ids):
        b, c, length = input_ids.shape
        flat = [t.reshape(b * c, length) for t in (input_ids, attention_mask, token_type_ids)]
        return super().forward(*flat).reshape(b, c)


class RefForTokenClassification(nn.Module):
    def __init__(self, cfg, num_labels: int):
        super().__init__()
        self.bert = RefNarrowBert(cfg, pooler=False)
        self.classifier = nn.Linear(cfg["hidden_size"], num_labels)

    def forward(self, input_ids, attention_mask, token_type_ids, labels):
        z, _ = self.bert(input_ids, attention_mask, token_type_ids, labels > -100)
        return self.classifier(z)


def randomize(module: nn.Module, seed: int) -> nn.Module:
    """Every parameter random (LayerNorm scales around 1), so that no mapping mistake can hide."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g) * 0.2
            p.copy_(1.0 + noise if name.endswith("LayerNorm.weight") else noise)
    return module.eval()


def save_authors_checkpoint(model: nn.Module, directory, cfg: dict, architecture: str, num_labels: int = 2) -> str:
    """What transformers 4.28 ``save_pretrained`` writes for the authors' classes: ``pytorch_model.bin`` (with
    the ``position_ids`` buffer and the tied decoder copies) and config.json with ``model_type: "bert"``."""
    os.makedirs(directory, exist_ok=True)
    sd = dict(model.state_dict())
    if "cls.predictions.bias" in sd:
        sd["cls.predictions.decoder.weight"] = sd["bert.embeddings.word_embeddings.weight"]
        sd["cls.predictions.decoder.bias"] = sd["cls.predictions.bias"]
    torch.save(sd, os.path.join(directory, "pytorch_model.bin"))
    config = {
        "_name_or_path": "narrowbert",
        "architectures": [architecture],
        "attention_probs_dropout_prob": 0.1,
        "classifier_dropout": None,
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.1,
        "id2label": {str(i): f"LABEL_{i}" for i in range(num_labels)},
        "label2id": {f"LABEL_{i}": i for i in range(num_labels)},
        "model_type": "bert",
        "pad_token_id": 0,
        "position_embedding_type": "absolute",
        "torch_dtype": "float32",
        "transformers_version": "4.28.1",
        "use_cache": True,
        **cfg,
    }
    with open(os.path.join(directory, "config.json"), "w") as fh:
        json.dump(config, fh, indent=2)
    return str(directory)


def save_port_checkpoint(model: nn.Module, directory, cfg: dict, architecture: str, num_labels: int = 2) -> str:
    """The later transformers port: prefix ``narrow_bert.``, ``model_type: "narrow_bert"``,
    ``num_narrow_layers``, safetensors without tied copies or buffers."""
    os.makedirs(directory, exist_ok=True)
    sd = {
        (("narrow_bert." + k[5:]) if k.startswith("bert.") else k): v.contiguous()
        for k, v in model.state_dict().items()
        if not k.endswith("position_ids")
    }
    save_file(sd, os.path.join(directory, "model.safetensors"))
    config = {k: v for k, v in cfg.items() if k != "full_length_layers"}
    config.update(
        model_type="narrow_bert",
        architectures=[architecture],
        num_narrow_layers=cfg["num_hidden_layers"] - cfg["full_length_layers"],
        id2label={str(i): f"LABEL_{i}" for i in range(num_labels)},
        pad_token_id=0,
    )
    with open(os.path.join(directory, "config.json"), "w") as fh:
        json.dump(config, fh, indent=2)
    return str(directory)
