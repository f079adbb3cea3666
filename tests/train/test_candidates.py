"""Candidates trained side by side (vmapped) equal the same candidates trained one by one."""

from __future__ import annotations

import finetune_helpers as H
import jax
import numpy as np
import pytest
from flax import nnx

from flax_narrow.config import EncoderConfig
from flax_narrow.train.candidates import Candidate, groups, train_sequential, train_side_by_side
from flax_narrow.train.finetune import FinetuneConfig, build_model
from flax_narrow.train.finetune_data import Encoder
from flax_narrow.train.tasks import Task


def _leaves(model):
    return [np.asarray(x) for x in jax.tree.leaves(nnx.state(model, nnx.Param))]


@pytest.mark.slow
@pytest.mark.parametrize("head", ["standard", "bort"])
def test_vmapped_candidates_equal_sequential(head):
    tok = H.tokenizer()
    task = Task("classification", ("neg", "pos"))
    data = Encoder(tok, max_length=16).encode(task, H.classification(np.random.default_rng(0), 48))
    mcfg = EncoderConfig.tiny(vocab_size=len(tok))

    def factory(seed):
        return build_model(task, mcfg, seed=seed)

    # Different lr / weight decay / warmup / seed (so init, dropout and data order differ too).
    cands = [
        Candidate(1e-3, 0.01, 0.1, 16, 0, 2),
        Candidate(3e-3, 0.1, 0.3, 16, 1, 2),
        Candidate(5e-4, 0.0, 0.5, 16, 2, 2),
    ]
    base = FinetuneConfig(head=head)
    side = train_side_by_side(factory, task, data, cands, base)
    seq = train_sequential(factory, task, data, cands, base)
    init = _leaves(factory(0))
    for a, b in zip(side, seq):
        la, lb = _leaves(a), _leaves(b)
        assert max(float(np.abs(x - y).max()) for x, y in zip(la, lb)) < 1e-5
    # The candidates really trained, and differently.
    assert max(float(np.abs(x - y).max()) for x, y in zip(_leaves(side[1]), init)) > 1e-2
    assert max(float(np.abs(x - y).max()) for x, y in zip(_leaves(side[1]), _leaves(side[2]))) > 1e-2


def test_groups_and_mismatch():
    cs = [Candidate(batch_size=8), Candidate(batch_size=16), Candidate(batch_size=8, seed=1)]
    assert [[c.batch_size for c in g] for g in groups(cs)] == [[8, 8], [16]]
    with pytest.raises(ValueError, match="share batch_size"):
        train_side_by_side(lambda s: None, Task("regression"), {"input_ids": np.zeros((2, 2))}, cs)


def _setup(n=32):
    tok = H.tokenizer()
    task = Task("classification", ("neg", "pos"))
    enc = Encoder(tok, max_length=16)
    rng = np.random.default_rng(0)
    data, dev = enc.encode(task, H.classification(rng, n)), enc.encode(task, H.classification(rng, 16))
    mcfg = EncoderConfig.tiny(vocab_size=len(tok))
    return task, data, dev, lambda seed: build_model(task, mcfg, seed=seed)


CANDS = [Candidate(1e-3, 0.01, 0.1, 8, 0, 1), Candidate(3e-3, 0.1, 0.3, 8, 1, 1)]


def test_side_by_side_on_eight_devices_equals_one_device():
    """data=8 and data=2 x fsdp=4 give the parameters and probe outputs of one device (8 simulated CPUs)."""
    from flax_narrow.train import sharding as shd
    from flax_narrow.train.config import MeshConfig
    from flax_narrow.train.finetune import MeshEvalStep, forward_fn, split_model

    assert jax.device_count() == 8  # tests/conftest.py
    task, data, dev, factory = _setup()
    base = FinetuneConfig(progress_bar=False)
    runs = {}
    for mc in (MeshConfig(1, 1, 1), MeshConfig(8, 1, 1), MeshConfig(2, 4, 1)):
        mesh = shd.make_mesh(mc)
        models = train_side_by_side(factory, task, data, CANDS, base, mesh=mesh)
        ev = MeshEvalStep(split_model(models[0])[0], forward_fn(task, "standard"), mesh)
        dev_in = {k: dev[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
        logits = [np.asarray(ev(*split_model(m)[1:], dev_in)) for m in models]
        runs[mc] = ([_leaves(m) for m in models], logits)
        if mc.fsdp == 4:  # the fsdp run really sharded the parameters
            emb = models[0].bert.embeddings.word_embeddings.embedding[...]
            assert shd.shard_fraction(emb) == 0.25
    (p1, l1), *others = runs.values()
    for pm, lm in others:
        for a, b in zip(p1, pm):
            for x, y in zip(a, b):
                np.testing.assert_allclose(y, x, rtol=1e-5, atol=1e-6)
        for x, y in zip(l1, lm):
            np.testing.assert_allclose(y, x, rtol=1e-5, atol=1e-6)
            assert (y.argmax(-1) == x.argmax(-1)).all()


def test_side_by_side_equals_sequential_on_a_mesh():
    from flax_narrow.train import sharding as shd
    from flax_narrow.train.config import MeshConfig

    task, data, _, factory = _setup()
    mesh = shd.make_mesh(MeshConfig(2, 4, 1))
    base = FinetuneConfig(progress_bar=False)
    side = train_side_by_side(factory, task, data, CANDS, base, mesh=mesh)
    seq = train_sequential(factory, task, data, CANDS, base, mesh=mesh)
    for a, b in zip(side, seq):
        for x, y in zip(_leaves(a), _leaves(b)):
            np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)


def test_repeated_groups_compile_once_through_the_aot_path(monkeypatch):
    from flax_narrow.train import candidates as cand_lib
    from flax_narrow.train import step as S

    monkeypatch.setattr(cand_lib, "_STEPS", {})  # as in a fresh process

    task, data, _, factory = _setup()
    calls = []
    real = S.aot_compile

    def spy(*a, **kw):
        calls.append(kw.get("name"))
        return real(*a, **kw)

    monkeypatch.setattr(S, "aot_compile", spy)
    base = FinetuneConfig(progress_bar=False)
    train_side_by_side(factory, task, data, CANDS, base)
    other = [Candidate(5e-4, 0.0, 0.5, 8, 2, 1), Candidate(2e-3, 0.01, 0.1, 8, 3, 1)]  # other θ, same shapes
    train_side_by_side(factory, task, data, other, base)  # a later round
    assert len(calls) == 1 and "candidates" in calls[0]


def _nan_factory(factory, bad_seed):
    def make(seed):
        model = factory(seed)
        if seed == bad_seed:
            k = model.classifier.kernel
            k.set_value(k[...] * np.nan)
        return model

    return make


def test_nonfinite_candidate_stops_with_the_shared_message_naming_it():
    from flax_narrow.errors import NonFiniteError

    task, data, _, factory = _setup()
    pattern = rf"candidate {CANDS[1].name}: non-finite training at step 1: .*gradients: .*Lower the learning rate"
    with pytest.raises(NonFiniteError, match=pattern):
        train_side_by_side(_nan_factory(factory, 1), task, data, CANDS, FinetuneConfig(progress_bar=False))


def test_nonfinite_candidate_is_skipped_with_skip(caplog):
    task, data, _, factory = _setup()
    base = FinetuneConfig(progress_bar=False, on_nonfinite="skip")
    with caplog.at_level("WARNING", logger="flax_narrow.train.candidates"):
        good, bad = train_side_by_side(_nan_factory(factory, 1), task, data, CANDS, base)
    assert f"candidate {CANDS[1].name}: step 1 non-finite loss/gradients; update skipped" in caplog.text
    assert CANDS[0].name not in caplog.text
    # The healthy candidate trained as it does alone; the broken one kept its initial parameters.
    (alone,) = train_sequential(factory, task, data, CANDS[:1], base)
    for x, y in zip(_leaves(good), _leaves(alone)):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
    for x, y in zip(_leaves(bad), _leaves(_nan_factory(factory, 1)(1))):
        np.testing.assert_array_equal(x, y)
