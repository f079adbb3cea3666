"""Fine-tuning data: load examples (local CSV/JSON/JSONL/parquet or a ``datasets`` hub name), map columns to
canonical fields, and encode them into fixed-shape numpy arrays (static shapes: one compile per task).

Canonical examples (dicts) per task:
  classification / regression / multilabel: ``text_a``, optional ``text_b``, ``label`` (name or id / float /
    list of label names or multi-hot list);
  multiple_choice: optional ``context``, ``choices`` (list of str), ``label`` (index);
  token: ``tokens`` (list of words), ``tags`` (list of tag names, BIO);
  qa: ``question``, ``context``, ``answers`` ({"text": [...], "answer_start": [char offsets]}).

Pairs are ``CLS A SEP B SEP`` (``pair_format="single_sep"``: BERT's, and BORT's released ``<s> A </s> B </s>``)
or RoBERTa's ``<s> A </s></s> B </s>`` (``"double_sep"``).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from flax_narrow.errors import ConfigError, DataError
from flax_narrow.modeling.losses import IGNORE_INDEX

from .tasks import Task

log = logging.getLogger(__name__)

PAIR_FORMATS = ("single_sep", "double_sep")

# GLUE / SuperGLUE presets (need the hub): (dataset path, config, task kind, column map, metric).
PRESETS: dict[str, tuple[str, str, str, dict[str, str], str]] = {
    "cola": ("nyu-mll/glue", "cola", "classification", {"text_a": "sentence"}, "mcc"),
    "sst2": ("nyu-mll/glue", "sst2", "classification", {"text_a": "sentence"}, "accuracy"),
    "mrpc": ("nyu-mll/glue", "mrpc", "classification", {"text_a": "sentence1", "text_b": "sentence2"}, "f1"),
    "qqp": ("nyu-mll/glue", "qqp", "classification", {"text_a": "question1", "text_b": "question2"}, "f1"),
    "stsb": ("nyu-mll/glue", "stsb", "regression", {"text_a": "sentence1", "text_b": "sentence2"}, "pearson"),
    "mnli": ("nyu-mll/glue", "mnli", "classification", {"text_a": "premise", "text_b": "hypothesis"}, "accuracy"),
    "qnli": ("nyu-mll/glue", "qnli", "classification", {"text_a": "question", "text_b": "sentence"}, "accuracy"),
    "rte": ("nyu-mll/glue", "rte", "classification", {"text_a": "sentence1", "text_b": "sentence2"}, "accuracy"),
    "wnli": ("nyu-mll/glue", "wnli", "classification", {"text_a": "sentence1", "text_b": "sentence2"}, "accuracy"),
    "boolq": ("aps/super_glue", "boolq", "classification", {"text_a": "question", "text_b": "passage"}, "accuracy"),
    "cb": ("aps/super_glue", "cb", "classification", {"text_a": "premise", "text_b": "hypothesis"}, "f1"),
}

CANONICAL = {
    "classification": ("text_a", "text_b", "label"),
    "regression": ("text_a", "text_b", "label"),
    "multilabel": ("text_a", "text_b", "label"),
    "multiple_choice": ("context", "choices", "label"),
    "token": ("tokens", "tags"),
    "qa": ("question", "context", "answers"),
}
OPTIONAL = {"text_b", "context"}


def load_examples(
    source: str, split: str, task_kind: str, columns: dict[str, Any] | None = None, *, name: str | None = None
) -> list[dict[str, Any]]:
    """Canonical examples of one split (see :func:`load_split`, which also gives the label order)."""
    return load_split(source, split, task_kind, columns, name=name)[0]


def _looks_local(source: str) -> bool:
    return source.startswith((".", "/", "~")) or os.path.splitext(source)[1].lower() in LOCAL_TYPES


LOCAL_TYPES = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}


def load_split(
    source: str, split: str, task_kind: str, columns: dict[str, Any] | None = None, *, name: str | None = None
) -> tuple[list[dict[str, Any]], tuple[str, ...] | None]:
    """(canonical examples of one split, the label names in the data set's own order or None).

    The label order is the ``ClassLabel`` order when the label column has one (GLUE: MRPC's
    ``not_equivalent, equivalent``), so label ids and the positive class of binary F1 are the data set's.

    Args:
      source: a local file (.csv, .tsv, .json, .jsonl, .parquet) or a ``datasets`` hub name (network needed).
      split: the split name (for a local file, ignored: the file is the split).
      task_kind: one of ``tasks.TASKS``.
      columns: canonical field -> source column (``{"text_a": "sentence"}``); for multiple choice
        ``choices`` may be a list of columns. Unmapped fields use their canonical names. An ``id`` column
        (mapped as ``id=COL``, or named ``id`` / ``idx``) is kept as each example's ``id``.
      name: the hub dataset config (``"sst2"`` for ``nyu-mll/glue``).

    Raises:
      DataError: a missing or unreadable file, no rows, a column that is not there, an empty or NaN label.
    """
    import datasets

    columns = dict(columns or {})
    ext = os.path.splitext(source)[1].lower()
    if os.path.exists(source):
        if os.path.isdir(source):
            raise DataError(f"{source}: is a directory; give a data file (csv, tsv, json, jsonl or parquet)")
        builder = LOCAL_TYPES.get(ext)
        if builder is None:
            raise DataError(f"{source}: unsupported file type {ext!r} (use csv, tsv, json, jsonl or parquet)")
        if os.path.getsize(source) == 0:
            raise DataError(f"{source}: the file is empty")
        if builder == "csv" and _count_lines(source, 2) < 2:
            raise DataError(f"{source}: no rows (only a header?)")
        kw = {"delimiter": "\t"} if ext == ".tsv" else {}
        try:
            ds = datasets.load_dataset(builder, data_files={"data": source}, split="data", **kw)
        except Exception as e:  # noqa: BLE001 - pyarrow/pandas raise many types; one clear line for the user
            raise DataError(
                f"{source}: cannot read it as {builder} ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
            ) from None
    elif _looks_local(source):
        raise DataError(f"{source}: no such file")
    else:
        try:
            ds = datasets.load_dataset(source, name, split=split)
        except Exception as e:  # noqa: BLE001 - datasets raises many types; one clear line for the user
            raise DataError(f"cannot load {source!r} split {split!r}: {str(e).splitlines()[0]}") from None
    if len(ds) == 0:
        raise DataError(f"{source}: no rows (only a header?)")
    label_feature = None
    feats = ds.features
    rows = ds.to_list()
    out = []
    for field in CANONICAL[task_kind]:
        col = columns.get(field, field)
        cols = col if isinstance(col, list) else [col]
        missing = [c for c in cols if c not in feats]
        if missing and field not in OPTIONAL:
            raise DataError(f"{source}: column {missing[0]!r} (for {field}) not found; columns: {', '.join(feats)}")
        if field == "label" and not isinstance(col, list) and col in feats:
            label_feature = feats[col]
    unknown = sorted(set(columns) - set(CANONICAL[task_kind]) - {"id"})
    if unknown:
        raise DataError(
            f"--column {unknown[0]}=...: {unknown[0]!r} is not a field of task {task_kind!r} "
            f"(fields: {', '.join(CANONICAL[task_kind])}, id)"
        )
    id_col = columns.get("id") or next((c for c in ("id", "idx") if c in feats), None)
    if id_col is not None and id_col not in feats:
        raise DataError(f"{source}: column {id_col!r} (for id) not found; columns: {', '.join(feats)}")
    names = tuple(label_feature.names) if label_feature is not None and hasattr(label_feature, "names") else None
    label_col = columns.get("label", "label")
    for i, row in enumerate(rows):
        ex: dict[str, Any] = {}
        for field in CANONICAL[task_kind]:
            col = columns.get(field, field)
            if isinstance(col, list):
                ex[field] = [row[c] for c in col]
            elif col in row:
                ex[field] = row[col]
        if id_col is not None:
            ex["id"] = row[id_col]
        if names is not None and isinstance(ex.get("label"), int):
            if ex["label"] < 0:  # GLUE test splits: label -1 (unlabelled)
                ex.pop("label")
            else:
                ex["label"] = names[ex["label"]]
        if "label" in ex and _missing(ex["label"]) and task_kind != "multilabel":
            raise DataError(f"{source}: row {i + 1}: empty or NaN label in column {label_col!r}")
        out.append(ex)
    log.info("loaded %d %s examples from %s", len(out), task_kind, source)
    return out, names


def _count_lines(path: str, limit: int) -> int:
    """Non-blank lines of a text file, counted up to ``limit``."""
    n = 0
    with open(path, encoding="utf-8", errors="replace") as fh:
        for line in fh:
            n += bool(line.strip())
            if n >= limit:
                break
    return n


def _missing(x: Any) -> bool:
    if x is None:
        return True
    if isinstance(x, float) and np.isnan(x):
        return True
    return isinstance(x, str) and not x.strip()


def holdout(examples: Sequence[dict[str, Any]], fraction: float, seed: int) -> tuple[list, list]:
    """(train, held-out): a fixed part of ``examples`` (a permutation by ``seed``) for evaluation when no dev
    set is given, so the model is never selected on its own training rows."""
    n = len(examples)
    cut = max(int(round(n * fraction)), 1)
    if n - cut < 1:
        raise DataError(f"{n} training example(s) are too few to hold out a dev part; give --dev")
    order = np.random.default_rng(seed).permutation(n)
    held = set(order[:cut].tolist())
    return [e for i, e in enumerate(examples) if i not in held], [examples[i] for i in sorted(held)]


def infer_label_names(
    task_kind: str, examples: Sequence[dict[str, Any]], order: Sequence[str] | None = None
) -> tuple[str, ...] | None:
    """Label names of ``examples`` (classification, multilabel, token); None for other tasks. ``order`` (a
    data set's ``ClassLabel`` names, see :func:`load_split`) wins for classification; otherwise sorted."""
    if task_kind == "classification":
        if order is not None:
            return tuple(str(x) for x in order)
        return tuple(sorted({str(e["label"]) for e in examples if "label" in e}))
    if task_kind == "multilabel":
        return tuple(sorted({str(x) for e in examples for x in e.get("label", [])}))
    if task_kind == "token":
        return tuple(sorted({t for e in examples for t in e["tags"]}))
    return None


@dataclasses.dataclass(frozen=True)
class Encoder:
    """Turns canonical examples into fixed-shape arrays for one tokenizer, length and pair format."""

    tokenizer: Any
    max_length: int = 128
    pair_format: str = "single_sep"
    token_types: bool = True

    def __post_init__(self) -> None:
        if self.pair_format not in PAIR_FORMATS:
            raise ConfigError(f"pair_format must be one of {PAIR_FORMATS}, got {self.pair_format!r}")

    # ---------------------------------------------------------------------------------------------- pieces
    def _ids(self, texts: list[str]) -> list[list[int]]:
        return self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]

    def _assemble(self, a: list[int], b: list[int] | None) -> tuple[list[int], list[int]]:
        tok, n = self.tokenizer, self.max_length
        cls_id, sep_id = tok.cls_token_id, tok.sep_token_id
        seps = 2 if b is None else (3 if self.pair_format == "single_sep" else 4)
        a, b = list(a), (None if b is None else list(b))
        while len(a) + (len(b) if b is not None else 0) + seps > n:  # longest-first truncation
            if b is not None and len(b) > len(a):
                b.pop()
            else:
                a.pop()
        ids = [cls_id, *a, sep_id]
        types = [0] * len(ids)
        if b is not None:
            mid = [sep_id] if self.pair_format == "double_sep" else []
            ids += [*mid, *b, sep_id]
            second = 1 if (self.token_types and self.pair_format == "single_sep") else 0
            types += [second] * (len(mid) + len(b) + 1)
        return ids, types

    def _pad(self, rows: list[tuple[list[int], list[int]]]) -> dict[str, np.ndarray]:
        n, pad = self.max_length, self.tokenizer.pad_token_id
        ids = np.full((len(rows), n), pad, np.int32)
        types = np.zeros((len(rows), n), np.int32)
        mask = np.zeros((len(rows), n), np.int32)
        for i, (r, t) in enumerate(rows):
            ids[i, : len(r)], types[i, : len(t)], mask[i, : len(r)] = r, t, 1
        return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}

    # ---------------------------------------------------------------------------------------------- tasks
    def encode(self, task: Task, examples: Sequence[dict[str, Any]]) -> dict[str, np.ndarray]:
        """Arrays of ``len(examples)`` rows; labels are included when every example has one."""
        if not examples:
            raise DataError("no examples to encode")
        fn = {
            "multiple_choice": self._multiple_choice,
            "token": self._token,
            "qa": self._qa,
        }.get(task.kind, self._sequence)
        batch = fn(task, examples)
        if all("id" in e for e in examples):
            ids = np.empty(len(examples), dtype=object)
            ids[:] = [e["id"] for e in examples]
            batch["example_ids"] = ids
        return batch

    def _sequence(self, task: Task, examples: Sequence[dict[str, Any]]) -> dict[str, np.ndarray]:
        a = self._ids([str(e["text_a"]) for e in examples])
        has_b = [e.get("text_b") not in (None, "") for e in examples]
        b_src = self._ids([str(e["text_b"]) for e, h in zip(examples, has_b) if h]) if any(has_b) else []
        it = iter(b_src)
        batch = self._pad([self._assemble(x, next(it) if h else None) for x, h in zip(a, has_b)])
        if all("label" in e for e in examples):
            batch["labels"] = self.labels(task, [e["label"] for e in examples])
        return batch

    @staticmethod
    def labels(task: Task, raw: Sequence[Any]) -> np.ndarray:
        if task.kind == "regression":
            return np.asarray(raw, np.float32)
        names = {n: i for i, n in enumerate(task.label_names or ())}
        if task.kind == "multilabel":
            out = np.zeros((len(raw), task.num_labels), np.float32)
            for i, labs in enumerate(raw):
                if len(labs) == task.num_labels and all(x in (0, 1) for x in labs):
                    out[i] = labs  # already multi-hot
                else:
                    for x in labs:
                        out[i, _label_id(names, x)] = 1
            return out
        return np.asarray([_label_id(names, x) for x in raw], np.int32)

    def _multiple_choice(self, task: Task, examples: Sequence[dict[str, Any]]) -> dict[str, np.ndarray]:
        n_choices = {len(e["choices"]) for e in examples}
        if len(n_choices) != 1:
            raise DataError(f"multiple choice needs the same number of choices everywhere, got {sorted(n_choices)}")
        c = n_choices.pop()
        rows = []
        for e in examples:
            ctx = e.get("context")
            for ch in e["choices"]:
                if ctx:
                    a, b = self._ids([str(ctx), str(ch)])
                    rows.append(self._assemble(a, b))
                else:
                    rows.append(self._assemble(self._ids([str(ch)])[0], None))
        flat = self._pad(rows)
        batch = {k: v.reshape(len(examples), c, -1) for k, v in flat.items()}
        if all("label" in e for e in examples):
            batch["labels"] = np.asarray([int(e["label"]) for e in examples], np.int32)
        return batch

    def _token(self, task: Task, examples: Sequence[dict[str, Any]]) -> dict[str, np.ndarray]:
        """First-sub-token labelling: row p of a sentence is its p-th word's first sub-token (P = max_length)."""
        n = self.max_length
        enc = self.tokenizer([list(e["tokens"]) for e in examples], is_split_into_words=True, add_special_tokens=False)
        names = {t: i for i, t in enumerate(task.label_names or ())}
        rows, pos = [], np.zeros((len(examples), n), np.int32)
        valid = np.zeros((len(examples), n), bool)
        labels = np.full((len(examples), n), IGNORE_INDEX, np.int32)
        for i, e in enumerate(examples):
            ids = enc["input_ids"][i][: n - 2]
            words = enc.word_ids(i)[: n - 2]
            rows.append(self._assemble(ids, None))
            p = 0
            for j, w in enumerate(words):
                if w is not None and (j == 0 or words[j - 1] != w):
                    pos[i, p], valid[i, p] = j + 1, True  # +1: the CLS token
                    if "tags" in e:
                        labels[i, p] = _label_id(names, e["tags"][w])
                    p += 1
        batch = self._pad(rows)
        batch.update(narrow_positions=pos, narrow_valid=valid)
        if all("tags" in e for e in examples):
            batch["labels"] = labels
        return batch

    def _qa(self, task: Task, examples: Sequence[dict[str, Any]]) -> dict[str, np.ndarray]:
        """Question first, context second (truncated; no document stride). Answers outside the window point
        at the CLS token, as in transformers' recipe. Host keys: ``context_mask``, ``offsets``."""
        n, tok = self.max_length, self.tokenizer
        q = self._ids([str(e["question"]) for e in examples])
        ctx = tok([str(e["context"]) for e in examples], add_special_tokens=False, return_offsets_mapping=True)
        rows, starts, ends = [], np.zeros(len(examples), np.int32), np.zeros(len(examples), np.int32)
        ctx_mask = np.zeros((len(examples), n), bool)
        offsets = np.zeros((len(examples), n, 2), np.int32)
        for i, e in enumerate(examples):
            qi = q[i][: n // 2]
            room = n - len(qi) - 3
            ci, off = ctx["input_ids"][i][:room], ctx["offset_mapping"][i][:room]
            ids, types = self._assemble(qi, ci)
            rows.append((ids, types))
            first = len(qi) + 2 + (1 if self.pair_format == "double_sep" else 0)
            ctx_mask[i, first : first + len(ci)] = True
            offsets[i, first : first + len(ci)] = off
            ans = e.get("answers") or {}
            if ans.get("text"):
                a0, a1 = ans["answer_start"][0], ans["answer_start"][0] + len(ans["text"][0])
                s = [k for k, (x, y) in enumerate(off) if x <= a0 < y or (x >= a0 and y <= a1)]
                t = [k for k, (x, y) in enumerate(off) if x < a1 <= y or (x >= a0 and y <= a1)]
                if s and t and off[-1][1] >= a1:
                    starts[i], ends[i] = first + s[0], first + t[-1]
        batch = self._pad(rows)
        batch.update(start_positions=starts, end_positions=ends, context_mask=ctx_mask, offsets=offsets)
        batch["context_text"] = np.array([str(e["context"]) for e in examples], dtype=object)
        answers = np.empty(len(examples), dtype=object)
        answers[:] = [list((e.get("answers") or {}).get("text") or [""]) for e in examples]
        batch["answer_texts"] = answers
        return batch


def _label_id(names: dict[str, int], x: Any) -> int:
    key = str(x)
    if key in names:
        return names[key]
    if isinstance(x, (int, np.integer)) and 0 <= int(x) < len(names):
        return int(x)
    raise DataError(f"label {x!r} is not one of the task's labels ({', '.join(names)})")


def batches(data: dict[str, np.ndarray], batch_size: int, *, rng: np.random.Generator | None = None, drop_last=False):
    """Yield dict batches of ``batch_size`` rows (shuffled with ``rng``). The last short batch is padded by
    repeating row 0 and carries ``_n`` (the count of real rows) so that shapes stay static."""
    n = len(data["input_ids"])
    order = rng.permutation(n) if rng is not None else np.arange(n)
    for i in range(0, n, batch_size):
        idx = order[i : i + batch_size]
        real = len(idx)
        if real < batch_size:
            if drop_last:
                return
            idx = np.concatenate([idx, np.full(batch_size - real, idx[0])])
        out = {k: v[idx] for k, v in data.items()}
        out["_n"] = real
        yield out
