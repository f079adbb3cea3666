"""The data pipeline: corpus, tokenizer, packing, on-disk cache, grain sharding/resume, streaming."""

import json
import os

import numpy as np
import pytest

from flax_narrow.errors import ConfigError
from flax_narrow.train import data as D
from flax_narrow.train.config import DataConfig

CLS, SEP, PAD = 2, 3, 0


def test_pack_token_lists_keeps_every_token_in_order():
    docs = [[10, 11, 12], [], [13, 14, 15, 16, 17, 18, 19], [20]]
    rows = D.pack_token_lists(docs, 6, CLS, SEP, PAD)
    assert rows.dtype == np.int32 and rows.shape[1] == 6
    assert np.all(rows[:, 0] == CLS)
    stream = [t for r in rows for t in r[1:] if t != PAD]
    # Each row ends with SEP; document boundaries add a SEP into the stream.
    body = [t for r in rows for t in r[1:][: -1 if r[-1] != PAD else None]]
    assert [t for t in body if t not in (SEP, PAD)] == [10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20]
    assert stream.count(SEP) >= 3 and rows[-1, -1] == PAD  # only the last row is padded
    assert np.all(rows[:-1] != PAD)
    assert D.pack_token_lists([[], []], 6, CLS, SEP, PAD).shape == (0, 6)


def _rows(n=50, length=8):
    return [np.full(length, i, np.int32) for i in range(n)]


@pytest.mark.parametrize("count", [1, 2, 4])
def test_hosts_together_feed_the_single_host_batches(count):
    source, accum, micro = _rows(), 2, 8
    single = D.to_iterator(D.train_dataset(source, seed=3, accum=accum, shard=D.HostShard(0, 1, micro)), 0)
    hosts = [
        D.to_iterator(D.train_dataset(source, seed=3, accum=accum, shard=D.HostShard(h, count, micro // count)), 2)
        for h in range(count)
    ]
    seen = []
    for _ in range(9):  # crosses epoch boundaries (50 rows, 16 per step): reshuffled each epoch
        want = next(single)
        got = np.concatenate([next(h) for h in hosts], axis=1)
        assert want.shape == (accum, micro, 8)
        np.testing.assert_array_equal(got, want)
        seen.append(want[:, :, 0].ravel())
    first_epoch = np.concatenate(seen)[:48]
    assert len(set(first_epoch.tolist())) == 48  # a permutation: no row twice within an epoch
    assert not np.array_equal(first_epoch, np.arange(48))  # and shuffled
    for it in [single, *hosts]:
        it.close()


def test_iterator_state_resumes_exactly():
    ds = D.train_dataset(_rows(), seed=0, accum=1, shard=D.HostShard(0, 1, 4))
    it = D.to_iterator(ds, 3)
    for _ in range(5):
        next(it)
    state = it.get_state()
    rest = [next(it) for _ in range(7)]
    again = D.to_iterator(ds, 3)
    again.set_state(state)
    for a, b in zip(rest, [next(again) for _ in range(7)]):
        np.testing.assert_array_equal(a, b)
    it.close()
    again.close()


def _write_corpus(tmp_path, n=60):
    docs = [f"document {i} talks about topic {i % 7} and the number {i * 13}." for i in range(n)]
    txt = tmp_path / "c.txt"
    txt.write_text("\n\n".join(docs) + "\n")
    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    import datasets

    datasets.Dataset.from_dict({"text": docs}).to_parquet(str(tmp_path / "c.parquet"))
    return docs


def test_local_files_in_three_formats_and_the_cache(tmp_path):
    docs = _write_corpus(tmp_path)
    cache = str(tmp_path / "cache")
    texts = {}
    for ext in ("txt", "jsonl", "parquet"):
        cfg = DataConfig(source="files", files=(str(tmp_path / f"c.{ext}"),), eval_fraction=0.0)
        train, ev = D.load_documents(cfg, cache)
        texts[ext] = [t.strip() for t in train["text"]]
        assert ev is None
    assert texts["txt"] == texts["jsonl"] == texts["parquet"] == docs
    cfg = DataConfig(source="files", files=(str(tmp_path / "c.jsonl"),), seq_len=16, tokenizer_vocab_size=120)
    train, ev = D.load_documents(cfg, cache)
    assert len(train) + len(ev) == len(docs) and len(ev) >= 1
    tok = D.get_tokenizer(cfg, train, cache)
    assert tok.pad_token_id == 0 and tok.mask_token_id == 4 and len(tok) <= 120
    packed = D.packed_cached(train, tok, cfg, cache, "train")
    assert packed.features["input_ids"].feature.dtype == "int32" and packed.features["input_ids"].length == 16
    src = D.PackedRows(packed)
    rows = src.rows(0, len(src))
    assert rows.shape[1] == 16 and rows.dtype == np.int32 and np.all(rows[:, 0] == tok.cls_token_id)
    assert src[1].dtype == np.int32 and np.array_equal(src[1], rows[1])
    entries = set(os.listdir(os.path.join(cache, "packed")))
    again = D.packed_cached(train, tok, cfg, cache, "train")  # from the cache, no new entry
    assert set(os.listdir(os.path.join(cache, "packed"))) == entries
    np.testing.assert_array_equal(np.asarray(again.with_format("numpy")["input_ids"]), rows)
    D.packed_cached(train, tok, DataConfig(**{**cfg.__dict__, "seq_len": 32}), cache, "train")
    assert len(os.listdir(os.path.join(cache, "packed"))) == len(entries) + 1  # keyed by seq_len


def test_streaming_rows_equal_map_style_and_resume(tmp_path):
    _write_corpus(tmp_path, n=300)
    cache = str(tmp_path / "cache")
    base = DataConfig(source="files", files=(str(tmp_path / "c.jsonl"),), seq_len=16, eval_fraction=0.0)
    train, _ = D.load_documents(base, cache)
    tok = D.train_wordpiece(iter(train["text"]), 150, str(tmp_path / "tok"))
    rows = np.asarray(D.packed_cached(train, tok, base, cache, "train").with_format("numpy")["input_ids"])
    scfg = DataConfig(**{**base.__dict__, "streaming": True, "shuffle_buffer": 1})
    docs, _ = D.load_documents(scfg, cache)
    ds = D.streaming_dataset(docs, tok, scfg, seed=0, accum=1, rows=4)
    it = D.to_iterator(ds, 2)
    first = [next(it) for _ in range(6)]
    np.testing.assert_array_equal(np.concatenate([b[0] for b in first]), rows[:24])  # same packing as map-style
    state = json.loads(json.dumps(it.get_state()))  # what the checkpoint stores is JSON
    more = [next(it) for _ in range(3)]
    again = D.to_iterator(ds, 2)
    again.set_state(state)
    for a, b in zip(more, [next(again) for _ in range(3)]):
        np.testing.assert_array_equal(a, b)
    it.close()
    again.close()


def test_eval_batches_and_errors(tmp_path):
    class Src:
        def __init__(self, n):
            self.n = n

        def __len__(self):
            return self.n

        def rows(self, a, b):
            return np.arange(a, b)

    got = D.eval_batches(Src(20), 8, 5, D.HostShard(1, 2, 4))
    assert [g.tolist() for g in got] == [[4, 5, 6, 7], [12, 13, 14, 15]]
    with pytest.raises(ConfigError, match="fewer than one batch"):
        D.eval_batches(Src(3), 8, 1, D.HostShard(0, 1, 8))
    with pytest.raises(ConfigError, match="cannot tell the format"):
        (tmp_path / "x.csv").write_text("a,b\n")
        D.load_documents(DataConfig(source="files", files=(str(tmp_path / "x.csv"),)), str(tmp_path))
    with pytest.raises(ConfigError, match="matches no file"):
        D.load_documents(DataConfig(source="files", files=(str(tmp_path / "none*.txt"),)), str(tmp_path))
    with pytest.raises(ConfigError, match="data.files is empty"):
        D.load_documents(DataConfig(source="files"), str(tmp_path))


def test_stdlib_corpus_is_real_text(data_cache):
    path = D.stdlib_corpus(data_cache)
    with open(path) as fh:
        docs = [json.loads(line)["text"] for line in fh]
    assert len(docs) > 2000 and sum(map(len, docs)) > 500_000
    assert any("Return" in d for d in docs[:200])
