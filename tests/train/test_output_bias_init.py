"""``train.output_bias_init=unigram``: the MLM bias starts at the training rows' log-frequencies."""

import math

import numpy as np
import pytest
from train_helpers import small_overrides

from flax_narrow.errors import ConfigError
from flax_narrow.train import data as D
from flax_narrow.train.config import load_config
from flax_narrow.train.loop import build_pipeline, pretrain
from flax_narrow.train.sharding import make_mesh


def test_unigram_log_probs_of_known_counts():
    # ids 3, 3, 3, 4 counted; 0 (padding) and 1 (a special) excluded; alpha 0.5 over a vocabulary of 6
    rows = np.array([[1, 3, 3, 0], [1, 3, 4, 0]])
    got = D.unigram_log_probs(rows, 6, exclude=[0, 1])
    counts = np.array([0, 0, 0, 3, 1, 0]) + 0.5
    want = np.log(counts / counts.sum())
    np.testing.assert_allclose(got, want - want.mean(), rtol=1e-6)
    assert abs(float(got.mean())) < 1e-6


def _first_loss(data_cache, init):
    cfg = load_config("tiny", None, small_overrides(data_cache, **{"train.steps": 1, "train.output_bias_init": init}))
    return cfg, pretrain(cfg).history[0]["loss"]


def test_the_first_loss_starts_at_the_unigram_plateau(data_cache):
    cfg, loss = _first_loss(data_cache, "unigram")
    _, loss_zeros = _first_loss(data_cache, "zeros")
    pipe = build_pipeline(cfg, make_mesh(cfg.mesh))
    rows = pipe.train_source.rows(0, len(pipe.train_source))
    special = sorted(set(pipe.masking.special_token_ids) | {pipe.masking.pad_token_id})
    ids = rows[~np.isin(rows, special)]
    logp = D.unigram_log_probs(rows, cfg.model.vocab_size, special)
    logq = logp - np.log(np.exp(logp.astype(np.float64)).sum())
    plateau = float(-logq[ids].mean())  # the training tokens' cross-entropy under those frequencies
    v = cfg.model.vocab_size
    assert loss_zeros == pytest.approx(math.log(v), abs=0.3)  # BERT's zero bias: about uniform over the vocab
    assert loss == pytest.approx(plateau, abs=0.5)  # one batch of masked tokens, a random model on top
    assert loss < loss_zeros - 0.5


@pytest.mark.parametrize(
    ("sets", "says"),
    [
        ({"train.output_bias_init": "ones"}, "output_bias_init 'ones' is not one of"),
        ({"train.output_bias_init": "unigram", "data.streaming": "true"}, "needs data.streaming=false"),
        ({"train.output_bias_init": "unigram", "checkpoint.init_from": "/tmp/x"}, "brings its own bias"),
    ],
)
def test_bad_settings_are_refused(data_cache, sets, says):
    with pytest.raises(ConfigError, match=says):
        load_config("tiny", None, small_overrides(data_cache, **sets))
