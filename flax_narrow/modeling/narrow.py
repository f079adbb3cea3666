"""NarrowBERT (SparseQueries) under the names of the authors' classes.

A NarrowBERT is a BERT whose config sets ``full_length_layers`` = F < ``num_hidden_layers``: the shared
modules switch to the narrow path at layer F (``BertEncoder``), so these classes add no code — only the
architecture names that the authors' checkpoints and our exports carry.

Rows: ``narrow_positions int32[B, P]`` + ``narrow_valid bool[B, P]`` (static P: jit compiles once per
(B, L, P)), or ``narrow_mask bool[B, L]`` outside jit, or labels with -100 (the authors' convention).
Sequence classification and multiple choice use the CLS row only (P = 1). Outputs are (B, P, ...);
``flax_narrow.ops.scatter_rows`` puts them back at (B, L, ...).
"""

from __future__ import annotations

from flax_narrow.modeling.bert import (
    BertForMaskedLM,
    BertForMultipleChoice,
    BertForSequenceClassification,
    BertForTokenClassification,
    BertModel,
)


class NarrowBertModel(BertModel):
    """Embeddings, F full layers, N - F narrow layers over the selected rows; pooler on row 0."""


class NarrowBertForMaskedLM(BertForMaskedLM):
    """MLM logits (B, P, V) at the masked rows only."""


class NarrowBertForSequenceClassification(BertForSequenceClassification):
    """Narrow layers on the CLS row only; pooler -> dropout -> classifier."""


class NarrowBertForMultipleChoice(BertForMultipleChoice):
    """(B, C, L) inputs; the CLS row of each choice; logits (B, C). (The port's head.)"""


class NarrowBertForTokenClassification(BertForTokenClassification):
    """Logits (B, P, labels) at the selected rows (e.g. the first sub-token of each word)."""
