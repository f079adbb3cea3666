"""Tokenizers: transformers fast tokenizers for BERT WordPiece (BERT, NarrowBERT) and RoBERTa byte-level BPE
(BORT, RoBERTa)."""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any

from flax_narrow.convert import readers_orbax
from flax_narrow.errors import CheckpointError

TOKENIZER_FILE_NAMES = {"tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json"}


def load_tokenizer(path_or_hub_id: str | os.PathLike, **kwargs: Any):
    """A transformers *fast* tokenizer from a local directory or a hub id (network needed for hub ids).

    BORT's hub copy declares ``RobertaTokenizer``; it is loaded as ``RobertaTokenizerFast``. A directory with
    only ``vocab.txt`` (WordPiece) or ``vocab.json`` + ``merges.txt`` (byte-level BPE) works too, and so does a
    step checkpoint of a run (``RUN/checkpoints/N``: its ``tokenizer`` item), or a run directory without a
    finished model (its latest step).

    Raises:
      CheckpointError: no tokenizer files there, or the hub could not be reached.
    """
    from transformers import AutoTokenizer, BertTokenizerFast, RobertaTokenizerFast

    path = os.fspath(path_or_hub_id)
    if os.path.isdir(path):
        path = readers_orbax.finished_model_dir(path)
        files = set(os.listdir(path))
        step_dir = None if files & TOKENIZER_FILE_NAMES else readers_orbax.find_step_dir(path)
        if step_dir is not None:
            with tempfile.TemporaryDirectory(prefix="flax-narrow-tokenizer-") as tmp:
                readers_orbax.write_tokenizer_files(step_dir, tmp)
                tok = load_tokenizer(tmp, **kwargs)  # read into memory before tmp goes
            tok.name_or_path = path
            return tok
        if "tokenizer.json" not in files and "tokenizer_config.json" not in files:
            if "vocab.txt" in files:
                # transformers 5: vocab= (a dict) builds the tokenizer; vocab_file= would silently not.
                with open(os.path.join(path, "vocab.txt"), encoding="utf-8") as fh:
                    vocab = {line.rstrip("\n"): i for i, line in enumerate(fh)}
                return BertTokenizerFast(vocab=vocab, **kwargs)
            if {"vocab.json", "merges.txt"} <= files:
                return _roberta_from_files(path, RobertaTokenizerFast, **kwargs)
            raise CheckpointError(f"{path}: no tokenizer files (tokenizer.json, vocab.txt, or vocab.json+merges.txt)")
    elif not os.path.exists(path) and path.startswith((".", "/", "~")):
        raise CheckpointError(f"{path}: no such directory")
    try:
        tok = AutoTokenizer.from_pretrained(path, use_fast=True, **kwargs)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot load a tokenizer ({str(e).splitlines()[0]})") from None
    if not getattr(tok, "is_fast", False):
        raise CheckpointError(f"{path}: only a slow tokenizer is available; flax-narrow needs a fast one")
    return tok


def _roberta_from_files(path: str, cls: Any, **kwargs: Any):
    # transformers 5: vocab=/merges= build the right tokenizer; vocab_file=/merges_file= silently do not.
    with open(os.path.join(path, "vocab.json"), encoding="utf-8") as fh:
        vocab = json.load(fh)
    with open(os.path.join(path, "merges.txt"), encoding="utf-8") as fh:
        merges = [tuple(line.split()) for line in fh.read().splitlines() if line and not line.startswith("#version")]
    return cls(vocab=vocab, merges=merges, **kwargs)
