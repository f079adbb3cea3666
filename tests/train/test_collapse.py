"""The collapse guard: detection, ranking, and its fields in fine-tuning records, summary.json and Agora rounds."""

from __future__ import annotations

import json
import logging
import math

import finetune_helpers as H
import numpy as np
import pytest

from flax_narrow.config import EncoderConfig
from flax_narrow.train import collapse
from flax_narrow.train.agora import AgoraConfig, CallableLabeller, run_agora
from flax_narrow.train.augment import TokenDropout
from flax_narrow.train.candidates import Candidate
from flax_narrow.train.finetune import FinetuneConfig, build_model, finetune
from flax_narrow.train.finetune_data import Encoder
from flax_narrow.train.tasks import Task


def test_one_class_predictions_are_collapsed():
    gold = np.array([0, 1] * 50)
    r = collapse.detect("classification", np.zeros(100, int), gold)
    assert r.collapsed and "100.0% of the 100 predictions are one class" in r.reason
    assert r.constant_accuracy == 0.5 and r.top_class_fraction == 1.0


def test_within_noise_of_constant_predictor_uses_binomial_standard_error():
    n, p0 = 400, 0.68  # MRPC-like: 68% positive
    gold = np.array([1] * int(n * p0) + [0] * (n - int(n * p0)))
    margin = 2 * math.sqrt(p0 * (1 - p0) / n)
    assert collapse.noise_margin(p0, n) == pytest.approx(margin)
    rng = np.random.default_rng(0)

    def with_accuracy(acc):
        pred = gold.copy()
        wrong = rng.choice(n, int(round(n * (1 - acc))), replace=False)
        pred[wrong] = 1 - pred[wrong]
        return pred

    near = collapse.detect("classification", with_accuracy(p0 + margin / 2), gold)
    assert near.collapsed and "within noise" in near.reason and near.top_class_fraction < 0.95
    far = collapse.detect("classification", with_accuracy(p0 + 2 * margin), gold)
    assert not far.collapsed and far.reason == ""
    # the band shrinks with the dev size: 2 points above p0 are noise on 100 rows
    assert collapse.noise_margin(p0, 100) == pytest.approx(2 * margin) and far.margin == pytest.approx(margin)


def test_skewed_gold_alone_does_not_flag_a_good_model():
    gold = np.array([0] * 970 + [1] * 30)
    assert not collapse.detect("classification", gold.copy(), gold).collapsed  # 97% one class, but all right


def test_regression_flat_predictions_and_unchecked_kinds():
    gold = np.linspace(0, 5, 50)
    assert collapse.detect("regression", np.full(50, 2.5), gold).collapsed
    assert not collapse.detect("regression", gold + 0.1, gold).collapsed
    assert collapse.detect("token", [0], [0]) is None and collapse.detect("classification", [], []) is None


def test_rank_puts_collapsed_candidates_after_healthy_ones():
    # MRPC: always "paraphrase" scores F1 0.81; a trained model with F1 0.78 must still win.
    gold = np.array([1] * 68 + [0] * 32)
    constant = collapse.detect("classification", np.ones(100, int), gold)
    trained = collapse.detect("classification", gold.copy(), gold)
    assert collapse.rank([0.81, 0.78, 0.5], [constant, trained, None]) == [1, 2, 0]
    assert collapse.rank([0.2, float("nan")], [None, None]) == [0, 1]


def _random_labels(rng, n, p_pos=0.75):
    return [
        {"text_a": e["text_a"], "label": "pos" if rng.random() < p_pos else "neg"} for e in H.classification(rng, n)
    ]


def test_finetune_records_and_summary_carry_the_flag(tmp_path, caplog):
    tok = H.tokenizer()
    task = Task("classification", ("neg", "pos"))
    enc = Encoder(tok, max_length=16)
    mcfg = EncoderConfig.tiny(vocab_size=len(tok))
    rng = np.random.default_rng(0)
    cfg = FinetuneConfig(learning_rate=3e-3, epochs=3, batch_size=32)
    # labels independent of the text, 75% "pos": a model can only learn the prior -> collapsed
    train, dev = enc.encode(task, _random_labels(rng, 128)), enc.encode(task, _random_labels(rng, 128))
    with caplog.at_level(logging.WARNING, logger="flax_narrow.train.collapse"):
        bad = finetune(build_model(task, mcfg, seed=0), task, train, dev, cfg, output_dir=str(tmp_path / "bad"))
    assert bad.collapsed and all(h["collapsed"] for h in bad.history)
    assert any("collapsed" in r.message for r in caplog.records)
    summary = json.load(open(tmp_path / "bad" / "summary.json"))
    assert summary["collapse"]["collapsed"] is True and summary["collapse"]["constant_accuracy"] > 0.6
    history = [json.loads(x) for x in open(tmp_path / "bad" / "history.jsonl")]
    assert all("collapse_margin" in h for h in history)
    # a learnable task: not flagged
    train, dev = enc.encode(task, H.classification(rng, 256)), enc.encode(task, H.classification(rng, 128))
    good = finetune(build_model(task, mcfg, seed=0), task, train, dev, FinetuneConfig(3e-3, epochs=4, batch_size=32))
    assert good.best_metric > 0.8 and not good.collapsed


@pytest.mark.slow
def test_agora_counts_collapsed_candidates_as_failed(tmp_path):
    tok = H.tokenizer()
    task = Task("classification", ("neg", "pos"))
    enc = Encoder(tok, max_length=16)
    mcfg = EncoderConfig.tiny(vocab_size=len(tok))
    rng = np.random.default_rng(1)
    train, dev = _random_labels(rng, 64), _random_labels(rng, 96)
    theta = [Candidate(3e-3, 0.01, 0.1, 16, s, 2) for s in (0, 1)]
    res = run_agora(
        task,
        enc,
        train,
        dev,
        theta,
        lambda seed: build_model(task, mcfg, seed=seed),
        TokenDropout(),
        CallableLabeller(lambda e: "pos"),  # the prior's label: accuracy ~0.75 on the probe part
        AgoraConfig(str(tmp_path), max_rounds=1, finetune=FinetuneConfig(eval_batch_size=32)),
        min_labeller_accuracy=0.5,
    )
    s0 = res.rounds[0]
    assert sorted(s0["collapsed"]) == sorted(c.name for c in theta) and s0["heldout_collapsed"]
