"""Every task type end to end on small learnable data built here: the fine-tuned model beats the baseline."""

from __future__ import annotations

import json
import os

import finetune_helpers as H
import numpy as np
import pytest

from flax_narrow.config import EncoderConfig
from flax_narrow.train.finetune import FinetuneConfig, build_model, finetune
from flax_narrow.train.finetune_data import Encoder, infer_label_names, load_examples
from flax_narrow.train.tasks import Task

pytestmark = pytest.mark.slow  # ~15 s per task on a 2-core CPU (compile dominates)


def _run(kind, make, *, narrow=False, epochs=6, lr=3e-3, n=256, tmp=None, **cfg):
    tok = H.tokenizer()
    enc = Encoder(tok, max_length=24)
    rng = np.random.default_rng(0)
    tr, dv = make(rng, n), make(rng, 64)
    task = Task(kind, infer_label_names(kind, tr))
    mcfg = (EncoderConfig.tiny_narrowbert if narrow else EncoderConfig.tiny)(vocab_size=len(tok))
    model = build_model(task, mcfg, seed=0)
    conf = FinetuneConfig(learning_rate=lr, epochs=epochs, batch_size=32, **cfg)
    test = enc.encode(task, [{k: v for k, v in e.items() if k not in ("label", "tags")} for e in dv[:8]])
    return finetune(model, task, enc.encode(task, tr), enc.encode(task, dv), conf, output_dir=tmp, test=test)


@pytest.mark.parametrize("narrow", [False, True], ids=["bert", "narrowbert"])
def test_single_sentence_classification(narrow, tmp_path):
    r = _run("classification", H.classification, narrow=narrow, tmp=str(tmp_path))
    assert r.history[-1]["accuracy"] >= 0.95 and r.best_metric >= 0.95  # majority baseline ~0.5
    assert os.path.isfile(tmp_path / "best" / "config.json")
    preds = [json.loads(x) for x in open(tmp_path / "predictions.jsonl")]
    assert len(preds) == 8 and {p["prediction"] for p in preds} <= {"neg", "pos"}


def test_bort_head_and_early_stopping(tmp_path):
    r = _run("classification", H.classification, head="bort", lr=1e-3, epochs=20, patience=4, eval_every=8)
    assert r.best_metric >= 0.9
    assert r.history[-1]["step"] < 20 * 8  # stopped early


def test_pair_classification_format():
    tok = H.tokenizer()
    enc = Encoder(tok, max_length=12)
    task = Task("classification", ("0", "1"))
    b = enc.encode(task, [{"text_a": "w1 w2", "text_b": "w3", "label": 1}])
    ids = b["input_ids"][0][: b["attention_mask"][0].sum()]
    assert tok.convert_ids_to_tokens(ids.tolist()) == ["[CLS]", "w1", "w2", "[SEP]", "w3", "[SEP]"]
    assert b["token_type_ids"][0][:6].tolist() == [0, 0, 0, 0, 1, 1]
    r = _run("classification", H.pair, epochs=16)
    rng = np.random.default_rng(0)
    H.pair(rng, 256)
    dev = H.pair(rng, 64)  # the dev set _run builds
    majority = max(np.mean([e["label"] for e in dev]), 1 - np.mean([e["label"] for e in dev]))
    # The tiny model learns this cross-segment rule slowly (before the optimizer moved to optax it reached
    # 0.70 at one evaluation and 0.58-0.64 at the others): a margin over the majority, not a high score.
    assert r.best_metric >= majority + 0.05


def test_regression():
    r = _run("regression", H.regression)
    assert r.best_metric > 0.8


def test_multilabel():
    r = _run("multilabel", H.multilabel)
    assert r.best_metric >= 0.95


def test_multiple_choice():
    r = _run("multiple_choice", H.multiple_choice)
    assert r.best_metric >= 0.9  # chance 1/3


@pytest.mark.parametrize("narrow", [False, True], ids=["bert", "narrowbert"])
def test_token_classification_entity_f1(narrow):
    r = _run("token", H.token, narrow=narrow)
    assert r.best_metric >= 0.9


def test_question_answering():
    r = _run("qa", H.qa, epochs=25, lr=3e-3)
    assert r.best_metric > 0.6  # predicting any single word of the context scores ~0.125


def test_local_files_with_column_mapping(tmp_path):
    import pandas as pd

    rows = [{"sent": f"w{i} good", "y": "pos"} for i in range(3)] + [{"sent": "w1 bad", "y": "neg"}]
    for ext, write in (("csv", "to_csv"), ("jsonl", "to_json"), ("parquet", "to_parquet")):
        path = str(tmp_path / f"d.{ext}")
        kw = {"index": False} if ext != "jsonl" else {"orient": "records", "lines": True}
        getattr(pd.DataFrame(rows), write)(path, **kw)
        ex = load_examples(path, "train", "classification", {"text_a": "sent", "label": "y"})
        assert ex[0] == {"text_a": "w0 good", "label": "pos"} and len(ex) == 4


@pytest.mark.parametrize("fmt", ["single_sep", "double_sep"])
def test_truncation_fits_max_length(fmt):
    tok = H.tokenizer()
    enc = Encoder(tok, max_length=10, pair_format=fmt)
    long = " ".join(H.WORDS[:20])
    task = Task("classification", ("a",))
    b = enc.encode(task, [{"text_a": long}, {"text_a": long, "text_b": "w1 w2"}, {"text_a": "w1", "text_b": long}])
    assert b["attention_mask"].sum(1).tolist() == [10, 10, 10]
    toks = tok.convert_ids_to_tokens(b["input_ids"][1].tolist())
    seps = ["[SEP]"] * (2 if fmt == "double_sep" else 1)
    assert toks[0] == "[CLS]" and toks[-1] == "[SEP]" and toks[-3 - len(seps) : -3] == seps


def test_build_model_resolves_hub_ids_as_from_pretrained_does(tmp_path, monkeypatch):
    """A hub id goes through ``resolve_path`` (the resolver ``from_pretrained`` uses), not straight to a
    config.json read; a fake hub id mapped to a local directory stands in for the network."""
    import flax_narrow.pretrained as pretrained
    from flax_narrow.errors import CheckpointError
    from flax_narrow.modeling import NarrowBertForMaskedLM

    local = NarrowBertForMaskedLM.from_config(EncoderConfig.tiny_narrowbert(), seed=0).save_pretrained(tmp_path / "c")
    task = Task("classification", ("neg", "pos", "mixed"))
    with pytest.raises(CheckpointError, match="org/name: not a local path, and downloading it from the hub failed"):
        build_model(task, "org/name")  # offline (conftest): the resolver's error, not "no config.json"
    asked = []
    real = pretrained.resolve_path

    def fake_hub(path, **kw):
        asked.append(os.fspath(path))
        return local if os.fspath(path) == "org/name" else real(path, **kw)

    monkeypatch.setattr(pretrained, "resolve_path", fake_hub)
    model = build_model(task, "org/name", seed=1)
    assert asked and asked[0] == "org/name"
    assert type(model).__name__ == "NarrowBertForSequenceClassification"
    assert model.config.label_names == ("neg", "pos", "mixed") and model.config.is_narrow
    assert type(build_model(task, local)).__name__ == "NarrowBertForSequenceClassification"  # a local directory
