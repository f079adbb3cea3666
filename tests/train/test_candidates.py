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
