"""Flax NNX modules for BERT, RoBERTa-shaped models, BORT and NarrowBERT, and the one table of their names.

``ARCHITECTURES`` is the only place an architecture name is written: every lookup (``MODEL_CLASSES``, the
converter's ``--head`` choices and class for a checkpoint, the names an export writes, the PyTorch class a
``--verify`` compares with, the fine-tuning task's class) derives from it.
"""

from __future__ import annotations

import dataclasses

from flax_narrow.modeling.base import PreTrainedEncoder
from flax_narrow.modeling.bert import (
    BertForMaskedLM,
    BertForMultipleChoice,
    BertForQuestionAnswering,
    BertForSequenceClassification,
    BertForTokenClassification,
    BertModel,
    BortForMaskedLM,
    BortForMultipleChoice,
    BortForQuestionAnswering,
    BortForSequenceClassification,
    BortForTokenClassification,
    BortModel,
)
from flax_narrow.modeling.narrow import (
    NarrowBertForMaskedLM,
    NarrowBertForMultipleChoice,
    NarrowBertForSequenceClassification,
    NarrowBertForTokenClassification,
    NarrowBertModel,
)
from flax_narrow.modeling.outputs import (
    EncoderOutput,
    MaskedLMOutput,
    QuestionAnsweringModelOutput,
    SequenceClassifierOutput,
    TokenClassifierOutput,
)


@dataclasses.dataclass(frozen=True)
class Architecture:
    """One model class and every name it goes by.

    Attributes:
      cls: our class; its name (``cls.hf_architecture``) is what config.json's ``architectures`` carries.
      head: what it computes, the ``flax-narrow convert --head`` choice: 'base', 'mlm', 'sequence-classification',
        'token-classification', 'multiple-choice' or 'question-answering'.
      family: 'bert' (BERT, BORT and RoBERTa-shaped weights) or 'narrow' (NarrowBERT: the same code under the
        authors' class names, for configs with ``full_length_layers`` < ``num_hidden_layers``).
      torch: the PyTorch reference class ``--verify`` compares with: a ``transformers`` class (family 'bert') or
        one of :mod:`flax_narrow.convert.torch_narrowbert` (family 'narrow').
      torch_roberta: transformers' RoBERTa class of the same head, written by an export of a RoBERTa-typed config
        and compared with by ``--verify``; None where transformers' RoBERTa head differs from BERT's.
      reads: other architecture names in config.json that load as this class.
    """

    cls: type[PreTrainedEncoder]
    head: str
    family: str
    torch: str
    torch_roberta: str | None = None
    reads: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return self.cls.hf_architecture

    @property
    def names(self) -> tuple[str, ...]:
        """Every architecture name that loads as this class."""
        return (self.name, *((self.torch_roberta,) if self.torch_roberta else ()), *self.reads)


ARCHITECTURES: tuple[Architecture, ...] = (
    Architecture(BertModel, "base", "bert", "BertModel", "RobertaModel", ("BortModel", "XLMRobertaModel")),
    Architecture(
        BertForMaskedLM,
        "mlm",
        "bert",
        "BertForMaskedLM",
        "RobertaForMaskedLM",
        ("BortForMaskedLM", "XLMRobertaForMaskedLM", "BertForPreTraining", "BertLMHeadModel"),
    ),
    Architecture(
        BertForSequenceClassification,
        "sequence-classification",
        "bert",
        "BertForSequenceClassification",
        reads=(
            "BortForSequenceClassification",
            "RobertaForSequenceClassification",
            "XLMRobertaForSequenceClassification",
        ),
    ),
    Architecture(
        BertForTokenClassification,
        "token-classification",
        "bert",
        "BertForTokenClassification",
        reads=("BortForTokenClassification", "RobertaForTokenClassification", "XLMRobertaForTokenClassification"),
    ),
    Architecture(
        BertForMultipleChoice,
        "multiple-choice",
        "bert",
        "BertForMultipleChoice",
        reads=("BortForMultipleChoice", "RobertaForMultipleChoice", "XLMRobertaForMultipleChoice"),
    ),
    Architecture(
        BertForQuestionAnswering,
        "question-answering",
        "bert",
        "BertForQuestionAnswering",
        reads=("BortForQuestionAnswering", "RobertaForQuestionAnswering", "XLMRobertaForQuestionAnswering"),
    ),
    Architecture(NarrowBertModel, "base", "narrow", "TorchNarrowBertModel"),
    Architecture(NarrowBertForMaskedLM, "mlm", "narrow", "TorchNarrowBertForMaskedLM"),
    Architecture(
        NarrowBertForSequenceClassification,
        "sequence-classification",
        "narrow",
        "TorchNarrowBertForSequenceClassification",
    ),
    Architecture(
        NarrowBertForTokenClassification, "token-classification", "narrow", "TorchNarrowBertForTokenClassification"
    ),
    Architecture(NarrowBertForMultipleChoice, "multiple-choice", "narrow", "TorchNarrowBertForMultipleChoice"),
)

# The --head choices, in the table's order.
HEADS: tuple[str, ...] = tuple(dict.fromkeys(a.head for a in ARCHITECTURES))
# Our architecture name -> class.
MODEL_CLASSES: dict[str, type[PreTrainedEncoder]] = {a.name: a.cls for a in ARCHITECTURES}
_BY_NAME: dict[str, Architecture] = {n: a for a in ARCHITECTURES for n in a.names}
_BY_HEAD: dict[tuple[str, str], Architecture] = {(a.head, a.family): a for a in ARCHITECTURES}


def architecture_named(name: str) -> Architecture | None:
    """The table row an architecture name in config.json loads as (``RobertaForMaskedLM`` -> the MLM row), or
    None for a name flax-narrow does not implement."""
    return _BY_NAME.get(name)


def architecture_of(cls: type) -> Architecture:
    """The table row of one of our classes (BORT's names are aliases of BERT's classes)."""
    return _BY_NAME[cls.hf_architecture]


def architecture_for(head: str, narrow: bool) -> Architecture | None:
    """The row for a head: the NarrowBERT one for a narrow config, where the head has one (else the BERT one,
    whose code computes a narrow config too); None for an unknown head."""
    return (_BY_HEAD.get((head, "narrow")) if narrow else None) or _BY_HEAD.get((head, "bert"))


__all__ = [
    "ARCHITECTURES",
    "Architecture",
    "HEADS",
    "MODEL_CLASSES",
    "architecture_for",
    "architecture_named",
    "architecture_of",
    "PreTrainedEncoder",
    "BertModel",
    "BertForMaskedLM",
    "BertForSequenceClassification",
    "BertForMultipleChoice",
    "BertForTokenClassification",
    "BertForQuestionAnswering",
    "BortModel",
    "BortForMaskedLM",
    "BortForSequenceClassification",
    "BortForMultipleChoice",
    "BortForTokenClassification",
    "BortForQuestionAnswering",
    "NarrowBertModel",
    "NarrowBertForMaskedLM",
    "NarrowBertForSequenceClassification",
    "NarrowBertForMultipleChoice",
    "NarrowBertForTokenClassification",
    "EncoderOutput",
    "MaskedLMOutput",
    "SequenceClassifierOutput",
    "TokenClassifierOutput",
    "QuestionAnsweringModelOutput",
]
