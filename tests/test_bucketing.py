"""Length bucketing: the plan's shapes and order, and the same fill_mask outputs as padding to max_length."""

import doctest

import numpy as np
import pytest
import transformers

import flax_narrow as fn
from flax_narrow import bucketing
from flax_narrow.errors import InputError


def test_docstring_examples():
    assert doctest.testmod(bucketing, raise_on_error=False).failed == 0


def test_plan_covers_every_example_once_in_fixed_shapes():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 129, size=203)
    plan = bucketing.plan_batches(lengths, batch_size=16, max_length=128)
    seen = np.concatenate([b.indices[: b.real] for b in plan])
    assert sorted(seen.tolist()) == list(range(203))
    for b in plan:
        assert b.indices.size == 16 and 1 <= b.real <= 16
        assert lengths[b.indices].max() <= b.length
        assert b.length in (16, 32, 64, 128)
        assert (b.indices[b.real :] == b.indices[0]).all()
        smaller = [x for x in (16, 32, 64, 128) if x < b.length]
        assert not smaller or lengths[b.indices[: b.real]].min() > smaller[-1]  # the smallest bucket that fits
    assert len({(b.indices.size, b.length) for b in plan}) == 4  # one shape per bucket
    assert [b.length for b in plan] == sorted(b.length for b in plan)


def test_pow2_last_batches():
    plan = bucketing.plan_batches([5] * 37, batch_size=16, max_length=64, last="pow2")
    assert [(b.indices.size, b.real) for b in plan] == [(16, 16), (16, 16), (8, 5)]


def test_in_input_order_restores_input_order():
    lengths = [30, 3, 70, 12, 31]
    plan = bucketing.plan_batches(lengths, batch_size=2, max_length=128)
    results = [np.asarray(lengths)[b.indices] * 10 for b in plan]
    assert [int(x) for x in bucketing.in_input_order(5, plan, results)] == [300, 30, 700, 120, 310]


def test_pad_rows():
    plan = bucketing.plan_batches([2, 3], batch_size=2, max_length=16)
    ids = bucketing.pad_rows([[7, 8], [4, 5, 6]], plan[0], pad_value=1)
    assert ids.tolist() == [[7, 8] + [1] * 14, [4, 5, 6] + [1] * 13]


@pytest.mark.parametrize(
    "kw,match",
    [
        (
            dict(lengths=[200], batch_size=4, max_length=128),
            "example 0 has 200 tokens, more than the largest bucket 128",
        ),
        (dict(lengths=[2], batch_size=0, max_length=128), "batch_size must be >= 1"),
        (dict(lengths=[2], batch_size=2, max_length=128, buckets=[64, 32]), "ascending"),
        (dict(lengths=[2], batch_size=2, max_length=128, last="half"), "last must be"),
    ],
)
def test_plan_errors(kw, match):
    with pytest.raises(InputError, match=match):
        bucketing.plan_batches(**kw)


@pytest.fixture(scope="module")
def wordpiece():
    from tokenizers import BertWordPieceTokenizer

    words = "the quick brown fox jumps over lazy dog narrow layers attend from selected rows to every token".split()
    wp = BertWordPieceTokenizer(lowercase=True)
    wp.train_from_iterator(
        [" ".join(words)] * 20, vocab_size=120, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    )
    vocab = wp.get_vocab()
    return transformers.BertTokenizerFast(vocab=dict(sorted(vocab.items(), key=lambda kv: kv[1])))


@pytest.mark.parametrize("narrow", [False, True])
def test_fill_mask_buckets_give_the_outputs_of_padding_to_max_length(wordpiece, narrow):
    words = "the quick brown fox jumps over lazy dog narrow layers attend from selected rows to every token".split()
    rng = np.random.default_rng(1)
    texts = []
    for n in [3, 5, 9, 14, 20, 26, 33, 40, 2, 7, 17, 45]:  # 5 to 47 tokens: buckets 16, 32, 64
        t = [words[i] for i in rng.integers(0, len(words), n)]
        for j in rng.choice(n, size=1 + n // 15, replace=False):
            t[j] = "[MASK]"
        texts.append(" ".join(t))
    make = fn.EncoderConfig.tiny_narrowbert if narrow else fn.EncoderConfig.tiny
    model = fn.BertForMaskedLM.from_config(make(vocab_size=len(wordpiece), initializer_range=0.3), seed=0)
    limit = model.config.max_position_embeddings
    bucketed = fn.fill_mask(model, wordpiece, texts, top_k=3, batch_size=4)
    padded = fn.fill_mask(model, wordpiece, texts, top_k=3, batch_size=len(texts), buckets=[limit])
    lengths = [len(r) for r in wordpiece(texts)["input_ids"]]
    assert len({b.length for b in bucketing.plan_batches(lengths, 4, limit)}) >= 3  # several buckets really used
    assert len(bucketed) == len(padded) == len(texts)
    for ours, ref in zip(bucketed, padded):
        assert len(ours) == len(ref)
        for o_mask, r_mask in zip(ours, ref):
            assert [d["token"] for d in o_mask] == [d["token"] for d in r_mask]
            assert [d["sequence"] for d in o_mask] == [d["sequence"] for d in r_mask]
            np.testing.assert_allclose([d["score"] for d in o_mask], [d["score"] for d in r_mask], atol=1e-5)
