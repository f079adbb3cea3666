"""The model configuration: one frozen dataclass for BERT, RoBERTa-shaped models, BORT and NarrowBERT.

The difference between the four families is configuration, not code:

* BERT: ``position_offset=0``, token types, pooler, ``full_length_layers=None`` (every layer full length).
* RoBERTa: positions start at ``pad_token_id + 1`` and padding tokens get position ``pad_token_id``.
* BORT: BERT layout with hidden 1024, FFN 768, 4 layers, LayerNorm eps 1e-5 (see ``EncoderConfig.bort``).
* NarrowBERT: ``full_length_layers=F`` < ``num_hidden_layers`` (layers >= F only update selected rows).

Example:
    >>> cfg = EncoderConfig.bort()
    >>> cfg.head_dim
    128
    >>> EncoderConfig.from_hf_config(cfg.to_hf_config()) == cfg.replace(mlm_head_layer_norm_eps=None)
    True
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import numpy as np

from flax_narrow.errors import ConfigError

ACTIVATIONS = ("gelu", "gelu_new", "gelu_pytorch_tanh", "relu", "silu")
ATTENTION_IMPLS = ("xla", "cudnn")
MODEL_TYPES = ("bert", "roberta", "narrow_bert")
NARROW_ATTENTION = ("auto", "standard", "absorbed")
FUSED_DROPOUT_NORM = ("off", "jnp", "pallas", "pallas_interpret")
REMAT = ("none", "full", "dots", "dots_no_batch")
PROBLEM_TYPES = (None, "regression", "single_label_classification", "multi_label_classification")


# The sizes that must be positive ints, and with them the fields that fix the parameter tree: two configs that
# agree on SHAPE_FIELDS can exchange weights (resume, init_from, inspect's summary line).
SIZE_FIELDS = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "max_position_embeddings",
)
SHAPE_FIELDS = (*SIZE_FIELDS, "type_vocab_size", "full_length_layers")


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
    """Hyper-parameters of a BERT-family encoder. Hashable, so it can live in a jitted module's static data."""

    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-12
    # LayerNorm eps of the MLM head transform; None means ``layer_norm_eps`` (what transformers does).
    mlm_head_layer_norm_eps: float | None = None
    pad_token_id: int = 0
    # 0 for BERT; pad_token_id + 1 for RoBERTa (position ids count from there and skip padding).
    position_offset: int = 0
    classifier_dropout: float | None = None
    num_labels: int = 2
    label_names: tuple[str, ...] | None = None
    problem_type: str | None = None
    # NarrowBERT: layers [0, F) are full length, layers [F, N) run on the selected rows only. None: F = N.
    full_length_layers: int | None = None
    model_type: str = "bert"
    # compute dtype (activations, matmuls) and parameter dtype; softmax, LayerNorm statistics and losses stay fp32.
    dtype: str = "float32"
    param_dtype: str = "float32"
    attention_impl: str = "xla"
    # NarrowBERT narrow attention: "auto" picks the absorbed form when P·heads < hidden (exact either way).
    narrow_attention: str = "auto"
    # Project K/V of the frozen context for all narrow layers in one matmul (standard form only). Off by
    # default: the weights are stored per layer, and stacking them each call cost more than it saved on CPU
    # (benchmarks/RESULTS.md); worth trying on accelerators at large P.
    fuse_narrow_kv: bool = False
    # Self-attention's Q, K and V projections as one (H, 3H) matmul (the kernels are concatenated at call
    # time; parameters keep their per-projection layout). A compute setting, exact up to rounding.
    fuse_qkv: bool = False
    # Run the layers of each segment as one lax.scan (compile time on deep models) and rematerialise each
    # layer in the backward pass: "none", "full" (save nothing), "dots", "dots_no_batch".
    scan_layers: bool = False
    remat_policy: str = "none"
    # Pad the tied decoder's vocabulary dimension to a multiple of this inside the MLM head's matmul (the
    # padded logits are sliced off before anything reads them). Parameters and checkpoints keep the true
    # vocab_size, so this is a pure compute setting; 128 aligns the matmul with GPU/TPU tiles. 1 = off.
    vocab_pad_multiple: int = 1
    # The output blocks' LayerNorm(residual + dropout(dense)) (attention and FFN, full and narrow layers) as
    # one op (flax_narrow.ops.dropout_norm): "off" (the nnx modules), "jnp" (the fused op's jax.numpy form),
    # "pallas" (its Pallas kernels; GPU/TPU only, a ConfigError on CPU), "pallas_interpret" (the kernels in
    # interpret mode: any backend, slow; for tests). Parameters are the same in every mode; the dropout masks
    # of "off" and the fused modes differ (different random draws), the values without dropout agree.
    fused_dropout_norm: str = "off"

    def __post_init__(self) -> None:
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ConfigError(f"EncoderConfig: {msg}")

        for name in SIZE_FIELDS:
            value = getattr(self, name)
            need(isinstance(value, int) and value > 0, f"{name} must be a positive int, got {value!r}")
        need(self.type_vocab_size >= 0, f"type_vocab_size must be >= 0, got {self.type_vocab_size}")
        need(
            self.hidden_size % self.num_attention_heads == 0,
            f"hidden_size ({self.hidden_size}) is not a multiple of num_attention_heads ({self.num_attention_heads})",
        )
        need(self.hidden_act in ACTIVATIONS, f"hidden_act {self.hidden_act!r} is not one of {ACTIVATIONS}")
        need(self.attention_impl in ATTENTION_IMPLS, f"attention_impl {self.attention_impl!r} not in {ATTENTION_IMPLS}")
        need(
            self.narrow_attention in NARROW_ATTENTION,
            f"narrow_attention {self.narrow_attention!r} not in {NARROW_ATTENTION}",
        )
        need(
            isinstance(self.vocab_pad_multiple, int) and self.vocab_pad_multiple >= 1,
            f"vocab_pad_multiple must be an int >= 1, got {self.vocab_pad_multiple!r}",
        )
        need(self.remat_policy in REMAT, f"remat_policy {self.remat_policy!r} not in {REMAT}")
        need(
            self.fused_dropout_norm in FUSED_DROPOUT_NORM,
            f"fused_dropout_norm {self.fused_dropout_norm!r} not in {FUSED_DROPOUT_NORM}",
        )
        need(self.model_type in MODEL_TYPES, f"model_type {self.model_type!r} is not one of {MODEL_TYPES}")
        need(self.problem_type in PROBLEM_TYPES, f"problem_type {self.problem_type!r} is not one of {PROBLEM_TYPES}")
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
            need(0.0 <= getattr(self, name) < 1.0, f"{name} must be in [0, 1), got {getattr(self, name)}")
        need(self.layer_norm_eps > 0, f"layer_norm_eps must be > 0, got {self.layer_norm_eps}")
        need(0 <= self.pad_token_id < self.vocab_size, f"pad_token_id {self.pad_token_id} outside the vocabulary")
        need(self.position_offset >= 0, f"position_offset must be >= 0, got {self.position_offset}")
        need(self.num_labels >= 1, f"num_labels must be >= 1, got {self.num_labels}")
        if self.label_names is not None:
            need(
                len(self.label_names) == self.num_labels,
                f"label_names has {len(self.label_names)} names but num_labels is {self.num_labels}",
            )
        if self.full_length_layers is not None:
            need(
                1 <= self.full_length_layers <= self.num_hidden_layers,
                f"full_length_layers must be in [1, num_hidden_layers={self.num_hidden_layers}], "
                f"got {self.full_length_layers}",
            )
        for name in ("dtype", "param_dtype"):
            try:
                dt = np.dtype(canonical_dtype(getattr(self, name)))
            except TypeError:
                raise ConfigError(f"EncoderConfig: {name} {getattr(self, name)!r} is not a dtype name") from None
            need(dt.kind == "f" or dt.name == "bfloat16", f"{name} must be a float dtype, got {dt.name}")

    # ----------------------------------------------------------------------------------------- derived
    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def num_full_layers(self) -> int:
        """F: layers running over every token."""
        return self.num_hidden_layers if self.full_length_layers is None else self.full_length_layers

    @property
    def num_narrow_layers(self) -> int:
        """N - F: layers running only on the selected rows."""
        return self.num_hidden_layers - self.num_full_layers

    @property
    def is_narrow(self) -> bool:
        return self.num_narrow_layers > 0

    @property
    def head_layer_norm_eps(self) -> float:
        return self.layer_norm_eps if self.mlm_head_layer_norm_eps is None else self.mlm_head_layer_norm_eps

    @property
    def compute_dtype(self) -> np.dtype:
        return np.dtype(canonical_dtype(self.dtype))

    @property
    def params_dtype(self) -> np.dtype:
        return np.dtype(canonical_dtype(self.param_dtype))

    def replace(self, **changes: Any) -> EncoderConfig:
        """A copy with some fields changed (validated again)."""
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ConfigError(f"EncoderConfig has no field(s) {sorted(unknown)}")
        return dataclasses.replace(self, **changes)

    # ----------------------------------------------------------------------------------------- presets
    @classmethod
    def bert_base(cls, **kw: Any) -> EncoderConfig:
        return cls(**kw)

    @classmethod
    def bert_large(cls, **kw: Any) -> EncoderConfig:
        return cls(
            **{**dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096), **kw}
        )

    @classmethod
    def bort(cls, **kw: Any) -> EncoderConfig:
        """BORT as in the released checkpoint (``amazon/bort``); MLM-head LN eps 1e-12 as in GluonNLP."""
        return cls(
            **{
                **dict(
                    vocab_size=50265,
                    hidden_size=1024,
                    num_hidden_layers=4,
                    num_attention_heads=8,
                    intermediate_size=768,
                    type_vocab_size=1,
                    layer_norm_eps=1e-5,
                    mlm_head_layer_norm_eps=1e-12,
                    pad_token_id=1,
                ),
                **kw,
            }
        )

    @classmethod
    def roberta_base(cls, **kw: Any) -> EncoderConfig:
        return cls(
            **{
                **dict(
                    vocab_size=50265,
                    max_position_embeddings=514,
                    type_vocab_size=1,
                    layer_norm_eps=1e-5,
                    pad_token_id=1,
                    position_offset=2,
                    model_type="roberta",
                ),
                **kw,
            }
        )

    @classmethod
    def roberta_large(cls, **kw: Any) -> EncoderConfig:
        """The BORT distillation teacher's shape."""
        return cls.roberta_base(
            **{**dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096), **kw}
        )

    @classmethod
    def narrowbert_base(cls, **kw: Any) -> EncoderConfig:
        return cls(**{**dict(full_length_layers=2, model_type="narrow_bert"), **kw})

    @classmethod
    def tiny(cls, **kw: Any) -> EncoderConfig:
        """A BERT small enough for unit tests (a few thousand parameters)."""
        return cls(
            **{
                **dict(
                    vocab_size=128,
                    hidden_size=32,
                    num_hidden_layers=2,
                    num_attention_heads=4,
                    intermediate_size=37,
                    max_position_embeddings=64,
                ),
                **kw,
            }
        )

    @classmethod
    def tiny_bort(cls, **kw: Any) -> EncoderConfig:
        """BORT's proportions (FFN smaller than hidden, eps 1e-5, one token type, pad id 1), tiny."""
        return cls.tiny(
            **{
                **dict(
                    hidden_size=64,
                    intermediate_size=48,
                    num_attention_heads=4,
                    type_vocab_size=1,
                    layer_norm_eps=1e-5,
                    pad_token_id=1,
                ),
                **kw,
            }
        )

    @classmethod
    def tiny_narrowbert(cls, **kw: Any) -> EncoderConfig:
        return cls.tiny(**{**dict(num_hidden_layers=4, full_length_layers=2, model_type="narrow_bert"), **kw})

    # ----------------------------------------------------------------------------------------- HF I/O
    @classmethod
    def from_hf_config(cls, hf: Any, **overrides: Any) -> EncoderConfig:
        """Build from a transformers config (object, dict, or path to config.json / its directory).

        Recognises ``model_type`` bert, roberta (and xlm-roberta-shaped), the NarrowBERT authors' config
        (``model_type: "bert"`` plus ``full_length_layers``) and the port's (``model_type: "narrow_bert"``).
        """
        d = _as_dict(hf)
        model_type = d.get("model_type", "bert")
        if model_type not in ("bert", "roberta", "narrow_bert", "xlm-roberta"):
            raise ConfigError(f"config.json: model_type {model_type!r} is not a BERT-family encoder we support")
        pet = d.get("position_embedding_type", "absolute")
        if pet != "absolute":
            raise ConfigError(f"config.json: position_embedding_type {pet!r} is not supported (only 'absolute')")
        if d.get("is_decoder") or d.get("add_cross_attention"):
            raise ConfigError("config.json: decoder / cross-attention BERT variants are not supported")
        kw: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            if f.name in d and f.name not in ("model_type", "dtype", "param_dtype", "label_names", "position_offset"):
                kw[f.name] = d[f.name]
        kw.pop("num_labels", None)
        pad = d.get("pad_token_id", 0 if model_type in ("bert", "narrow_bert") else 1)
        kw["pad_token_id"] = 0 if pad is None else pad
        if model_type in ("roberta", "xlm-roberta"):
            kw["model_type"] = "roberta"
            kw["position_offset"] = kw["pad_token_id"] + 1
        full = d.get("full_length_layers")
        if full is None and "num_narrow_layers" in d:
            full = d["num_hidden_layers"] - d["num_narrow_layers"]
        if full is not None and full < d.get("num_hidden_layers", 12):
            kw["full_length_layers"] = full
            kw["model_type"] = "narrow_bert"
        elif model_type == "narrow_bert":
            kw["model_type"] = "narrow_bert"
        id2label = d.get("id2label")
        if id2label:
            names = [str(id2label.get(str(i), id2label.get(i, f"LABEL_{i}"))) for i in range(len(id2label))]
            kw["num_labels"] = len(names)
            if names != [f"LABEL_{i}" for i in range(len(names))]:  # transformers' placeholder names
                kw["label_names"] = tuple(names)
        elif "num_labels" in d:
            kw["num_labels"] = d["num_labels"]
        kw.update(overrides)
        return cls(**kw)

    def to_hf_config(self, architectures: list[str] | None = None) -> dict[str, Any]:
        """A transformers-compatible config.json dict (NarrowBERT: the authors' layout with full_length_layers)."""
        hf_type = "roberta" if self.model_type == "roberta" else "bert"
        d: dict[str, Any] = {
            "model_type": hf_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "intermediate_size": self.intermediate_size,
            "hidden_act": self.hidden_act,
            "hidden_dropout_prob": self.hidden_dropout_prob,
            "attention_probs_dropout_prob": self.attention_probs_dropout_prob,
            "max_position_embeddings": self.max_position_embeddings,
            "type_vocab_size": self.type_vocab_size,
            "initializer_range": self.initializer_range,
            "layer_norm_eps": self.layer_norm_eps,
            "pad_token_id": self.pad_token_id,
            "position_embedding_type": "absolute",
            "classifier_dropout": self.classifier_dropout,
            "tie_word_embeddings": True,
        }
        names = self.label_names or tuple(f"LABEL_{i}" for i in range(self.num_labels))
        d["id2label"] = {str(i): n for i, n in enumerate(names)}
        d["label2id"] = {n: i for i, n in enumerate(names)}
        if self.problem_type is not None:
            d["problem_type"] = self.problem_type
        if self.is_narrow:
            d["full_length_layers"] = self.full_length_layers
        if architectures:
            d["architectures"] = list(architectures)
        if self.model_type == "roberta" and self.position_offset != self.pad_token_id + 1:
            raise ConfigError(
                f"RoBERTa in transformers needs position_offset = pad_token_id + 1 = {self.pad_token_id + 1}, "
                f"got {self.position_offset}"
            )
        return d

    # ----------------------------------------------------------------------------------------- own I/O
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if d["label_names"] is not None:
            d["label_names"] = list(d["label_names"])
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EncoderConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"EncoderConfig: unknown field(s) {unknown}")
        d = dict(d)
        if d.get("label_names") is not None:
            d["label_names"] = tuple(d["label_names"])
        return cls(**d)


def canonical_dtype(name: Any) -> Any:
    """A numpy-understood dtype for a config dtype name (bfloat16 via ml_dtypes; fp32/fp16 aliases)."""
    if name in ("bfloat16", "bf16"):
        import ml_dtypes

        return ml_dtypes.bfloat16
    return {"fp32": "float32", "fp16": "float16"}.get(name, name)


def read_json(path: str | os.PathLike, *, what: str = "config file", error: type[Exception] = ConfigError) -> dict:
    """The JSON object stored in ``path`` (every config.json / index file / ``--config`` read goes through here).

    Raises:
      ConfigError (or ``error``): a missing or unreadable file, invalid JSON, or JSON that is not an object.
    """
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except FileNotFoundError:
        raise error(f"{path}: no such {what}") from None
    except IsADirectoryError:
        raise error(f"{path}: is a directory, not a {what}") from None
    except OSError as e:
        raise error(f"{path}: cannot read the {what} ({e.strerror})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise error(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


def _as_dict(hf: Any) -> dict[str, Any]:
    if isinstance(hf, dict):
        return hf
    if isinstance(hf, (str, os.PathLike)):
        path = os.fspath(hf)
        return read_json(os.path.join(path, "config.json") if os.path.isdir(path) else path)
    if hasattr(hf, "to_dict"):
        return hf.to_dict()
    raise ConfigError(f"cannot read a config from {type(hf).__name__}")
