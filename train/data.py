"""Text -> token ids -> fixed-length packed rows -> deterministic, sharded, checkpointable batches.

* Documents come from HF ``datasets``: local text/JSON/parquet files, a hub name (online), or the built-in
  offline corpus of Python standard-library docstrings (:func:`stdlib_corpus`).
* Tokenization is batched with a fast tokenizer. Documents are concatenated with a separator and cut into
  rows ``[CLS] chunk [SEP]`` of exactly ``seq_len`` ids (the last row of each map batch is padded).
  With ``data.packing="segments"`` each row also gets int32 segment ids (:func:`pack_rows`), so the model
  keeps its documents apart; the ids are the same rows either way.
  Map-style corpora are packed once and cached on disk (``save_to_disk``), keyed by the source, the tokenizer,
  ``seq_len`` and the packing; streaming corpora are packed lazily.
* ``grain`` shuffles (a seeded permutation per epoch), shards per host, batches, prefetches, and its iterator
  state is saved with every checkpoint.

Row order of the global batch is host-major: micro-batch ``m`` is packed rows ``[m*Bm, (m+1)*Bm)`` of the
shuffled stream, and a host holding batch rows ``[s, s+b)`` reads exactly those. So a run on one process and
a run on N processes see the same global batches (map-style data).
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import sysconfig
import uuid
from collections.abc import Iterator, Sequence
from typing import Any

import grain
import numpy as np

from flax_narrow.errors import ConfigError

from .config import DataConfig

log = logging.getLogger(__name__)

PACK_VERSION = 1
STDLIB_SKIP_DIRS = frozenset(
    {"test", "tests", "idlelib", "site-packages", "dist-packages", "lib2to3", "turtledemo", "__pycache__"}
)


# --------------------------------------------------------------------------------------------- corpus
def stdlib_docstrings(min_chars: int = 40) -> Iterator[str]:
    """Docstrings of the modules, classes and functions of Python's standard library, in a fixed order."""
    for doc in python_docstrings(sysconfig.get_paths()["stdlib"]):
        if len(doc) >= min_chars:
            yield doc


def python_docstrings(top: str) -> Iterator[str]:
    """Every non-empty docstring (module, class, function) of the ``.py`` files under ``top``, in a fixed order
    (sorted walk, :data:`STDLIB_SKIP_DIRS` skipped, unparsable files skipped)."""
    for dirpath, dirnames, filenames in os.walk(top):
        dirnames[:] = sorted(d for d in dirnames if d not in STDLIB_SKIP_DIRS)
        for name in sorted(filenames):
            if not name.endswith(".py"):
                continue
            try:
                with open(os.path.join(dirpath, name), encoding="utf-8") as fh:
                    tree = ast.parse(fh.read())
            except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
                continue
            for node in ast.walk(tree):
                if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                    doc = ast.get_docstring(node)
                    if doc:
                        yield doc


def stdlib_corpus(cache_dir: str) -> str:
    """Write (once) the standard-library docstrings as JSON lines ``{"text": ...}``; returns the file path."""
    import sys

    path = os.path.join(cache_dir, f"stdlib-docstrings-py{sys.version_info[0]}{sys.version_info[1]}.jsonl")
    if os.path.exists(path):
        return path
    os.makedirs(cache_dir, exist_ok=True)
    tmp = f"{path}.{uuid.uuid4().hex}.tmp"
    n = 0
    with open(tmp, "w", encoding="utf-8") as fh:
        for doc in stdlib_docstrings():
            fh.write(json.dumps({"text": doc}) + "\n")
            n += 1
    os.replace(tmp, path)
    log.info("wrote %d standard-library docstrings to %s", n, path)
    return path


def _builder_for(path: str) -> str:
    ext = path.lower().rsplit(".", 1)[-1] if "." in os.path.basename(path) else ""
    if ext in ("txt", "text"):
        return "text"
    if ext in ("json", "jsonl"):
        return "json"
    if ext == "parquet":
        return "parquet"
    raise ConfigError(f"data.files: cannot tell the format of {path!r} (use .txt, .json/.jsonl or .parquet)")


def _load_files(files: list[str], cfg: DataConfig, cache_dir: str, streaming: bool) -> Any:
    import datasets

    builders = {_builder_for(f) for f in files}
    if len(builders) != 1:
        raise ConfigError(f"data.files mixes formats {sorted(builders)}; use one format per run")
    builder = builders.pop()
    empty = [f for f in files if os.path.getsize(f) == 0]
    if empty:
        raise ConfigError(f"data.files: {empty[0]} is empty")
    kw: dict[str, Any] = {"sample_by": "paragraph"} if builder == "text" else {}
    try:
        ds = datasets.load_dataset(
            builder,
            data_files=files,
            split="train",
            streaming=streaming,
            cache_dir=os.path.join(cache_dir, "datasets"),
            **kw,
        )
    except Exception as e:  # noqa: BLE001 - pyarrow/pandas raise many types; one clear line for the user
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError(
            f"data.files: cannot read {files[0]}{' ...' if len(files) > 1 else ''} as {builder} ({first})"
        ) from None
    if not streaming and len(ds) == 0:
        raise ConfigError(f"data.files: no documents in {', '.join(files[:3])}{' ...' if len(files) > 3 else ''}")
    return ds


def load_documents(cfg: DataConfig, cache_dir: str) -> tuple[Any, Any | None]:
    """(train documents, eval documents or None) as HF datasets with a ``text`` column.

    Map-style unless ``cfg.streaming``. Without ``eval_files``, map-style data holds out ``eval_fraction``
    of the documents (seeded split); streaming data then has no evaluation set.
    """
    import datasets

    streaming = cfg.streaming
    if cfg.source == "stdlib":
        files = [stdlib_corpus(cache_dir)]
        ds = _load_files(files, cfg, cache_dir, streaming)
    elif cfg.source == "files":
        if not cfg.files:
            raise ConfigError("data.source is 'files' but data.files is empty; pass data.files=path[,path...]")
        ds = _load_files(cfg.resolved_files(), cfg, cache_dir, streaming)
    else:
        if not cfg.hub_name:
            raise ConfigError("data.source is 'hub' but data.hub_name is not set")
        try:
            ds = datasets.load_dataset(
                cfg.hub_name,
                cfg.hub_config,
                split=cfg.split,
                streaming=streaming,
                cache_dir=os.path.join(cache_dir, "datasets"),
            )
        except Exception as e:
            raise ConfigError(
                f"data.hub_name {cfg.hub_name!r}: loading from the hub failed ({type(e).__name__}: "
                f"{str(e).splitlines()[0] if str(e) else ''}); offline? use data.source=files"
            ) from None
    if cfg.text_column not in (ds.column_names or [cfg.text_column]):
        raise ConfigError(f"data.text_column {cfg.text_column!r} is not a column of the corpus ({ds.column_names})")
    if cfg.max_documents is not None:
        ds = ds.take(cfg.max_documents) if streaming else ds.select(range(min(cfg.max_documents, len(ds))))
    eval_ds = None
    if cfg.eval_files:
        eval_ds = _load_files(cfg.resolved_files(cfg.eval_files), cfg, cache_dir, streaming=False)
    elif not streaming and cfg.eval_fraction > 0 and len(ds) >= 20:
        split = ds.train_test_split(test_size=cfg.eval_fraction, seed=0, shuffle=True)
        ds, eval_ds = split["train"], split["test"]
    return ds, eval_ds


def source_key(cfg: DataConfig, cache_dir: str) -> dict[str, Any]:
    """What identifies the raw documents, for cache keys (files by path, size and mtime)."""

    def stat(paths: list[str]) -> list[tuple[str, int, int]]:
        return [(os.path.abspath(p), os.path.getsize(p), os.stat(p).st_mtime_ns) for p in paths]

    key: dict[str, Any] = {"source": cfg.source, "max_documents": cfg.max_documents, "column": cfg.text_column}
    if cfg.source == "stdlib":
        key["files"] = stat([stdlib_corpus(cache_dir)])
    elif cfg.source == "files":
        key["files"] = stat(cfg.resolved_files())
    else:
        key["hub"] = [cfg.hub_name, cfg.hub_config, cfg.split]
    key["eval"] = stat(cfg.resolved_files(cfg.eval_files)) if cfg.eval_files else cfg.eval_fraction
    return key


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------------------------- tokenizer
def train_wordpiece(texts: Iterator[str], vocab_size: int, directory: str) -> Any:
    """Train a lower-cased BERT WordPiece tokenizer (``tokenizers``) and save it as a transformers fast
    tokenizer in ``directory``. Special tokens: [PAD]=0 [UNK]=1 [CLS]=2 [SEP]=3 [MASK]=4."""
    from tokenizers import BertWordPieceTokenizer
    from transformers import BertTokenizerFast

    wp = BertWordPieceTokenizer(lowercase=True)
    wp.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=2, show_progress=False)
    tok = BertTokenizerFast(tokenizer_object=wp._tokenizer, do_lower_case=True)
    tok.add_special_tokens(
        {"pad_token": "[PAD]", "unk_token": "[UNK]", "cls_token": "[CLS]", "sep_token": "[SEP]", "mask_token": "[MASK]"}
    )
    tmp = f"{directory}.{uuid.uuid4().hex}.tmp"
    tok.save_pretrained(tmp)
    _publish(tmp, directory)
    return tok


def _publish(tmp: str, final: str) -> None:
    """Atomically move a finished directory into place; if another process got there first, keep theirs."""
    try:
        os.replace(tmp, final)
    except OSError:
        if not os.path.isdir(final):
            raise
        shutil.rmtree(tmp, ignore_errors=True)


def get_tokenizer(cfg: DataConfig, train_docs: Any, cache_dir: str) -> Any:
    """The configured tokenizer, or a WordPiece tokenizer trained on ``train_docs`` (cached by source key).

    WordPiece training is not deterministic (ties are broken in hash order), so with several processes only
    process 0 trains (or reads its cache) and the others receive its files: every host tokenizes alike, with
    or without a shared cache directory.
    """
    import jax

    from flax_narrow.tokenization import load_tokenizer

    if cfg.tokenizer is not None:
        return load_tokenizer(os.path.expanduser(cfg.tokenizer))
    if cfg.streaming:
        raise ConfigError("data.tokenizer is required with streaming data (training one needs a pass over it)")
    key = _digest({"src": source_key(cfg, cache_dir), "vocab": cfg.tokenizer_vocab_size, "v": 1})
    directory = os.path.join(cache_dir, f"wordpiece-{cfg.tokenizer_vocab_size}-{key}")
    if jax.process_index() == 0 and not os.path.isdir(directory):
        log.info("training a WordPiece tokenizer (vocab %d) on the corpus", cfg.tokenizer_vocab_size)
        column = cfg.text_column
        train_wordpiece((t for t in train_docs[column] if t), cfg.tokenizer_vocab_size, directory)
    if jax.process_count() > 1:
        directory = _share_directory(directory, os.path.join(cache_dir, "received"))
    return load_tokenizer(directory)


def _share_directory(directory: str, inbox: str) -> str:
    """Process 0's ``directory`` (small files) on every process: the path itself on process 0, a copy under
    ``inbox/<content hash>`` elsewhere."""
    import jax
    from jax.experimental import multihost_utils

    blob = b""
    if jax.process_index() == 0:
        files = {n: open(os.path.join(directory, n), encoding="utf-8").read() for n in sorted(os.listdir(directory))}
        blob = json.dumps(files).encode()
    size = int(multihost_utils.broadcast_one_to_all(np.int64(len(blob))))
    local = np.frombuffer(blob, np.uint8) if blob else np.zeros(size, np.uint8)
    data = np.asarray(multihost_utils.broadcast_one_to_all(local)).tobytes()
    if jax.process_index() == 0:
        return directory
    target = os.path.join(inbox, hashlib.sha256(data).hexdigest()[:16])
    if not os.path.isdir(target):
        tmp = f"{target}.{uuid.uuid4().hex}.tmp"
        os.makedirs(tmp)
        for name, text in json.loads(data.decode()).items():
            with open(os.path.join(tmp, name), "w", encoding="utf-8") as fh:
                fh.write(text)
        _publish(tmp, target)
    return target


def tokenizer_fingerprint(tokenizer: Any) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def special_ids(tokenizer: Any) -> tuple[int, int, int]:
    """(cls/bos, sep/eos, pad) ids; raises when the tokenizer lacks them."""
    cls_id = tokenizer.cls_token_id if tokenizer.cls_token_id is not None else tokenizer.bos_token_id
    sep_id = tokenizer.sep_token_id if tokenizer.sep_token_id is not None else tokenizer.eos_token_id
    pad_id = tokenizer.pad_token_id
    if cls_id is None or sep_id is None or pad_id is None:
        raise ConfigError("the tokenizer needs CLS/BOS, SEP/EOS and PAD tokens to pack rows")
    return int(cls_id), int(sep_id), int(pad_id)


# --------------------------------------------------------------------------------------------- packing
def pack_token_lists(token_lists: list[list[int]], seq_len: int, cls_id: int, sep_id: int, pad_id: int) -> np.ndarray:
    """Concatenate documents (each followed by SEP) and cut into rows ``[CLS] chunk [SEP]`` of ``seq_len``;
    the last row is padded. Returns int32[R, seq_len] (R = 0 for no tokens)."""
    return pack_rows(token_lists, seq_len, cls_id, sep_id, pad_id)[0]


def pack_rows(
    token_lists: list[list[int]], seq_len: int, cls_id: int, sep_id: int, pad_id: int
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`pack_token_lists`'s rows and their segment ids: (ids int32[R, seq_len], segments int32[R, seq_len]).

    Segment ids follow :mod:`flax_narrow.ops.packing`: the pieces of documents in a row are numbered 1, 2, ...,
    padding is 0. A document's piece includes the SEP that follows it; the row's CLS belongs to its first
    piece and the row's closing SEP to its last, so every real token is in a segment and a packed row
    computes what each piece computes alone. Pieces get no CLS of their own: the ids are exactly
    :func:`pack_token_lists`'s. A document cut at a row end continues as segment 1 of the next row (after that
    row's CLS), a document of its own there: rows never attend to each other anyway.

    >>> ids, seg = pack_rows([[7, 8, 9], [5, 6]], 6, cls_id=2, sep_id=3, pad_id=0)
    >>> ids.tolist(), seg.tolist()
    ([[2, 7, 8, 9, 3, 3], [2, 5, 6, 3, 3, 0]], [[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0]])
    >>> pack_rows([[7], [8], [9, 9, 9], [6]], 6, cls_id=2, sep_id=3, pad_id=0)[1].tolist()
    [[1, 1, 1, 2, 2, 2], [1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]]
    """
    body = seq_len - 2
    stream: list[int] = []
    doc: list[int] = []  # the index of each stream token's (non-empty) document
    for ids in token_lists:
        if ids:
            doc.extend([doc[-1] + 1 if doc else 0] * (len(ids) + 1))
            stream.extend(ids)
            stream.append(sep_id)
    if not stream:
        return np.zeros((0, seq_len), np.int32), np.zeros((0, seq_len), np.int32)
    n_rows = -(-len(stream) // body)
    out = np.full((n_rows, seq_len), pad_id, np.int32)
    seg = np.zeros((n_rows, seq_len), np.int32)
    doc_arr = np.asarray(doc, np.int32)
    for r in range(n_rows):
        chunk = stream[r * body : (r + 1) * body]
        out[r, 0] = cls_id
        out[r, 1 : 1 + len(chunk)] = chunk
        out[r, 1 + len(chunk)] = sep_id
        pieces = doc_arr[r * body : (r + 1) * body] - doc_arr[r * body] + 1
        seg[r, 0] = 1
        seg[r, 1 : 1 + len(chunk)] = pieces
        seg[r, 1 + len(chunk)] = pieces[-1]
    return out, seg


def _pack_fn(tokenizer: Any, seq_len: int, column: str, segments: bool = False):
    cls_id, sep_id, pad_id = special_ids(tokenizer)

    def pack(batch: dict[str, list]) -> dict[str, list]:
        texts = [t if isinstance(t, str) else "" for t in batch[column]]
        enc = tokenizer(
            texts,
            add_special_tokens=False,
            return_attention_mask=False,
            return_token_type_ids=False,
            verbose=False,
        )["input_ids"]
        if not segments:
            return {"input_ids": list(pack_token_lists(enc, seq_len, cls_id, sep_id, pad_id))}
        ids, seg = pack_rows(enc, seq_len, cls_id, sep_id, pad_id)
        return {"input_ids": list(ids), "segment_ids": list(seg)}

    return pack


def uses_segments(cfg: DataConfig) -> bool:
    """Whether rows carry segment ids (``data.packing="segments"``)."""
    return cfg.packing == "segments"


def pack_documents(docs: Any, tokenizer: Any, cfg: DataConfig) -> Any:
    """Tokenize and pack (lazily for an IterableDataset) into a dataset with an ``input_ids`` column (and a
    ``segment_ids`` column with ``data.packing="segments"``)."""
    import datasets

    fn = _pack_fn(tokenizer, cfg.seq_len, cfg.text_column, uses_segments(cfg))
    columns = list(docs.column_names or [])
    if isinstance(docs, datasets.IterableDataset):
        return docs.map(fn, batched=True, batch_size=1000, remove_columns=columns)
    return docs.map(fn, batched=True, batch_size=1000, remove_columns=columns, num_proc=cfg.num_proc)


def packed_cache_key(cfg: DataConfig, tokenizer: Any, cache_dir: str, split: str) -> dict[str, Any]:
    """What identifies a packed split. ``packing`` enters only when it is not the default, so caches written
    before the option existed keep their keys."""
    key: dict[str, Any] = {
        "src": source_key(cfg, cache_dir),
        "split": split,
        "tok": tokenizer_fingerprint(tokenizer),
        "seq_len": cfg.seq_len,
        "v": PACK_VERSION,
    }
    if cfg.packing != "concat":
        key["packing"] = cfg.packing
    return key


def packed_cache_dir(cfg: DataConfig, tokenizer: Any, cache_dir: str, split: str) -> str:
    """``cache_dir/packed/<split>-L<seq_len>[-segments]-<digest of packed_cache_key>``."""
    tag = "-segments" if uses_segments(cfg) else ""
    key = _digest(packed_cache_key(cfg, tokenizer, cache_dir, split))
    return os.path.join(cache_dir, "packed", f"{split}-L{cfg.seq_len}{tag}-{key}")


def packed_cached(docs: Any, tokenizer: Any, cfg: DataConfig, cache_dir: str, split: str) -> Any:
    """Pack a map-style dataset once and keep it under :func:`packed_cache_dir` (memory-mapped on reuse)."""
    import datasets

    final = packed_cache_dir(cfg, tokenizer, cache_dir, split)
    if not os.path.isdir(final):
        log.info("tokenizing and packing the %s split (%d documents) into rows of %d", split, len(docs), cfg.seq_len)
        packed = pack_documents(docs, tokenizer, cfg)
        for column in packed.column_names:
            packed = packed.cast_column(column, datasets.Sequence(datasets.Value("int32"), length=cfg.seq_len))
        os.makedirs(os.path.dirname(final), exist_ok=True)
        tmp = f"{final}.{uuid.uuid4().hex}.tmp"
        packed.save_to_disk(tmp)
        _publish(tmp, final)
    return datasets.load_from_disk(final)


# --------------------------------------------------------------------------------------------- grain
def unigram_log_probs(rows: np.ndarray, vocab_size: int, exclude: Sequence[int] = (), alpha: float = 0.5) -> np.ndarray:
    """float32[vocab_size]: log-frequencies of the ids in ``rows`` (int[..., L]), the ``exclude`` ids (special
    tokens, padding: masking never selects them) not counted, ``alpha`` added to every count (no id has zero
    probability), centred to mean 0 (softmax is unchanged by a constant)."""
    counts = np.bincount(np.asarray(rows).ravel(), minlength=vocab_size)[:vocab_size].astype(np.float64)
    counts[[i for i in exclude if 0 <= i < vocab_size]] = 0.0
    logp = np.log((counts + alpha) / (counts + alpha).sum())
    return (logp - logp.mean()).astype(np.float32)


Rows = np.ndarray | dict[str, np.ndarray]
"""Packed rows on the host: int32[..., L] token ids, or with segment ids ``{"input_ids", "segment_ids"}``
(each int32[..., L]); the batching below keeps the form."""


def _row(example: dict[str, Any]) -> Rows:
    ids = np.asarray(example["input_ids"], np.int32)
    if "segment_ids" not in example:
        return ids
    return {"input_ids": ids, "segment_ids": np.asarray(example["segment_ids"], np.int32)}


def split_rows(rows: Rows) -> tuple[np.ndarray, np.ndarray | None]:
    """(input_ids, segment_ids or None) of host rows of either form."""
    if isinstance(rows, dict):
        return rows["input_ids"], rows["segment_ids"]
    return rows, None


class PackedRows:
    """A grain random-access source over packed rows: ``source[i]`` is int32[seq_len], or a dict of
    ``input_ids`` and ``segment_ids`` (each int32[seq_len]) when the cache holds segment ids."""

    def __init__(self, packed: Any):
        self._ds = packed.with_format("numpy")
        self._n = len(packed)
        self.has_segments = "segment_ids" in packed.column_names

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, index: int) -> Rows:
        return _row(self._ds[int(index)])

    def rows(self, start: int, stop: int) -> Rows:
        return _row(self._ds[start:stop])


@dataclasses.dataclass(frozen=True)
class HostShard:
    """Which rows of each global micro-batch this process feeds: ``[index * rows, (index + 1) * rows)``."""

    index: int
    count: int
    rows: int


def _stack(rows: list[Rows]) -> Rows:
    if isinstance(rows[0], dict):
        return {k: _stack([r[k] for r in rows]) for k in rows[0]}
    return np.stack(rows).astype(np.int32)


def train_dataset(source: Any, *, seed: int, accum: int, shard: HostShard) -> grain.MapDataset:
    """Map-style pipeline: seeded shuffle reshuffled each epoch, infinite; chunks of ``shard.rows`` rows; this
    host's chunks ``index::count``; ``accum`` chunks per step. Elements: int32[accum, shard.rows, L] (a dict of
    two such arrays for rows with segment ids)."""
    ds = grain.MapDataset.source(source).shuffle(seed=seed).repeat()
    ds = ds.batch(shard.rows, drop_remainder=True, batch_fn=_stack)
    ds = ds.slice(slice(shard.index, None, shard.count))
    return ds.batch(accum, drop_remainder=True, batch_fn=_stack)


def to_iterator(ds: grain.MapDataset | grain.IterDataset, prefetch: int) -> grain.DatasetIterator:
    """A checkpointable iterator with background prefetch of ``prefetch`` elements (0: none)."""
    it = (
        ds.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=2))
        if isinstance(ds, grain.MapDataset)
        else ds
    )
    if prefetch > 0:
        it = grain.experimental.ThreadPrefetchIterDataset(it, prefetch_buffer_size=prefetch)
    return iter(it)


class _HFStreamIterator(grain.DatasetIterator):
    """Iterates an HF IterableDataset of packed rows; its state is the dataset's ``state_dict``."""

    def __init__(self, hf_ds: Any):
        super().__init__()
        self._hf = hf_ds
        self._epoch = 0
        self._it = iter(hf_ds)

    def __next__(self) -> Rows:
        try:
            row = next(self._it)
        except StopIteration:
            # Infinite like the map-style pipeline: the next epoch (HF reshuffles per epoch).
            self._epoch += 1
            self._hf.set_epoch(self._epoch)
            self._it = iter(self._hf)
            row = next(self._it)
        return _row(row)

    def get_state(self) -> dict[str, Any]:
        return {"epoch": self._epoch, "hf": json.loads(json.dumps(self._hf.state_dict(), default=int))}

    def set_state(self, state: dict[str, Any]) -> None:
        self._epoch = int(state["epoch"])
        self._hf.set_epoch(self._epoch)
        self._hf.load_state_dict(state["hf"])
        self._it = iter(self._hf)


class HFStreamDataset(grain.IterDataset):
    """A grain IterDataset over an HF IterableDataset (streaming corpora)."""

    def __init__(self, hf_ds: Any):
        super().__init__()
        self._hf = hf_ds

    def __iter__(self) -> grain.DatasetIterator:
        return _HFStreamIterator(self._hf)


def streaming_dataset(
    docs: Any, tokenizer: Any, cfg: DataConfig, *, seed: int, accum: int, rows: int
) -> grain.IterDataset:
    """Streaming pipeline: this process's share of the document shards (``split_dataset_by_node``), a
    seeded shuffle buffer, lazy packing, batches of int32[accum, rows, L]. Resuming restores the stream
    position; the shuffle buffer is refilled, so the order after a resume differs from an uninterrupted run
    (map-style data resumes exactly)."""
    import jax
    from datasets.distributed import split_dataset_by_node

    ds = split_dataset_by_node(docs, rank=jax.process_index(), world_size=jax.process_count())
    ds = ds.shuffle(seed=seed, buffer_size=cfg.shuffle_buffer)
    packed = pack_documents(ds, tokenizer, cfg)
    it = HFStreamDataset(packed).batch(rows, drop_remainder=True, batch_fn=_stack)
    return it.batch(accum, drop_remainder=True, batch_fn=_stack)


def eval_batches(source: PackedRows, rows_per_batch: int, num_batches: int, shard: HostShard) -> list[Rows]:
    """The first ``num_batches`` global batches of the eval rows (unshuffled), this host's rows of each:
    int32[shard.rows, L] each (or a dict with segment ids). Fewer when the eval split is small; raises when it
    holds no full batch."""
    available = len(source) // rows_per_batch
    if available == 0:
        raise ConfigError(
            f"the eval split has {len(source)} packed rows, fewer than one batch of {rows_per_batch}; "
            "raise data.eval_fraction or lower train.global_batch_size"
        )
    out = []
    for b in range(min(num_batches, available)):
        start = b * rows_per_batch + shard.index * shard.rows
        out.append(source.rows(start, start + shard.rows))
    return out


def global_array(local: np.ndarray, sharding: Any, global_shape: tuple[int, ...]) -> Any:
    """This host's rows -> one global jax.Array (``jax.make_array_from_process_local_data``)."""
    import jax

    return jax.make_array_from_process_local_data(sharding, local, global_shape)
