"""BORT end to end through the CLI: a BORT-shaped checkpoint (type_vocab_size 1, byte-level BPE, pad id 1)
fine-tunes with ``--head bort`` and BORT's warmup on a single-sentence and on a sentence-pair task (no NaN,
above the majority class, collapse guard quiet), and Agora runs on it."""

from __future__ import annotations

import json
import math
import os

import finetune_helpers as H
import numpy as np
import pytest

from flax_narrow.cli import main
from flax_narrow.config import EncoderConfig
from flax_narrow.modeling.bert import BertForMaskedLM
from flax_narrow.tokenization import load_tokenizer
from flax_narrow.train.finetune_data import Encoder
from flax_narrow.train.tasks import Task


@pytest.fixture(scope="module")
def bort_dir(tmp_path_factory) -> str:
    """A tiny BORT-shaped MLM checkpoint with its own byte-level BPE tokenizer (vocab.json + merges.txt)."""
    from tokenizers import ByteLevelBPETokenizer

    d = str(tmp_path_factory.mktemp("bort"))
    rng = np.random.default_rng(0)
    corpus = [" ".join(s) for s in H.sentences(rng, 400)] + ["good bad good bad"] * 20
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(corpus, vocab_size=400, special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
    bpe_dir = str(tmp_path_factory.mktemp("bpe"))
    bpe.save_model(bpe_dir)  # vocab.json + merges.txt
    tok = load_tokenizer(bpe_dir)
    cfg = EncoderConfig.tiny_bort(vocab_size=len(tok), max_position_embeddings=64)
    assert cfg.type_vocab_size == 1 and cfg.pad_token_id == tok.pad_token_id == 1
    BertForMaskedLM.from_config(cfg, seed=0).save_pretrained(d)
    tok.save_pretrained(d)  # after the model (save_pretrained writes a fresh directory)
    return d


def _pairs(rng, n):
    """Sentence pairs, label 1 iff both start with the same word (of 6): needs both segments."""
    out = []
    for _ in range(n):
        a, b = list(rng.choice(H.WORDS[:6], 4)), list(rng.choice(H.WORDS[:6], 4))
        lab = int(rng.integers(2))
        if lab:
            b[0] = a[0]
        while not lab and b[0] == a[0]:
            b[0] = str(rng.choice(H.WORDS[:6]))
        out.append({"text_a": " ".join(a), "text_b": " ".join(b), "label": lab})
    return out


def _write(path, rows):
    with open(path, "w") as fh:
        for r in rows:
            fh.write(json.dumps(r) + "\n")
    return str(path)


def _data(tmp_path, make, n_train=256, n_dev=96):
    rng = np.random.default_rng(1)
    train, dev = make(rng, n_train), make(rng, n_dev)
    labels = [str(e["label"]) for e in dev]
    majority = max(labels.count(x) for x in set(labels)) / len(labels)
    return _write(tmp_path / "train.jsonl", train), _write(tmp_path / "dev.jsonl", dev), majority


BORT_RECIPE = ["--head", "bort", "--warmup-ratio", "0.4", "--weight-decay", "0.01", "--batch-size", "16"]


def _finetune(bort_dir, tmp_path, make, extra=(), epochs="20"):
    train, dev, majority = _data(tmp_path, make)
    out = str(tmp_path / "ft")
    argv = ["finetune", "--model", bort_dir, "--train", train, "--dev", dev, "--max-length", "24"]
    argv += [*BORT_RECIPE, "--lr", "1e-3", "--epochs", epochs, *extra, "--output-dir", out]
    assert main(argv) == 0
    history = [json.loads(x) for x in open(os.path.join(out, "history.jsonl"))]
    summary = json.load(open(os.path.join(out, "summary.json")))
    return history, summary, majority


@pytest.mark.slow
def test_bort_single_sentence_through_cli(bort_dir, tmp_path):
    history, summary, majority = _finetune(bort_dir, tmp_path, H.classification)
    assert all(math.isfinite(h["train_loss"]) for h in history)
    assert summary["best_metric"] >= majority + 0.2
    assert summary["collapse"]["collapsed"] is False and summary["config"]["head"] == "bort"


def test_bort_pair_formats_use_one_token_type(bort_dir):
    tok = load_tokenizer(bort_dir)
    task = Task("classification", ("0", "1"))
    ex = [{"text_a": "w1 w2", "text_b": "w3", "label": 1}]
    for fmt, seps in (("single_sep", ["</s>"]), ("double_sep", ["</s>", "</s>"])):
        b = Encoder(tok, max_length=16, pair_format=fmt, token_types=False).encode(task, ex)
        toks = tok.convert_ids_to_tokens(b["input_ids"][0][: b["attention_mask"][0].sum()].tolist())
        assert toks[0] == "<s>" and toks[-1] == "</s>" and toks.count("</s>") == 1 + len(seps)
        assert not b["token_type_ids"].any()  # one token type: BORT has no second segment embedding


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["single_sep", "double_sep"])
def test_bort_pair_task_through_cli(bort_dir, tmp_path, fmt):
    """A checkpoint with type_vocab_size 1: the pair's second segment must not index a token-type row that does
    not exist (the default single_sep format once gave it type 1)."""
    history, summary, majority = _finetune(bort_dir, tmp_path, _pairs, ["--pair-format", fmt], epochs="40")
    assert all(math.isfinite(h["train_loss"]) for h in history)
    assert summary["best_metric"] >= majority + 0.1
    assert summary["collapse"]["collapsed"] is False


@pytest.mark.slow
def test_agora_runs_on_bort(bort_dir, tmp_path, capsys):
    train, dev, _ = _data(tmp_path, _pairs, 128, 64)
    argv = ["agora", "--model", bort_dir, "--train", train, "--dev", dev, "--max-length", "24", *BORT_RECIPE]
    argv += ["--lr", "1e-3", "--epochs", "4", "--g", "swap", "--rounds", "1", "--output-dir", str(tmp_path / "ag")]
    assert main(argv) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["rounds"] == 1 and os.path.isfile(tmp_path / "ag" / "summary.md")
    state = json.load(open(tmp_path / "ag" / "round_000" / "state.json"))
    assert all(math.isfinite(s) for s in state["scores"].values()) and state["labeller_accuracy"] is not None
