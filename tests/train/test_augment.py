"""Agora's roles checked: g refuses an untrained MLM (structurally and by its fit on the task's text), g has
MLM-free alternatives, S must reach 2/3 on the probe part, and S defaults to the previous round's best."""

from __future__ import annotations

import json
import os

import finetune_helpers as H
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from flax_narrow.config import EncoderConfig
from flax_narrow.errors import LabellerError, UntrainedModelError
from flax_narrow.modeling.bert import BertForMaskedLM
from flax_narrow.train import augment
from flax_narrow.train.agora import AgoraConfig, CallableLabeller, MLMInfill, run_agora
from flax_narrow.train.candidates import Candidate
from flax_narrow.train.finetune import FinetuneConfig, build_model
from flax_narrow.train.finetune_data import Encoder
from flax_narrow.train.labeller import PreviousBestLabeller, check_labeller
from flax_narrow.train.tasks import Task


def _structured_texts(n: int, rng) -> list[str]:
    """Runs of consecutive words (w3 w4 w5 ...): a masked word is predictable from its neighbours."""
    out = []
    for _ in range(n):
        start = int(rng.integers(0, 30))
        out.append(" ".join(f"w{start + j}" for j in range(8)))
    return out


def _trained_mlm(tok, texts, steps=150):
    """A tiny MLM trained briefly (15% masking) on ``texts``."""
    model = BertForMaskedLM.from_config(EncoderConfig.tiny(vocab_size=len(tok)), seed=0)
    ids = np.asarray(tok(texts, padding="max_length", max_length=12)["input_ids"], np.int32)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tx = optax.adam(3e-3)
    opt = tx.init(params)

    @jax.jit
    def step(params, opt, batch, labels):
        def lf(p):
            return nnx.merge(graphdef, p, rest, copy=True)(batch, batch != tok.pad_token_id, labels=labels).loss

        loss, g = jax.value_and_grad(lf)(params)
        upd, opt = tx.update(g, opt, params)
        return optax.apply_updates(params, upd), opt

    rng = np.random.default_rng(0)
    for _ in range(steps):
        b = ids[rng.integers(0, len(ids), 32)].copy()
        sel = (rng.random(b.shape) < 0.15) & ~np.isin(b, tok.all_special_ids)
        labels = np.where(sel, b, -100)
        b[sel] = tok.mask_token_id
        params, opt = step(params, opt, jnp.asarray(b), jnp.asarray(labels))
    return nnx.merge(graphdef, params, rest)


def test_untrained_mlm_head_is_refused_unless_allowed():
    tok = H.tokenizer()
    fresh = BertForMaskedLM.from_config(EncoderConfig.tiny(vocab_size=len(tok)), seed=0)
    assert augment.head_is_fresh(fresh)
    with pytest.raises(UntrainedModelError, match="MLM head of this BertForMaskedLM is untrained"):
        MLMInfill(fresh, tok, max_length=16)
    MLMInfill(fresh, tok, max_length=16, allow_untrained=True)  # told otherwise: accepted
    with pytest.raises(UntrainedModelError, match="no MLM head"):
        augment.check_mlm_head(build_model(Task("classification", ("a", "b")), EncoderConfig.tiny(vocab_size=57)))


def test_infiller_fit_separates_trained_from_random_heads():
    tok = H.tokenizer()
    rng = np.random.default_rng(0)
    texts = _structured_texts(256, rng)
    trained = _trained_mlm(tok, texts)
    assert not augment.head_is_fresh(trained)
    model_ce, unigram_ce = augment.check_infiller(trained, tok, texts[:64], max_length=12)
    assert model_ce < unigram_ce
    # a random head with non-trivial values (like the HF copy of BORT): passes the structural check only
    noisy = BertForMaskedLM.from_config(EncoderConfig.tiny(vocab_size=len(tok)), seed=1)
    bias = noisy.cls.predictions.bias
    bias.set_value(jax.random.normal(jax.random.key(0), bias.shape) * 0.5)
    g = MLMInfill(noisy, tok, max_length=12)
    with pytest.raises(UntrainedModelError, match=r"no better than their unigram distribution \(cross-entropy"):
        g.check(texts[:64])
    MLMInfill(noisy, tok, max_length=12, allow_untrained=True).check(texts[:64])  # skipped when allowed


def test_run_agora_refuses_a_random_infiller_before_training(tmp_path):
    tok = H.tokenizer()
    task = Task("classification", ("neg", "pos"))
    rng = np.random.default_rng(0)
    noisy = BertForMaskedLM.from_config(EncoderConfig.tiny(vocab_size=len(tok)), seed=1)
    noisy.cls.predictions.bias.set_value(jnp.full(noisy.cls.predictions.bias.shape, 0.1))
    with pytest.raises(UntrainedModelError):
        run_agora(task, Encoder(tok, max_length=16), H.classification(rng, 32), H.classification(rng, 32),
                  [Candidate()], lambda s: None, MLMInfill(noisy, tok, max_length=16),
                  CallableLabeller(lambda e: "pos" if "good" in e["text_a"].split() else "neg"),
                  AgoraConfig(str(tmp_path / "a")))  # fmt: skip
    assert not os.path.exists(tmp_path / "a")


def test_token_dropout_and_span_swap():
    rng = np.random.default_rng(0)
    ex = {"text_a": "a b c d e f g h", "text_b": "x y z", "label": "pos"}
    drops = augment.TokenDropout(0.3)(ex, 5, rng)
    assert len(drops) == 5 and all("label" not in d for d in drops)
    for d in drops:
        words = d["text_a"].split()
        assert 1 <= len(words) < 8 and set(words) <= set("abcdefgh")
        assert words == sorted(words)  # order kept, words only deleted
    swaps = augment.SpanSwap(3)(ex, 5, rng)
    for s in swaps:
        assert sorted(s["text_a"].split()) == list("abcdefgh") and s["text_a"] != ex["text_a"]
        assert sorted(s["text_b"].split()) == list("xyz")
    assert augment.TokenDropout()({"text_a": "one"}, 2, rng) == [{"text_a": "one"}] * 2
    with pytest.raises(ValueError, match="rate"):
        augment.TokenDropout(1.0)


def test_labeller_below_two_thirds_is_refused_with_its_accuracy(tmp_path):
    tok = H.tokenizer()
    task = Task("classification", ("neg", "pos"))
    enc = Encoder(tok, max_length=16)
    rng = np.random.default_rng(0)
    probe = H.classification(rng, 60)
    wrong = CallableLabeller(lambda e: "neg" if "good" in e["text_a"].split() else "pos")  # always wrong
    with pytest.raises(LabellerError, match=r"accuracy 0\.0000 on the 60 probe examples, below the required 0\.6667"):
        check_labeller(wrong, task, enc, probe)
    right = CallableLabeller(lambda e: "pos" if "good" in e["text_a"].split() else "neg")
    assert check_labeller(right, task, enc, probe) == 1.0
    with pytest.raises(LabellerError, match="accuracy 0.0000"):
        run_agora(task, enc, H.classification(rng, 32), H.classification(rng, 32), [Candidate()], lambda s: None,
                  augment.TokenDropout(), wrong, AgoraConfig(str(tmp_path / "a")))  # fmt: skip
    assert not os.path.exists(tmp_path / "a")


@pytest.mark.slow
def test_default_labeller_is_previous_round_best(tmp_path):
    tok = H.tokenizer()
    task = Task("classification", ("neg", "pos"))
    enc = Encoder(tok, max_length=16)
    rng = np.random.default_rng(0)
    mcfg = EncoderConfig.tiny(vocab_size=len(tok))
    theta = [Candidate(3e-3, 0.01, 0.1, 16, s, 4) for s in (0, 1)]
    res = run_agora(
        task, enc, H.classification(rng, 128), H.classification(rng, 96), theta,
        lambda seed: build_model(task, mcfg, seed=seed), augment.SpanSwap(), None,
        AgoraConfig(str(tmp_path), finetune=FinetuneConfig(eval_batch_size=32)),
    )  # fmt: skip
    r0, r1 = res.rounds[0], res.rounds[1]
    # round 0: S is the round's own best (its probe score); round 1: round 0's best, so S's accuracy is r0's probe
    assert r0["labeller_accuracy"] == pytest.approx(r0["probe"])
    assert r1["labeller_accuracy"] == pytest.approx(r0["probe"])
    added = [json.loads(x) for x in open(tmp_path / "round_001" / "added.jsonl")]
    assert all(a["label"] in ("neg", "pos") for a in added) and len(added) == r1["added"]
    assert isinstance(PreviousBestLabeller(task, enc), PreviousBestLabeller)


def test_agora_cli_refuses_untrained_mlm_with_one_line(tmp_path, capsys):
    from flax_narrow.cli import main

    tok = H.tokenizer()
    tok_dir = tmp_path / "tok"
    os.makedirs(tok_dir)
    with open(tok_dir / "vocab.txt", "w") as fh:
        fh.write("\n".join(sorted(tok.get_vocab(), key=tok.get_vocab().get)) + "\n")
    rows = H.classification(np.random.default_rng(0), 32)
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    mlm = BertForMaskedLM.from_config(EncoderConfig.tiny(vocab_size=len(tok)), seed=0)
    mlm_dir = mlm.save_pretrained(str(tmp_path / "mlm"))
    argv = [
        "agora",
        "--model",
        "tiny",
        "--max-length",
        "32",
        "--tokenizer",
        str(tok_dir),
        "--train",
        str(path),
        "--dev",
        str(path),
    ]
    argv += ["--mlm", mlm_dir, "--output-dir", str(tmp_path / "out")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if "error:" in x]
    assert len(lines) == 1 and "MLM head" in lines[0] and "untrained" in lines[0] and "Traceback" not in err
