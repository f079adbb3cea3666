"""Test helpers around the PyTorch NarrowBERT, which lives in the library
(``flax_narrow.convert.torch_narrowbert``, written from SPEC-narrowbert.md, independent of the JAX code).

The ``Ref*`` names are the library classes; ``randomize`` and the two checkpoint writers stay test-only: they
write what the authors' code (transformers 4.28) and the later port save, so the converter and the PyTorch
loader are tested on files made without either.
"""

from __future__ import annotations

import json
import os

import torch
from safetensors.torch import save_file
from torch import nn

from flax_narrow.convert import torch_narrowbert as _torch_narrowbert

RefNarrowBert = _torch_narrowbert.TorchNarrowBertModel
RefForMaskedLM = _torch_narrowbert.TorchNarrowBertForMaskedLM
RefForSequenceClassification = _torch_narrowbert.TorchNarrowBertForSequenceClassification
RefForMultipleChoice = _torch_narrowbert.TorchNarrowBertForMultipleChoice
RefForTokenClassification = _torch_narrowbert.TorchNarrowBertForTokenClassification

# The tiny NarrowBERT (2 full + 2 narrow layers) the parity, export and PyTorch-loader tests share.
TINY_NARROW = dict(
    vocab_size=97,
    hidden_size=32,
    num_hidden_layers=4,
    full_length_layers=2,
    num_attention_heads=4,
    intermediate_size=37,
    max_position_embeddings=40,
    type_vocab_size=2,
    layer_norm_eps=1e-12,
)

__all__ = [
    "TINY_NARROW",
    "RefNarrowBert",
    "RefForMaskedLM",
    "RefForSequenceClassification",
    "RefForMultipleChoice",
    "RefForTokenClassification",
    "randomize",
    "save_authors_checkpoint",
    "save_port_checkpoint",
]


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
