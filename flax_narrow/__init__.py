"""flax-narrow: BORT and NarrowBERT encoders in JAX/Flax NNX.

Quickstart::

    from flax_narrow import BertForMaskedLM, load_tokenizer
    model = BertForMaskedLM.from_pretrained("path/or/hub-id")   # HF PyTorch or flax-narrow checkpoint
"""

from flax_narrow.config import EncoderConfig
from flax_narrow.errors import CheckpointError, ConfigError, FlaxNarrowError, InputError, NarrowOverflowError
from flax_narrow.inference import fill_mask
from flax_narrow.modeling import (
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
    NarrowBertForMaskedLM,
    NarrowBertForMultipleChoice,
    NarrowBertForSequenceClassification,
    NarrowBertForTokenClassification,
    NarrowBertModel,
)
from flax_narrow.ops import gather_rows, mask_to_positions, positions_from_mask, scatter_rows
from flax_narrow.tokenization import load_tokenizer

__version__ = "0.1.0"

__all__ = [
    "EncoderConfig",
    "CheckpointError",
    "ConfigError",
    "FlaxNarrowError",
    "InputError",
    "NarrowOverflowError",
    "MODEL_CLASSES",
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
    "gather_rows",
    "mask_to_positions",
    "positions_from_mask",
    "scatter_rows",
    "load_tokenizer",
    "fill_mask",
    "NarrowBertModel",
    "NarrowBertForMaskedLM",
    "NarrowBertForSequenceClassification",
    "NarrowBertForMultipleChoice",
    "NarrowBertForTokenClassification",
]
