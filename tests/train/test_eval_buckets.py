"""Fine-tuning evaluation runs sequence-level tasks in length buckets: the same outputs as full-length batches,
rows back in input order, far fewer tokens computed on short text."""

from __future__ import annotations

import finetune_helpers as H
import numpy as np
import pytest

from flax_narrow.config import EncoderConfig
from flax_narrow.train.finetune import (
    _evaluate,
    build_model,
    device_batch,
    eval_batches,
    forward_fn,
    make_eval_step,
    split_model,
)
from flax_narrow.train.finetune_data import Encoder, batches
from flax_narrow.train.tasks import Task


def _data(kind: str, n: int = 37):
    rng = np.random.default_rng(0)
    rows = getattr(H, kind)(rng, n)
    for i, r in enumerate(rows):  # lengths from 2 to ~40 tokens, in no order
        key = "context" if kind == "multiple_choice" else "text_a"
        r[key] = " ".join(r[key].split() * (1 + (i * 7) % 6))[: 4 * (2 + (i * 11) % 40)]
    return rows


def _full_length(task, ev, params, rest, data, batch_size):
    outs = []
    for b in batches(data, batch_size):
        outs.append(np.asarray(ev(params, rest, device_batch(b)))[: b["_n"]])
    return np.concatenate(outs)


@pytest.mark.parametrize(
    "kind,model_type",
    [
        ("classification", "narrow_bert"),
        ("classification", "bert"),
        ("regression", "bert"),
        ("multiple_choice", "bert"),
    ],  # fmt: skip
)
def test_bucketed_evaluation_gives_the_outputs_of_full_length_batches(kind, model_type):
    tok = H.tokenizer()
    rows = _data(kind)
    labels = ("neg", "pos") if kind == "classification" else ()
    task = Task(kind, labels)
    enc = Encoder(tok, 64, "single_sep")
    data = enc.encode(task, rows)
    cfg = EncoderConfig.tiny(vocab_size=len(tok), max_position_embeddings=64)
    if model_type == "narrow_bert":
        cfg = cfg.replace(model_type="narrow_bert", full_length_layers=1)
    model = build_model(task, cfg, seed=0)
    graphdef, params, rest = split_model(model)
    ev = make_eval_step(graphdef, forward_fn(task, "standard"))

    plan = eval_batches(task, data, 8)
    lengths = sorted({b["input_ids"].shape[-1] for b, _ in plan})
    assert len(lengths) > 1 and max(lengths) <= 64, lengths  # several static lengths, not all 64
    computed = sum(b["input_ids"].size for b, _ in plan)
    assert computed < 0.75 * data["input_ids"].size
    assert sorted(np.concatenate([i for _, i in plan]).tolist()) == list(range(len(rows)))

    _, pred, outs = _evaluate(task, ev, params, rest, data, 8)
    want = _full_length(task, ev, params, rest, data, 8)
    np.testing.assert_allclose(outs, want, atol=2e-5, rtol=1e-5)  # same rows, same order
    assert len(pred) == len(rows)


def test_token_tasks_keep_the_padded_length():
    tok = H.tokenizer()
    task = Task("token", ("O", "B-LOC", "I-LOC"))
    data = Encoder(tok, 32, "single_sep").encode(task, H.token(np.random.default_rng(0), 10))
    assert {b["input_ids"].shape[-1] for b, _ in eval_batches(task, data, 4)} == {32}
