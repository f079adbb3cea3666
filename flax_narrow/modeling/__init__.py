"""Flax NNX modules for BERT, RoBERTa-shaped models, BORT and NarrowBERT."""

from flax_narrow.modeling.base import PreTrainedEncoder
from flax_narrow.modeling.bert import (
    MODEL_CLASSES,
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

MODEL_CLASSES.update(
    {
        c.hf_architecture: c
        for c in (
            NarrowBertModel,
            NarrowBertForMaskedLM,
            NarrowBertForSequenceClassification,
            NarrowBertForMultipleChoice,
            NarrowBertForTokenClassification,
        )
    }
)

__all__ = [
    "MODEL_CLASSES",
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
