"""The demo run by ``make demo`` (``flax-narrow demo``): NarrowBERT against BERT at equal training time.

Both presets, ``demo-narrowbert`` and ``demo-bert`` (same size, same recipe, same batches), are pretrained by
:func:`~flax_narrow.train.loop.pretrain` on the built-in offline corpus — the docstrings of Python's standard
library, with a WordPiece tokenizer trained on them — for the same wall-clock budget of training steps
(``train.max_seconds``; compilation and evaluation are not counted), each evaluated on the same held-out
docstrings with the same masks at the same times (``train.eval_every_seconds``). The demo prints the unigram
entropy of those eval tokens (the loss of guessing every masked token from word frequencies alone), a table of
eval loss and accuracy per checkpoint, fill-mask predictions of both models
(:func:`flax_narrow.inference.fill_mask`), saves both models with ``save_pretrained`` (and their tokenizer),
writes a small labelled task (stdlib docstrings labelled by package) and prints the ``flax-narrow finetune``
command that fine-tunes the NarrowBERT on it.

``loss_table`` (training loss per window of steps) is used by the pretraining notebook.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import shlex
import sysconfig
import tempfile
import time
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from flax_narrow.errors import InputError

log = logging.getLogger(__name__)

PRESETS = ("demo-narrowbert", "demo-bert")
DEFAULT_SECONDS = 180.0
EVALS = 5  # evaluations per run, at equal fractions of the budget
SAVED = "final"  # the save_pretrained subdirectory of each run directory
# Probes whose answer is fixed by the neighbouring words (a function word where a context-free guess says
# "the" or "."), which is what a model this small learns first, and one whose answer is a content word.
FILL_MASK_TEXTS = (
    "Return the number [MASK] items in the list.",
    "Return True [MASK] the file exists.",
    "This method is deprecated [MASK] will be removed in a future version.",
    "If the argument is not a string, raise a [MASK].",
)
FINETUNE_PACKAGES = ("email", "http", "xml", "json", "asyncio", "unittest", "multiprocessing", "logging")


# --------------------------------------------------------------------------------------------- figures
def unigram_entropy(rows: Sequence[np.ndarray], special_ids: Sequence[int]) -> float:
    """Entropy in nats of the token distribution of ``rows`` (int[..., L] arrays), special tokens excluded.

    Masking picks only non-special tokens, so this is the eval loss of predicting every masked token by its
    frequency in the eval data itself (the best guess that ignores context).
    """
    ids = np.concatenate([np.asarray(r).ravel() for r in rows])
    ids = ids[~np.isin(ids, np.asarray(list(special_ids)))]
    if ids.size == 0:
        raise InputError("unigram_entropy: the rows hold no non-special token")
    counts = np.bincount(ids).astype(np.float64)
    p = counts[counts > 0] / ids.size
    return float(-(p * np.log(p)).sum())


def unigram_cross_entropy(
    rows: Sequence[np.ndarray], train_rows: Sequence[np.ndarray], special_ids: Sequence[int], alpha: float = 0.5
) -> float:
    """Cross-entropy in nats of the tokens of ``rows`` under the token frequencies of ``train_rows`` (both
    int[..., L] arrays, special tokens excluded; ``alpha`` added to every count of the vocabulary seen in either,
    so a token the training rows lack has a finite cost): the frequencies
    :func:`~flax_narrow.train.data.unigram_log_probs` gives ``train.output_bias_init=unigram``.

    This is the eval loss of a model that ignores context and has learned the training split's frequencies:
    the plateau a pretraining run sits on before it uses context. It is at least :func:`unigram_entropy`.
    """
    from . import data as D

    special = np.asarray(list(special_ids))

    def tokens(rs: Sequence[np.ndarray]) -> np.ndarray:
        ids = np.concatenate([np.asarray(r).ravel() for r in rs])
        return ids[~np.isin(ids, special)]

    ev, tr = tokens(rows), tokens(train_rows)
    if ev.size == 0 or tr.size == 0:
        raise InputError("unigram_cross_entropy: the rows hold no non-special token")
    logp = D.unigram_log_probs(tr, int(max(ev.max(), tr.max())) + 1, alpha=alpha).astype(np.float64)
    logq = logp - np.log(np.exp(logp).sum())  # normalised: unigram_log_probs centres its log-frequencies
    return float(-logq[ev].mean())


def train_rows(cfg: Any, tokenizer: Any) -> np.ndarray:
    """The packed training rows (int32[R, seq_len]) of ``cfg``, read back from the data cache its run filled."""
    from . import data as D

    cache_dir = os.path.expanduser(cfg.data.cache_dir)
    docs, _ = D.load_documents(cfg.data, cache_dir)
    source = D.PackedRows(D.packed_cached(docs, tokenizer, cfg.data, cache_dir, "train"))
    return D.split_rows(source.rows(0, len(source)))[0]


def eval_rows(cfg: Any, tokenizer: Any) -> list[np.ndarray]:
    """The eval batches a single-process :func:`~flax_narrow.train.loop.pretrain` of ``cfg`` evaluates on
    (read back from the data cache that run filled): int32[global_batch_size, seq_len] each."""
    from . import data as D

    cache_dir = os.path.expanduser(cfg.data.cache_dir)
    _, eval_docs = D.load_documents(cfg.data, cache_dir)
    source = D.PackedRows(D.packed_cached(eval_docs, tokenizer, cfg.data, cache_dir, "eval"))
    micro = cfg.train.micro_batch_size
    batches = D.eval_batches(source, micro, cfg.train.eval_batches, D.HostShard(index=0, count=1, rows=micro))
    return [D.split_rows(b)[0] for b in batches]


def eval_table(runs: dict[str, Any]) -> list[str]:
    """One row per evaluation: for each run its training seconds, step, eval loss and accuracy.

    ``runs`` maps a display name to a :class:`~flax_narrow.train.loop.PretrainResult` (its ``evals``).
    """
    names = list(runs)
    cell = f"{'time':>7} {'step':>6} {'eval loss':>10} {'accuracy':>9}"
    width = len(cell)
    lines = ["  ".join(f"{n:<{width}}" for n in names).rstrip(), "  ".join(cell for _ in names)]
    for i in range(max(len(r.evals) for r in runs.values())):
        cells = []
        for r in runs.values():
            if i < len(r.evals):
                e = r.evals[i]
                cells.append(
                    f"{e['train_seconds']:>6.1f}s {e['step']:>6d} {e['eval_loss']:>10.3f} {e['eval_accuracy']:>9.3f}"
                )
            else:
                cells.append(" " * width)
        lines.append("  ".join(cells).rstrip())
    return lines


def _window_means(history: list[dict[str, Any]], key: str, every: int) -> list[tuple[int, float]]:
    out = []
    for end in range(every, len(history) + 1, every):
        chunk = history[end - every : end]
        out.append((chunk[-1]["step"], float(np.mean([h[key] for h in chunk]))))
    return out


def loss_table(results: dict[str, Any], every: int = 10) -> list[str]:
    """A compact text table: mean training loss and accuracy per window of ``every`` steps, then evaluations."""
    names = list(results)
    cols = {
        n: (_window_means(r.history, "loss", every), _window_means(r.history, "accuracy", every))
        for n, r in results.items()
    }
    head = f"{'step':>8} " + " ".join(f"{n + ' loss':>18} {'acc':>6}" for n in names)
    lines = [head, "-" * len(head)]
    for i, (step, _) in enumerate(cols[names[0]][0]):
        row = f"{step:>8} " + " ".join(f"{cols[n][0][i][1]:>18.3f} {cols[n][1][i][1]:>6.3f}" for n in names)
        lines.append(row)
    for i, ev in enumerate(results[names[0]].evals):
        row = f"{'eval@' + str(ev['step']):>8} " + " ".join(
            f"{results[n].evals[i]['eval_loss']:>18.3f} {results[n].evals[i]['eval_accuracy']:>6.3f}" for n in names
        )
        lines.append(row)
    return lines


def fill_mask_lines(models: dict[str, tuple[Any, Any]], texts: Sequence[str], top_k: int = 3) -> list[str]:
    """Per text, the ``top_k`` fill-mask tokens (probability) of each model: ``{name: (model, tokenizer)}``."""
    from flax_narrow.inference import fill_mask

    preds = {name: fill_mask(m, tok, list(texts), top_k=top_k) for name, (m, tok) in models.items()}
    width = max(len(n) for n in models) + 1
    lines = []
    for i, text in enumerate(texts):
        lines.append(text)
        for name, per_text in preds.items():
            first_mask = per_text[i][0]
            guesses = ", ".join(f"{c['token_str']} ({c['score']:.2f})" for c in first_mask)
            lines.append(f"  {name + ':':<{width}} {guesses}")
    return lines


# --------------------------------------------------------------------------------------------- fine-tune task
def _package_docstrings(root: str, package: str) -> Iterator[str]:
    """First paragraphs (>= 40 chars, whitespace collapsed) of every docstring under ``root/package``."""
    from . import data as D

    for doc in D.python_docstrings(os.path.join(root, package)):
        para = " ".join(doc.split("\n\n")[0].split())
        if len(para) >= 40:
            yield para


def write_finetune_task(directory: str, packages: Sequence[str] = FINETUNE_PACKAGES) -> dict[str, int]:
    """A labelled task from the standard library: docstrings labelled by their package, as ``train.jsonl`` and
    ``dev.jsonl`` (``{"text_a", "label"}``; split by a hash of the text, 1 in 5 to dev). Returns the counts."""
    root = sysconfig.get_paths()["stdlib"]
    per = {p: list(dict.fromkeys(_package_docstrings(root, p))) for p in packages}
    seen = collections.Counter(t for texts in per.values() for t in texts)
    rows: dict[str, list[dict[str, str]]] = {"train": [], "dev": []}
    for package, texts in per.items():
        for t in texts:
            if seen[t] > 1:  # the same text in two packages: ambiguous
                continue
            split = "dev" if int(hashlib.sha1(t.encode()).hexdigest(), 16) % 5 == 0 else "train"
            rows[split].append({"text_a": t, "label": package})
    os.makedirs(directory, exist_ok=True)
    for split, rs in rows.items():
        with open(os.path.join(directory, f"{split}.jsonl"), "w", encoding="utf-8") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in rs)
    return {split: len(rs) for split, rs in rows.items()}


def finetune_command(model_dir: str, task_dir: str, output_dir: str) -> list[str]:
    """The ``flax-narrow finetune`` argv that fine-tunes ``model_dir`` on :func:`write_finetune_task`'s files."""
    return [
        "flax-narrow",
        "finetune",
        "--model",
        model_dir,
        "--train",
        os.path.join(task_dir, "train.jsonl"),
        "--dev",
        os.path.join(task_dir, "dev.jsonl"),
        "--max-length",
        "32",
        "--lr",
        "1e-3",
        "--epochs",
        "3",
        "--output-dir",
        output_dir,
    ]


# --------------------------------------------------------------------------------------------- the demo
@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """No progress bars from ``datasets`` and no library warnings while the demo prints its own lines."""
    import datasets
    import transformers

    bars_were_off = datasets.utils.logging.is_progress_bar_enabled() is False
    datasets.disable_progress_bars()
    levels = {n: logging.getLogger(n).level for n in ("absl", "jax", "orbax", "datasets", "transformers")}
    for n in levels:
        logging.getLogger(n).setLevel(logging.ERROR)
    tf_level = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        yield
    finally:
        if not bars_were_off:
            datasets.enable_progress_bars()
        for n, level in levels.items():
            logging.getLogger(n).setLevel(level)
        transformers.logging.set_verbosity(tf_level)


def _verdict(narrow_loss: float, bert_loss: float, entropy: float) -> str:
    """One line on what the two final eval losses show, from the numbers only."""
    lead = "NarrowBERT" if narrow_loss < bert_loss else "BERT"
    parts = [f"{lead} has the lower eval loss (by {abs(narrow_loss - bert_loss):.3f} nats)"]
    below = [n for n, v in (("NarrowBERT", narrow_loss), ("BERT", bert_loss)) if v < entropy]
    if len(below) == 2:
        parts.append(
            f"both are below the unigram entropy (by {entropy - narrow_loss:.3f} and {entropy - bert_loss:.3f}), so "
            "both use context"
        )
    elif below:
        parts.append(f"only {below[0]} is below the unigram entropy")
    else:
        parts.append("neither is below the unigram entropy yet: both still guess from word frequencies")
    return "; ".join(parts) + "."


def _describe(cfg: Any) -> str:
    m = cfg.model
    kind = f"NarrowBERT, {m.num_full_layers} full + {m.num_narrow_layers} narrow layers" if m.is_narrow else "BERT"
    return (
        f"{kind}: hidden {m.hidden_size}, {m.num_hidden_layers} layers, L={cfg.data.seq_len}, "
        f"P={cfg.train.max_predictions}, batch {cfg.train.global_batch_size}, lr {cfg.train.learning_rate:g}"
    )


def _prepare_data(cfg: Any) -> tuple[int, Any]:
    """Fill the data cache (corpus, tokenizer, packed rows) once, before the runs read it; returns the number
    of training documents and the tokenizer."""
    from . import data as D

    cache_dir = os.path.expanduser(cfg.data.cache_dir)
    docs, eval_docs = D.load_documents(cfg.data, cache_dir)
    tokenizer = D.get_tokenizer(cfg.data, docs, cache_dir)
    D.packed_cached(docs, tokenizer, cfg.data, cache_dir, "train")
    if eval_docs is not None:
        D.packed_cached(eval_docs, tokenizer, cfg.data, cache_dir, "eval")
    return len(docs), tokenizer


# JAX settings a worker process takes over from the demo's process (jax.config does not cross a spawn).
_INHERITED_JAX_SETTINGS = (
    "jax_platforms",
    "jax_compilation_cache_dir",
    "jax_persistent_cache_min_compile_time_secs",
    "jax_default_matmul_precision",
    "jax_num_cpu_devices",
)


@dataclasses.dataclass(frozen=True)
class DemoRun:
    """What a worker reports of its run: the evaluations, steps, speed and where it saved the model."""

    evals: list[dict[str, Any]]
    final_step: int
    compile_seconds: float
    steps_per_second: float | None
    tokens_per_second: float | None
    saved: str


def _worker(cfg: Any, saved_dir: str, settings: dict[str, Any], conn: Any) -> None:
    """A worker process: ``pretrain(cfg)``, save the model and its tokenizer under ``saved_dir``, send back a
    :class:`DemoRun` (or the error's class name and message)."""
    import jax

    for name, value in settings.items():
        if getattr(jax.config, name) != value:
            jax.config.update(name, value)
    try:
        from .loop import pretrain

        with _quiet():
            r = pretrain(cfg)
            directory = r.model().save_pretrained(saved_dir)
            r.tokenizer.save_pretrained(directory)
        run = DemoRun(r.evals, r.final_step, r.compile_seconds, r.steps_per_second, r.tokens_per_second, directory)
        conn.send(("ok", run))
    except KeyboardInterrupt:
        conn.send(("interrupted", None))
    except BaseException as e:  # noqa: BLE001 - sent to the demo's process, which raises it there
        from flax_narrow.errors import FlaxNarrowError

        if not isinstance(e, FlaxNarrowError):  # a bug, not a bad input: its traceback goes to stderr
            import traceback

            traceback.print_exc()
        conn.send(("error", (type(e).__name__, str(e))))
    finally:
        conn.close()


def _train_together(configs: dict[str, Any], saved_dirs: dict[str, str]) -> dict[str, DemoRun]:
    """``pretrain`` every config at once, each in a process of its own (XLA:CPU runs one of these small steps
    on about one core, so two runs use both cores of a 2-core machine, and both see the same machine load; in
    threads of one process they shared one interpreter and got about 1.4 cores). Raises a run's error here."""
    import multiprocessing

    import jax

    from flax_narrow import errors

    settings = {name: getattr(jax.config, name) for name in _INHERITED_JAX_SETTINGS}
    ctx = multiprocessing.get_context("spawn")  # never fork a process that has started JAX
    procs, conns = {}, {}
    for name, cfg in configs.items():
        parent, child = ctx.Pipe(duplex=False)
        procs[name] = ctx.Process(target=_worker, args=(cfg, saved_dirs[name], settings, child), daemon=True)
        procs[name].start()
        child.close()
        conns[name] = parent
    replies: dict[str, tuple[str, Any]] = {}
    try:
        for name, conn in conns.items():
            try:
                replies[name] = conn.recv()
            except EOFError:  # the worker died without a word (killed, out of memory)
                procs[name].join()
                replies[name] = (
                    "error",
                    ("FlaxNarrowError", f"the {name} worker exited with code {procs[name].exitcode}"),
                )
        for p in procs.values():
            p.join()
    finally:
        for p in procs.values():
            if p.is_alive():
                p.terminate()
    for name in configs:
        status, payload = replies[name]
        if status == "interrupted":
            raise KeyboardInterrupt
        if status == "error":
            kind, message = payload
            cls = getattr(errors, kind, None)
            if isinstance(cls, type) and issubclass(cls, errors.FlaxNarrowError):
                raise cls(message)
            raise errors.FlaxNarrowError(f"the {name} run failed: {kind}: {message}")
    return {name: replies[name][1] for name in configs}


def run_demo(
    out_dir: str | None = None,
    *,
    seconds: float | None = None,
    steps: int | None = None,
    overrides: Sequence[str] = (),
    texts: Sequence[str] = FILL_MASK_TEXTS,
) -> dict[str, Any]:
    """Pretrain NarrowBERT and BERT for the same time, print the comparison, save both; returns the figures.

    Args:
      out_dir: where the runs, saved models and the fine-tuning task go (default: a fresh temporary directory).
      seconds: training seconds per model (default :data:`DEFAULT_SECONDS`; compilation and evaluation are
        not counted).
      steps: at most this many steps per model (default: the preset's, more than the budget allows).
      overrides: extra ``section.field=value`` settings applied to both runs (tests shrink the models).
      texts: fill-mask probes, each with one ``[MASK]``.

    Returns:
      ``entropy`` (nats), per preset ``{name: {"evals", "steps", "steps_per_second", "saved"}}`` under
      ``runs``, the ``finetune_command`` (argv list), ``out_dir`` and the total ``seconds``.
    """
    import jax

    from flax_narrow.modeling import BertForMaskedLM
    from flax_narrow.tokenization import load_tokenizer

    from .config import load_config

    seconds = DEFAULT_SECONDS if seconds is None else float(seconds)
    out_dir = out_dir or tempfile.mkdtemp(prefix="flax-narrow-demo-")
    t_all = time.perf_counter()
    configs: dict[str, Any] = {}
    display = {"demo-narrowbert": "NarrowBERT", "demo-bert": "BERT"}
    with _quiet():
        for name in PRESETS:
            sets = [
                f"train.max_seconds={seconds}",
                f"train.eval_every_seconds={seconds / EVALS}",
                "train.eval_every=0",
                "train.progress_bar=false",
                *overrides,
                f"output_dir={os.path.join(out_dir, name)}",
            ]
            if steps is not None:
                sets.append(f"train.steps={steps}")
            configs[name] = load_config(name, None, sets)
            print(f"{_describe(configs[name])}", flush=True)
        n_docs, tokenizer = _prepare_data(configs[PRESETS[0]])
        print(
            f"Both train at once, each in its own process, on {n_docs} docstrings of Python's standard library,\n"
            f"for {seconds:g} s of training steps each (compilation and evaluation not counted), on "
            f"{jax.devices()[0].platform} ...",
            flush=True,
        )
        results = _train_together(configs, {n: os.path.join(out_dir, n, SAVED) for n in PRESETS})
        for name in PRESETS:
            r = results[name]
            last = r.evals[-1] if r.evals else {"train_seconds": float("nan")}
            print(
                f"  {display[name] + ':':<11} compiled in {r.compile_seconds:.1f} s, then {r.final_step} steps in "
                f"{last['train_seconds']:.1f} s ({r.tokens_per_second or 0:,.0f} tokens/s)",
                flush=True,
            )
        narrow, bert = (results[n] for n in PRESETS)
        rows = eval_rows(configs[PRESETS[0]], tokenizer)
        specials = tokenizer.all_special_ids
        entropy = unigram_entropy(rows, specials)
        plateau = unigram_cross_entropy(rows, [train_rows(configs[PRESETS[0]], tokenizer)], specials)
        n_eval = int(narrow.evals[-1]["eval_predictions"]) if narrow.evals else 0
        print(
            f"\nEval: {n_eval} masked tokens of {sum(len(r) for r in rows)} held-out rows, the same masks for both. "
            "Guessing each masked token\nfrom word frequencies alone, without its context, costs "
            f"{plateau:.3f} nats with the training split's frequencies\n(the plateau a run sits on before it uses "
            f"context); the unigram entropy of the eval tokens, {entropy:.3f} nats, is what\nthe best such guess "
            "can reach. A loss below it means the model uses context.\n"
        )
        print("\n".join("  " + line for line in eval_table({display[n]: results[n] for n in PRESETS})))
        if narrow.evals and bert.evals:
            a, b = narrow.evals[-1], bert.evals[-1]
            print(
                f"\nAfter {seconds:g} s of training each: NarrowBERT eval loss {a['eval_loss']:.3f} "
                f"({a['step']} steps), BERT {b['eval_loss']:.3f} ({b['step']} steps); unigram entropy {entropy:.3f}."
            )
            print(f"  {_verdict(a['eval_loss'], b['eval_loss'], entropy)}")
        saved = {name: results[name].saved for name in PRESETS}
        models = {display[n]: (BertForMaskedLM.from_pretrained(saved[n]), load_tokenizer(saved[n])) for n in PRESETS}
        print(f"\nFill-mask, top 3 (probability), models reloaded from {os.path.join(out_dir, '*', SAVED)}:")
        print("\n".join("  " + line for line in fill_mask_lines(models, texts)))
        task_dir = os.path.join(out_dir, "stdlib-packages")
        counts = write_finetune_task(task_dir)
        argv = finetune_command(saved[PRESETS[0]], task_dir, os.path.join(out_dir, "finetune-narrowbert"))
        total = time.perf_counter() - t_all
        print(
            f"\nDone in {total:.0f} s; everything is under {out_dir}.\nNext, fine-tune the NarrowBERT on "
            f"stdlib docstrings labelled by package ({len(FINETUNE_PACKAGES)} classes, {counts['train']} train / "
            f"{counts['dev']} dev):\n  {shlex.join(argv)}"
        )
    return {
        "entropy": entropy,
        "plateau": plateau,
        "runs": {
            n: {
                "evals": results[n].evals,
                "steps": results[n].final_step,
                "steps_per_second": results[n].steps_per_second,
                "saved": saved[n],
            }
            for n in PRESETS
        },
        "finetune_command": argv,
        "out_dir": out_dir,
        "seconds": total,
    }
