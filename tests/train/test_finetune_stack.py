"""Fine-tuning on the pretraining machinery: exact resume after an interruption (SIGINT included), metrics
without repeated rows, a mesh of 8 devices equal to 1 device, the non-finite guard naming parameters, and
nothing that looks finished after an interrupted first run."""

from __future__ import annotations

import json
import os
import signal

import finetune_helpers as H
import jax
import numpy as np
import pytest
from flax import nnx

from flax_narrow.config import EncoderConfig
from flax_narrow.train import finetune as F
from flax_narrow.train import sharding as shd
from flax_narrow.train.config import MeshConfig
from flax_narrow.train.finetune import FinetuneConfig, build_model, finetune
from flax_narrow.train.finetune_data import Encoder
from flax_narrow.train.metrics import read_jsonl
from flax_narrow.train.tasks import Task

TASK = Task("classification", ("neg", "pos"))


def _data(n=64, dev=32):
    tok = H.tokenizer()
    enc = Encoder(tok, max_length=16)
    rng = np.random.default_rng(0)
    return enc.encode(TASK, H.classification(rng, n)), enc.encode(TASK, H.classification(rng, dev))


def _model(seed=0):
    return build_model(TASK, EncoderConfig.tiny(vocab_size=len(H.tokenizer())), seed=seed)


def _params(model):
    return [np.asarray(x) for x in jax.tree.leaves(nnx.state(model, nnx.Param))]


CFG = FinetuneConfig(learning_rate=3e-3, epochs=2, batch_size=16, eval_batch_size=16, eval_every=3, progress_bar=False)
ONE = MeshConfig(1, 1, 1)


def test_interrupted_then_resumed_is_bit_exact_and_metrics_have_no_repeats(tmp_path):
    train, dev = _data()
    mesh = shd.make_mesh(ONE)
    full = finetune(_model(), TASK, train, dev, CFG, output_dir=str(tmp_path / "a"), mesh=mesh)
    part = finetune(_model(), TASK, train, dev, CFG, output_dir=str(tmp_path / "b"), mesh=mesh, stop_at=5)
    assert part.preempted and part.final_step == 5
    # An interrupted first run leaves nothing that looks finished.
    assert not os.path.exists(tmp_path / "b" / "summary.json") and not os.path.exists(tmp_path / "b" / "best")
    with pytest.raises(Exception, match="--resume"):
        finetune(_model(), TASK, train, dev, CFG, output_dir=str(tmp_path / "b"), mesh=mesh)
    again = finetune(_model(), TASK, train, dev, CFG, output_dir=str(tmp_path / "b"), mesh=mesh, resume=True)
    assert again.final_step == full.final_step == 8
    for x, y in zip(_params(full.model), _params(again.model)):
        np.testing.assert_array_equal(x, y)
    assert [h["accuracy"] for h in again.history] == [h["accuracy"] for h in full.history]
    assert [h["train_loss"] for h in again.history] == [h["train_loss"] for h in full.history]
    lines = [json.loads(x) for x in open(tmp_path / "b" / "metrics.jsonl")]
    keys = [(r["kind"], r["step"]) for r in lines]
    assert len(keys) == len(set(keys)), "a resumed run repeated metric rows"
    assert read_jsonl(str(tmp_path / "b" / "metrics.jsonl")).keys() == set(range(1, 9))
    assert os.path.isfile(tmp_path / "b" / "summary.json")


def test_sigint_saves_a_checkpoint_at_the_current_step(tmp_path, monkeypatch):
    """A real SIGINT (delivered to this process during the first evaluation) stops the run after saving."""
    train, dev = _data()
    real = F.evaluate
    calls = []

    def evaluate_then_interrupt(*a, **kw):
        calls.append(1)
        if len(calls) == 1:
            signal.raise_signal(signal.SIGINT)
        return real(*a, **kw)

    monkeypatch.setattr(F, "evaluate", evaluate_then_interrupt)
    out = str(tmp_path / "run")
    r = finetune(_model(), TASK, train, dev, CFG, output_dir=out, mesh=shd.make_mesh(ONE))
    assert r.preempted and r.stop_signal == signal.SIGINT and r.final_step == 3
    assert sorted(os.listdir(os.path.join(out, "checkpoints"))) == ["3"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored


def test_eight_devices_give_the_metrics_of_one(tmp_path):
    assert jax.device_count() == 8  # tests/conftest.py
    train, dev = _data()
    one = finetune(_model(), TASK, train, dev, CFG, mesh=shd.make_mesh(ONE))
    for mc in (MeshConfig(8, 1, 1), MeshConfig(2, 4, 1)):
        many = finetune(_model(), TASK, train, dev, CFG, mesh=shd.make_mesh(mc))
        for a, b in zip(one.history, many.history):
            np.testing.assert_allclose(a["train_loss"], b["train_loss"], rtol=1e-5)
            np.testing.assert_allclose(a["accuracy"], b["accuracy"], rtol=1e-5)
        for x, y in zip(_params(one.model), _params(many.model)):
            np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6)


def test_nonfinite_guard_names_the_parameters():
    from flax_narrow.train.loop import NonFiniteError

    train, dev = _data()
    model = _model()
    k = model.classifier.kernel
    k.set_value(k[...] * np.nan)
    pattern = r"non-finite training at step 1: .*gradients: .*word_embeddings.*Lower the learning rate"
    with pytest.raises(NonFiniteError, match=pattern):
        finetune(model, TASK, train, dev, CFG, mesh=shd.make_mesh(ONE))


def test_out_of_range_token_type_is_an_error_not_nan():
    from flax_narrow.errors import InputError

    train, dev = _data()
    train = {**train, "token_type_ids": np.ones_like(train["token_type_ids"])}
    bort_like = build_model(TASK, EncoderConfig.tiny(vocab_size=len(H.tokenizer()), type_vocab_size=1), seed=0)
    with pytest.raises(InputError, match=r"train: token type 1 is out of range for the model \(type_vocab_size=1\)"):
        finetune(bort_like, TASK, train, dev, CFG, mesh=shd.make_mesh(ONE))
