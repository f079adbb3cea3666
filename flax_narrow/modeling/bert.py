"""The public models: ``BertModel`` and its task heads. One family serves BERT, RoBERTa-shaped models, BORT and
NarrowBERT (``config.full_length_layers``); the difference is configuration.

Common call arguments (B batch, L length, P selected rows):
  input_ids: int32[B, L]; attention_mask: {0,1}[B, L] (1 = real token; default: ``input_ids != pad``);
  token_type_ids: int32[B, L] or None; position_ids: int32[B, L] or None;
  narrow_positions: int32[B, P] ascending + narrow_valid: bool[B, P] (static P, jit-friendly), or
  narrow_mask: bool[B, L] (host-side convenience; P = the largest row count);
  segment_ids: int32[B, L] or None: packed rows (documents numbered 1, 2, ... per row, padding 0); tokens
    attend only within their segment and positions restart in each (``BertModel``, ``BertForMaskedLM``);
  deterministic: no dropout when True (default); rngs come from the module's ``nnx.Rngs``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from flax_narrow.config import EncoderConfig
from flax_narrow.errors import ConfigError
from flax_narrow.modeling.base import PreTrainedEncoder, resolve_narrow
from flax_narrow.modeling.layers import BertEmbeddings, BertEncoder, BertPooler, activation, dense, layer_norm
from flax_narrow.modeling.losses import IGNORE_INDEX, classification_loss, masked_cross_entropy
from flax_narrow.modeling.outputs import (
    EncoderOutput,
    MaskedLMOutput,
    QuestionAnsweringModelOutput,
    SequenceClassifierOutput,
    TokenClassifierOutput,
)
from flax_narrow.ops.gather import gather_rows
from flax_narrow.ops.packing import segment_position_ids


class BertModel(PreTrainedEncoder):
    """Embeddings, encoder and (optionally) pooler. Returns :class:`EncoderOutput`.

    ``last_hidden_state`` is (B, L, H), or (B, P, H) when rows are selected (always for NarrowBERT).
    """

    base_model_prefix = ""

    def __init__(self, config: EncoderConfig, *, add_pooling_layer: bool = True, rngs: nnx.Rngs):
        self.config = config
        self.embeddings = BertEmbeddings(config, rngs=rngs)
        self.encoder = BertEncoder(config, rngs=rngs)
        self.pooler = BertPooler(config, rngs=rngs) if add_pooling_layer else None

    def __call__(
        self,
        input_ids,
        attention_mask=None,
        token_type_ids=None,
        position_ids=None,
        *,
        narrow_positions=None,
        narrow_valid=None,
        narrow_mask=None,
        cls_only: bool = False,
        segment_ids=None,
        deterministic: bool = True,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
    ) -> EncoderOutput:
        cfg = self.config
        input_ids = jnp.asarray(input_ids)
        if attention_mask is None:
            attention_mask = input_ids != cfg.pad_token_id
        key_mask_bl = jnp.asarray(attention_mask).astype(bool)
        if segment_ids is not None:  # packed rows: positions restart in every segment
            segment_ids = jnp.asarray(segment_ids, jnp.int32)
            if position_ids is None:
                position_ids = segment_position_ids(segment_ids) + cfg.position_offset
        positions, valid = resolve_narrow(
            cfg, input_ids, narrow_positions, narrow_valid, narrow_mask, cls_only=cls_only
        )
        x = self.embeddings(input_ids, token_type_ids, position_ids, deterministic=deterministic)
        kw = dict(
            deterministic=deterministic, output_hidden_states=output_hidden_states, output_attentions=output_attentions
        )
        kw["segment_ids_bl"] = segment_ids
        if cfg.is_narrow:
            hidden, states, attns = self.encoder(x, key_mask_bl, positions, **kw)
            pooled = self.pooler(hidden) if self.pooler is not None else None  # row 0 = first selected row
        else:
            hidden, states, attns = self.encoder(x, key_mask_bl, **kw)
            pooled = self.pooler(hidden) if self.pooler is not None else None  # the CLS row
            if positions is not None:
                hidden = gather_rows(hidden, positions)
        return EncoderOutput(hidden, pooled, states, attns, positions, valid)


class BertPredictionHeadTransform(nnx.Module):
    def __init__(self, config: EncoderConfig, *, rngs: nnx.Rngs):
        self.dense = dense(config, config.hidden_size, config.hidden_size, ("embed", "embed_out"), rngs)
        self.act = activation(config.hidden_act)
        self.LayerNorm = layer_norm(config, config.head_layer_norm_eps, rngs)

    def __call__(self, x):
        return self.LayerNorm(self.act(self.dense(x)))


class BertLMPredictionHead(nnx.Module):
    """transform -> decoder tied to the word embeddings (``Embed.attend``) + ``bias``."""

    def __init__(self, config: EncoderConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.transform = BertPredictionHeadTransform(config, rngs=rngs)
        self.bias = nnx.Param(jnp.zeros((config.vocab_size,), config.params_dtype), logical_axes=("vocab",))

    def __call__(self, x, word_embeddings: nnx.Embed):
        h = self.transform(x)
        vocab, multiple = self.config.vocab_size, self.config.vocab_pad_multiple
        padded = -(-vocab // multiple) * multiple
        if padded == vocab:
            logits = word_embeddings.attend(h)
        else:  # the same product on a table padded with zero rows; the extra columns are dropped at once
            q, table = word_embeddings.promote_dtype((h, word_embeddings.embedding[...]), dtype=word_embeddings.dtype)
            logits = jnp.dot(q, jnp.pad(table, ((0, padded - vocab), (0, 0))).T)[..., :vocab]
        return logits + self.bias[...].astype(h.dtype)


class BertOnlyMLMHead(nnx.Module):
    def __init__(self, config: EncoderConfig, *, rngs: nnx.Rngs):
        self.predictions = BertLMPredictionHead(config, rngs=rngs)


def _task_base(config: EncoderConfig, pooler: bool, rngs: nnx.Rngs) -> BertModel:
    return BertModel(config, add_pooling_layer=pooler, rngs=rngs)


class BertForMaskedLM(PreTrainedEncoder):
    """MLM logits at ``narrow_positions`` (B, P, V) — the masked rows only — or densely (B, L, V).

    ``labels``: (B, P) aligned with the positions, or (B, L) with -100 at unmasked tokens. For NarrowBERT
    with (B, L) labels and no positions, the rows are derived from ``labels != -100`` (the authors' rule).
    """

    def __init__(self, config: EncoderConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.bert = _task_base(config, False, rngs)
        self.cls = BertOnlyMLMHead(config, rngs=rngs)

    def __call__(
        self,
        input_ids,
        attention_mask=None,
        token_type_ids=None,
        position_ids=None,
        *,
        labels=None,
        label_layout=None,
        narrow_positions=None,
        narrow_valid=None,
        narrow_mask=None,
        segment_ids=None,
        deterministic=True,
        output_hidden_states=False,
        output_attentions=False,
    ) -> MaskedLMOutput:
        narrow_mask = _rows_from_labels(self.config, input_ids, labels, narrow_positions, narrow_mask)
        out = self.bert(
            input_ids,
            attention_mask,
            token_type_ids,
            position_ids,
            narrow_positions=narrow_positions,
            narrow_valid=narrow_valid,
            narrow_mask=narrow_mask,
            segment_ids=segment_ids,
            deterministic=deterministic,
            output_hidden_states=output_hidden_states,
            output_attentions=output_attentions,
        )
        logits = self.cls.predictions(out.last_hidden_state, self.bert.embeddings.word_embeddings)
        loss = None
        if labels is not None:
            layout = label_layout or (None if narrow_positions is not None else "tokens")
            loss = _row_loss(logits, jnp.asarray(labels), out.narrow_positions, out.narrow_valid, layout, input_ids)
        return MaskedLMOutput(logits, loss, out.hidden_states, out.attentions, out.narrow_positions, out.narrow_valid)


def _rows_from_labels(config, input_ids, labels, narrow_positions, narrow_mask):
    """The authors' convention: a NarrowBERT given per-token labels (B, L) and no rows computes the rows whose
    label is not -100 (host-side; inside jit pass ``narrow_positions`` instead)."""
    if (
        labels is not None
        and narrow_positions is None
        and narrow_mask is None
        and config.is_narrow
        and labels.shape == jnp.shape(input_ids)
    ):
        return jax.device_get(labels) != IGNORE_INDEX
    return narrow_mask


def _row_loss(logits_bpc, labels, positions_bp, valid_bp, layout=None, input_ids=None):
    """Cross-entropy on the computed rows; labels per row (B, P) (``layout="rows"``) or per token (B, L)
    (``"tokens"``, gathered at the rows). Without ``layout`` the shapes decide, and P == L (which they
    cannot tell apart) is refused rather than guessed."""
    from flax_narrow.errors import InputError

    if layout not in (None, "rows", "tokens"):
        raise InputError(f"label_layout must be 'rows' or 'tokens', got {layout!r}")
    if positions_bp is not None:
        if layout is None:
            same = labels.shape[1] == logits_bpc.shape[1]
            if same and input_ids is not None and labels.shape[1] == jnp.shape(input_ids)[1]:
                raise InputError(
                    f"labels of shape {tuple(labels.shape)} could be per row (P = {logits_bpc.shape[1]}) or per "
                    "token (L): pass label_layout='rows' or 'tokens'"
                )
            layout = "rows" if same else "tokens"
        if layout == "tokens":
            labels = jnp.take_along_axis(labels, positions_bp, axis=1)
    return masked_cross_entropy(logits_bpc, labels, valid_bp)


class BertForSequenceClassification(PreTrainedEncoder):
    """pooler -> dropout -> classifier. NarrowBERT runs its narrow layers on the CLS row only (P = 1)."""

    def __init__(self, config: EncoderConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.bert = _task_base(config, True, rngs)
        rate = config.hidden_dropout_prob if config.classifier_dropout is None else config.classifier_dropout
        self.dropout = nnx.Dropout(rate, rngs=rngs)
        self.classifier = dense(config, config.hidden_size, config.num_labels, ("embed", "labels"), rngs)

    def __call__(
        self,
        input_ids,
        attention_mask=None,
        token_type_ids=None,
        position_ids=None,
        *,
        labels=None,
        deterministic=True,
        output_hidden_states=False,
        output_attentions=False,
    ) -> SequenceClassifierOutput:
        out = self.bert(
            input_ids,
            attention_mask,
            token_type_ids,
            position_ids,
            cls_only=True,
            deterministic=deterministic,
            output_hidden_states=output_hidden_states,
            output_attentions=output_attentions,
        )
        logits = self.classifier(self.dropout(out.pooler_output, deterministic=deterministic))
        loss = None
        if labels is not None:
            loss = classification_loss(logits, jnp.asarray(labels), self.config.num_labels, self.config.problem_type)
        return SequenceClassifierOutput(logits, loss, out.hidden_states, out.attentions)


class BertForMultipleChoice(PreTrainedEncoder):
    """Inputs (B, C, L) -> (B*C, L) -> pooler -> dropout -> Linear(H, 1) -> logits (B, C)."""

    def __init__(self, config: EncoderConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.bert = _task_base(config, True, rngs)
        rate = config.hidden_dropout_prob if config.classifier_dropout is None else config.classifier_dropout
        self.dropout = nnx.Dropout(rate, rngs=rngs)
        self.classifier = dense(config, config.hidden_size, 1, ("embed", "labels"), rngs)

    def __call__(
        self,
        input_ids,
        attention_mask=None,
        token_type_ids=None,
        position_ids=None,
        *,
        labels=None,
        deterministic=True,
        output_hidden_states=False,
        output_attentions=False,
    ) -> SequenceClassifierOutput:
        input_ids = jnp.asarray(input_ids)
        b, c, length = input_ids.shape

        def flat(x):
            return None if x is None else jnp.asarray(x).reshape(b * c, length)

        out = self.bert(
            flat(input_ids),
            flat(attention_mask),
            flat(token_type_ids),
            flat(position_ids),
            cls_only=True,
            deterministic=deterministic,
            output_hidden_states=output_hidden_states,
            output_attentions=output_attentions,
        )
        logits = self.classifier(self.dropout(out.pooler_output, deterministic=deterministic)).reshape(b, c)
        loss = None if labels is None else masked_cross_entropy(logits, jnp.asarray(labels))
        return SequenceClassifierOutput(logits, loss, out.hidden_states, out.attentions)


class BertForTokenClassification(PreTrainedEncoder):
    """dropout -> classifier per token: (B, L, labels), or (B, P, labels) at the selected rows."""

    def __init__(self, config: EncoderConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.bert = _task_base(config, False, rngs)
        rate = config.hidden_dropout_prob if config.classifier_dropout is None else config.classifier_dropout
        self.dropout = nnx.Dropout(rate, rngs=rngs)
        self.classifier = dense(config, config.hidden_size, config.num_labels, ("embed", "labels"), rngs)

    def __call__(
        self,
        input_ids,
        attention_mask=None,
        token_type_ids=None,
        position_ids=None,
        *,
        labels=None,
        label_layout=None,
        narrow_positions=None,
        narrow_valid=None,
        narrow_mask=None,
        deterministic=True,
        output_hidden_states=False,
        output_attentions=False,
    ) -> TokenClassifierOutput:
        narrow_mask = _rows_from_labels(self.config, input_ids, labels, narrow_positions, narrow_mask)
        out = self.bert(
            input_ids,
            attention_mask,
            token_type_ids,
            position_ids,
            narrow_positions=narrow_positions,
            narrow_valid=narrow_valid,
            narrow_mask=narrow_mask,
            deterministic=deterministic,
            output_hidden_states=output_hidden_states,
            output_attentions=output_attentions,
        )
        logits = self.classifier(self.dropout(out.last_hidden_state, deterministic=deterministic))
        loss = None
        if labels is not None:
            layout = label_layout or (None if narrow_positions is not None else "tokens")
            loss = _row_loss(logits, jnp.asarray(labels), out.narrow_positions, out.narrow_valid, layout, input_ids)
        return TokenClassifierOutput(
            logits, loss, out.hidden_states, out.attentions, out.narrow_positions, out.narrow_valid
        )


class BertForQuestionAnswering(PreTrainedEncoder):
    """qa_outputs: Linear(H, 2) per token -> start/end logits (B, L). Full-length models only."""

    def __init__(self, config: EncoderConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.bert = _task_base(config, False, rngs)
        self.qa_outputs = dense(config, config.hidden_size, 2, ("embed", "labels"), rngs)

    def __call__(
        self,
        input_ids,
        attention_mask=None,
        token_type_ids=None,
        position_ids=None,
        *,
        start_positions=None,
        end_positions=None,
        deterministic=True,
        output_hidden_states=False,
        output_attentions=False,
    ) -> QuestionAnsweringModelOutput:
        if self.config.is_narrow:
            raise ConfigError("question answering needs every token's output; NarrowBERT models do not support it")
        out = self.bert(
            input_ids,
            attention_mask,
            token_type_ids,
            position_ids,
            deterministic=deterministic,
            output_hidden_states=output_hidden_states,
            output_attentions=output_attentions,
        )
        logits = self.qa_outputs(out.last_hidden_state)
        start, end = logits[..., 0], logits[..., 1]
        loss = None
        if start_positions is not None and end_positions is not None:
            length = start.shape[1]
            # transformers clamps out-of-range targets to L and ignores them.
            s = jnp.clip(jnp.asarray(start_positions), 0, length)
            e = jnp.clip(jnp.asarray(end_positions), 0, length)
            s = jnp.where(s == length, IGNORE_INDEX, s)
            e = jnp.where(e == length, IGNORE_INDEX, e)
            loss = (masked_cross_entropy(start, s) + masked_cross_entropy(end, e)) / 2
        return QuestionAnsweringModelOutput(start, end, loss, out.hidden_states, out.attentions)


# BORT is a BERT: the names are aliases, so that code reads as the paper does.
BortModel = BertModel
BortForMaskedLM = BertForMaskedLM
BortForSequenceClassification = BertForSequenceClassification
BortForMultipleChoice = BertForMultipleChoice
BortForTokenClassification = BertForTokenClassification
BortForQuestionAnswering = BertForQuestionAnswering
