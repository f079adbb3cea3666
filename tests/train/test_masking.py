"""On-device BERT masking: which tokens, how many, 80/10/10, exact P slots, ascending positions, determinism."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flax_narrow.ops.gather import gather_rows
from flax_narrow.train.masking import MaskingSpec, expected_predictions, mask_tokens

PAD, UNK, CLS, SEP, MASK = 0, 1, 2, 3, 4
SPEC = MaskingSpec(
    max_predictions=12,
    vocab_size=500,
    mask_token_id=MASK,
    pad_token_id=PAD,
    special_token_ids=(PAD, UNK, CLS, SEP, MASK),
)


def _batch(rng, rows=64, length=128):
    ids = rng.integers(5, 500, size=(rows, length)).astype(np.int32)
    ids[:, 0] = CLS
    ids[:, -1] = SEP
    for r in range(rows):  # variable padding, separators and unknown tokens inside the rows
        n = rng.integers(6, length)
        ids[r, n:] = PAD
        ids[r, n - 1] = SEP
        ids[r, rng.integers(1, n - 1)] = SEP
        ids[r, rng.integers(1, n - 1)] = UNK
    ids[1, 1:] = PAD  # a row with no maskable token
    ids[1, 1] = SEP
    return ids


@pytest.fixture(scope="module")
def masked():
    ids = _batch(np.random.default_rng(0))
    fn = jax.jit(lambda i, k: mask_tokens(i, k, SPEC))
    out = [jax.device_get(fn(jnp.asarray(ids), jax.random.key(s))) for s in range(40)]
    return ids, out, fn


def test_slots_positions_and_labels(masked):
    ids, outs, _ = masked
    want = expected_predictions(ids, SPEC)
    assert want[1] == 0 and want.max() == SPEC.max_predictions  # long rows hit the budget P
    special = np.isin(ids, [PAD, UNK, CLS, SEP, MASK])
    for mb in outs:
        pos, valid, labels = np.asarray(mb.positions), np.asarray(mb.valid), np.asarray(mb.labels)
        assert pos.shape == valid.shape == labels.shape == (ids.shape[0], SPEC.max_predictions)
        np.testing.assert_array_equal(valid.sum(1), want)  # exactly round(15%) of the maskable, at most P
        for r in range(ids.shape[0]):
            p = pos[r, valid[r]]
            assert np.all(np.diff(p) > 0)  # ascending, no repeats (what the narrow gather wants)
            assert not special[r, p].any()  # never CLS/SEP/PAD/UNK
            np.testing.assert_array_equal(labels[r, valid[r]], ids[r, p])
            assert np.all(pos[r, ~valid[r]] == 0)
        np.testing.assert_array_equal(np.asarray(mb.attention_mask), ids != PAD)


def test_80_10_10_and_untouched_tokens(masked):
    ids, outs, _ = masked
    kinds = np.zeros(3)
    chosen_freq = np.zeros(ids.shape, float)
    for mb in outs:
        new = np.asarray(mb.input_ids)
        pos, valid = np.asarray(mb.positions), np.asarray(mb.valid)
        sel = np.zeros(ids.shape, bool)
        for r in range(ids.shape[0]):
            sel[r, pos[r, valid[r]]] = True
        np.testing.assert_array_equal(new[~sel], ids[~sel])  # only selected tokens change
        kinds += [(new[sel] == MASK).sum(), ((new[sel] != MASK) & (new[sel] != ids[sel])).sum(), 0]
        kinds[2] += (new[sel] == ids[sel]).sum()
        chosen_freq += sel
    frac = kinds / kinds.sum()
    # ~19k selections: 80/10/10 within a few standard errors (random ids equal the original 0.2% of the time)
    assert abs(frac[0] - 0.8) < 0.015 and abs(frac[1] - 0.1) < 0.012 and abs(frac[2] - 0.1) < 0.012, frac
    # Selection is uniform over a row's maskable tokens: no position is favoured.
    short = [r for r in range(ids.shape[0]) if 0 < expected_predictions(ids[r : r + 1], SPEC)[0] < SPEC.max_predictions]
    per_pos = np.concatenate([chosen_freq[r][~np.isin(ids[r], [PAD, UNK, CLS, SEP, MASK])] for r in short])
    assert per_pos.std() / per_pos.mean() < 0.6


def test_deterministic_in_the_key_and_independent_of_sharding(masked):
    ids, outs, fn = masked
    again = jax.device_get(fn(jnp.asarray(ids), jax.random.key(0)))
    np.testing.assert_array_equal(np.asarray(again.input_ids), np.asarray(outs[0].input_ids))
    assert not np.array_equal(np.asarray(outs[0].positions), np.asarray(outs[1].positions))
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    sharded = jax.device_put(jnp.asarray(ids), jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data")))
    out8 = jax.device_get(fn(sharded, jax.random.key(0)))
    for a, b in zip(jax.tree.leaves(out8), jax.tree.leaves(outs[0])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_positions_feed_the_narrow_gather(masked):
    ids, outs, _ = masked
    mb = outs[0]
    np.testing.assert_array_equal(
        np.where(mb.valid, gather_rows(jnp.asarray(ids), jnp.asarray(mb.positions)), -1),
        np.where(mb.valid, mb.labels, -1),
    )
