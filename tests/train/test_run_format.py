"""One run format: a pretraining run directory is a checkpoint (config, weights, tokenizer) that every command
reads; a resumed run keeps its own tokenizer; the CLI alone goes pretrain -> finetune -> export -> transformers."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from train_helpers import small_overrides

from flax_narrow.cli import main
from flax_narrow.train.config import load_config
from flax_narrow.train.data import tokenizer_fingerprint
from flax_narrow.train.loop import pretrain


def test_save_pretrained_writes_beside_what_the_directory_holds(tmp_path):
    from flax_narrow.config import EncoderConfig
    from flax_narrow.modeling import BertForMaskedLM

    d = tmp_path / "ckpt"
    d.mkdir()
    (d / "tokenizer.json").write_text("{}")
    (d / "README.md").write_text("mine")
    BertForMaskedLM.from_config(EncoderConfig.tiny(), seed=0).save_pretrained(d)
    BertForMaskedLM.from_config(EncoderConfig.tiny(), seed=1).save_pretrained(d)  # again: replaced in place
    assert sorted(os.listdir(d)) == ["README.md", "config.json", "flax_model.safetensors", "tokenizer.json"]
    assert (d / "README.md").read_text() == "mine"


@pytest.mark.slow
def test_resumed_run_keeps_its_tokenizer_with_a_fresh_data_cache(tmp_path, data_cache):
    out = str(tmp_path / "run")
    over = small_overrides(data_cache, **{"train.steps": 4, "checkpoint.every_steps": 2, "output_dir": out})
    first = pretrain(load_config("tiny", None, over), stop_at=2)
    saved = os.path.join(out, "tokenizer")
    assert os.path.isfile(os.path.join(saved, "tokenizer.json"))
    assert not os.path.exists(os.path.join(out, "config.json"))  # not finished: no model in the run directory yet
    fresh = small_overrides(str(tmp_path / "fresh-cache"), **{"train.steps": 4, "output_dir": out})
    second = pretrain(load_config("tiny", None, [*fresh, "checkpoint.resume=true"]))
    assert tokenizer_fingerprint(second.tokenizer) == tokenizer_fingerprint(first.tokenizer)
    assert second.start_step == 2 and second.final_step == 4
    # Finished: the run directory is a checkpoint with its tokenizer.
    from flax_narrow.inference import fill_mask
    from flax_narrow.modeling import NarrowBertForMaskedLM
    from flax_narrow.tokenization import load_tokenizer

    model = NarrowBertForMaskedLM.from_pretrained(out)
    tok = load_tokenizer(out)
    assert tokenizer_fingerprint(tok) == tokenizer_fingerprint(first.tokenizer)
    got = fill_mask(model, tok, [f"the {tok.mask_token} of the"], top_k=2)
    assert len(got[0][0]) == 2
    # A different tokenizer is refused on resume.
    other = tmp_path / "other-tok"
    other.mkdir()
    (other / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "b"]) + "\n")
    with pytest.raises(Exception, match="not the tokenizer this run was trained with"):
        pretrain(load_config("tiny", None, [*fresh, "checkpoint.resume=true", f"data.tokenizer={other}"]))


@pytest.mark.slow
def test_cli_pretrain_finetune_export_transformers(tmp_path, data_cache, capsys):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    run = str(tmp_path / "pre")
    sets = small_overrides(data_cache, **{"train.steps": 3, "model.full_length_layers": "null"})
    argv = ["pretrain", "--preset", "tiny-bert", "--output-dir", run]
    for s in sets:
        argv += ["--set", s]
    assert main(argv) == 0
    assert main(["inspect", run]) == 0  # the run directory is a checkpoint every command reads
    rng = np.random.default_rng(0)
    words = ["good", "bad", "the", "of", "and", "a", "to", "in"]
    train = tmp_path / "train.csv"
    rows = ["sentence,y"] + [
        f"{' '.join(rng.choice(words, 5))} {'good' if i % 2 else 'bad'},{'pos' if i % 2 else 'neg'}" for i in range(64)
    ]
    train.write_text("\n".join(rows) + "\n")
    ft = str(tmp_path / "ft")
    argv = ["finetune", "--model", run, "--train", str(train), "--column", "text_a=sentence", "--column", "label=y"]
    argv += ["--max-length", "16", "--epochs", "1", "--batch-size", "8", "--eval-batch-size", "8", "--no-progress"]
    assert main([*argv, "--output-dir", ft]) == 0
    summary = json.load(open(os.path.join(ft, "summary.json")))
    assert summary["metric"] == "accuracy"
    hf = str(tmp_path / "hf")
    assert main(["export", os.path.join(ft, "best"), hf]) == 0
    model = AutoModelForSequenceClassification.from_pretrained(hf)
    tok = AutoTokenizer.from_pretrained(hf)
    with torch.no_grad():
        logits = model(**tok(["the good of"], return_tensors="pt")).logits
    assert logits.shape == (1, 2) and torch.isfinite(logits).all()
    assert model.config.id2label == {0: "neg", 1: "pos"}
