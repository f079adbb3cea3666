"""``flax-narrow finetune`` / ``agora`` on local JSONL files with a column map (the parser built from the
module's own ``register``, so the test does not depend on other sub-commands)."""

from __future__ import annotations

import argparse
import json
import os

import finetune_helpers as H
import numpy as np
import pytest

from flax_narrow.config import EncoderConfig
from flax_narrow.modeling.bert import BertForMaskedLM
from flax_narrow.train import finetune_cli


def _parser():
    p = argparse.ArgumentParser()
    finetune_cli.register(p.add_subparsers(dest="command"))
    return p


def _files(tmp_path):
    tok = H.tokenizer()
    tok_dir = tmp_path / "tok"
    os.makedirs(tok_dir)
    with open(tok_dir / "vocab.txt", "w") as fh:
        fh.write("\n".join(sorted(tok.get_vocab(), key=tok.get_vocab().get)) + "\n")
    rng = np.random.default_rng(0)
    paths = {}
    for split, n in (("train", 128), ("dev", 48), ("test", 8)):
        paths[split] = str(tmp_path / f"{split}.jsonl")
        with open(paths[split], "w") as fh:
            for e in H.classification(rng, n):
                fh.write(json.dumps({"sentence": e["text_a"], "y": e["label"]}) + "\n")
    return str(tok_dir), paths


@pytest.mark.slow
def test_finetune_and_agora_cli(tmp_path, capsys):
    tok_dir, paths = _files(tmp_path)
    common = ["--model", "tiny", "--tokenizer", tok_dir, "--train", paths["train"], "--dev", paths["dev"]]
    common += ["--column", "text_a=sentence", "--column", "label=y", "--max-length", "16", "--lr", "3e-3"]
    common += ["--batch-size", "16", "--epochs", "10"]
    out = str(tmp_path / "ft")
    args = _parser().parse_args(["finetune", *common, "--test", paths["test"], "--output-dir", out])
    assert args.func(args) == 0
    best = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert best["best_accuracy"] >= 0.9
    preds = [json.loads(x)["prediction"] for x in open(os.path.join(out, "predictions.jsonl"))]
    assert len(preds) == 8 and set(preds) <= {"neg", "pos"}
    mlm_dir = BertForMaskedLM.from_config(EncoderConfig.tiny(vocab_size=57), seed=0).save_pretrained(
        str(tmp_path / "mlm")
    )
    ag = ["agora", *common, "--mlm", mlm_dir, "--allow-untrained-mlm", "--labeller", os.path.join(out, "best")]
    ag += ["--rounds", "1"]
    args = _parser().parse_args([*ag, "--output-dir", str(tmp_path / "agora")])
    assert args.func(args) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["rounds"] == 1 and os.path.isfile(tmp_path / "agora" / "summary.md")
