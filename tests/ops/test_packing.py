"""Sequence packing: a packed row computes exactly what each of its documents computes alone."""

import doctest

import jax.numpy as jnp
import numpy as np
import pytest

import flax_narrow as fn
from flax_narrow.ops import packing


def test_docstring_examples():
    assert doctest.testmod(packing, raise_on_error=False).failed == 0


def test_segment_mask_never_crosses_a_boundary():
    seg = jnp.array([[1, 1, 2, 2, 2, 0]])
    m = np.asarray(packing.segment_attention_mask(seg, seg))[0]
    assert m[:2, :2].all() and m[2:5, 2:5].all()
    assert not m[:2, 2:].any() and not m[2:5, :2].any() and not m[:, 5].any()


def _docs():
    rng = np.random.default_rng(0)
    return [rng.integers(5, 128, size=n).astype(np.int32) for n in (5, 7, 3)]


def _packed(docs, length):
    ids = np.zeros((1, length), np.int32)
    seg = np.zeros((1, length), np.int32)
    start, starts = 0, []
    for i, d in enumerate(docs):
        ids[0, start : start + len(d)] = d
        seg[0, start : start + len(d)] = i + 1
        starts.append(start)
        start += len(d)
    return ids, seg, starts


def _alone(docs, length):
    ids = np.zeros((len(docs), length), np.int32)
    for i, d in enumerate(docs):
        ids[i, : len(d)] = d
    return ids


@pytest.mark.parametrize("roberta", [False, True])
def test_packed_bert_equals_unpacked_rows(roberta):
    cfg = fn.EncoderConfig.tiny(initializer_range=0.2)
    if roberta:
        cfg = cfg.replace(pad_token_id=1, position_offset=2, model_type="roberta", max_position_embeddings=66)
    model = fn.BertModel.from_config(cfg, seed=0)
    docs, length = _docs(), 20
    ids, seg, starts = _packed(docs, length)
    alone = _alone(docs, length)
    mask = (alone != 0).astype(np.int32)
    if roberta:  # RoBERTa counts positions from pad_token_id + 1 = 2 and pads with its pad id
        alone = np.where(mask > 0, alone, 1)
    packed = model(ids, (seg > 0).astype(np.int32), segment_ids=seg).last_hidden_state
    ref = model(alone, mask).last_hidden_state
    for i, (d, s) in enumerate(zip(docs, starts)):
        np.testing.assert_allclose(packed[0, s : s + len(d)], ref[i, : len(d)], atol=1e-5)


@pytest.mark.parametrize("form", ["standard", "absorbed"])
def test_packed_narrowbert_mlm_equals_unpacked_rows(form):
    cfg = fn.EncoderConfig.tiny_narrowbert(initializer_range=0.2, narrow_attention=form)
    model = fn.BertForMaskedLM.from_config(cfg, seed=1)
    docs, length = _docs(), 20
    ids, seg, starts = _packed(docs, length)
    local = [[1, 3], [0, 4, 6], [2]]  # predicted tokens of each document
    pos = np.asarray([[s + p for s, ps in zip(starts, local) for p in ps]], np.int32)
    packed = model(
        ids, (seg > 0).astype(np.int32), segment_ids=seg, narrow_positions=pos, narrow_valid=np.ones_like(pos, bool)
    ).logits
    k = 0
    for i, d in enumerate(docs):
        alone = _alone([d], length)
        p = np.asarray([local[i]], np.int32)
        ref = model(alone, narrow_positions=p, narrow_valid=np.ones_like(p, bool)).logits
        np.testing.assert_allclose(packed[0, k : k + len(local[i])], ref[0], atol=1e-5)
        k += len(local[i])
    # without segment ids the documents would see each other: the check above can fail
    mixed = model(ids, (seg > 0).astype(np.int32), narrow_positions=pos, narrow_valid=np.ones_like(pos, bool)).logits
    assert not np.allclose(mixed, packed, atol=1e-3)
