"""``flax-narrow finetune`` and ``flax-narrow agora``: thin wrappers over :func:`finetune.finetune` and
:func:`agora.run_agora`."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
from typing import Any

from flax_narrow.errors import FlaxNarrowError

from .tasks import TASKS

log = logging.getLogger(__name__)


def _data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="checkpoint dir, or a preset name (tiny, tiny_bort, bort, ...)")
    p.add_argument("--tokenizer", help="tokenizer dir or hub id (default: --model)")
    p.add_argument("--task", choices=TASKS, default="classification")
    p.add_argument("--glue", help="a GLUE/SuperGLUE preset (needs the hub): " + ", ".join(_presets()))
    p.add_argument("--train", help="train file (csv/tsv/json/jsonl/parquet) or hub dataset name")
    p.add_argument("--dev", help="dev file or hub dataset name (default: --train with --dev-split)")
    p.add_argument("--test", help="test file or hub dataset name; predictions go to OUTPUT/predictions.jsonl")
    p.add_argument("--dataset-config", help="hub dataset config name")
    p.add_argument("--train-split", default="train")
    p.add_argument("--dev-split", default="validation")
    p.add_argument("--test-split", default="test")
    p.add_argument("--column", action="append", default=[], metavar="FIELD=COL", help="column map, repeatable")
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--pair-format", choices=("single_sep", "double_sep"), default="single_sep")
    p.add_argument("--metric", help="selection metric (default: the task's)")
    p.add_argument("--output-dir", required=True)


def _train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--lr", type=float, default=3e-5)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--warmup-ratio", type=float, default=0.1)
    p.add_argument("--epochs", type=float, default=3.0)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--eval-batch-size", type=int, default=64)
    p.add_argument("--eval-every", type=int, default=0, help="steps between evaluations (0: every epoch)")
    p.add_argument("--patience", type=int, default=0, help="early stopping patience in evaluations (0: off)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--head", choices=("standard", "bort"), default="standard")


def _presets() -> list[str]:
    from .finetune_data import PRESETS

    return sorted(PRESETS)


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("finetune", help="fine-tune an encoder on a labelled data set")
    _data_args(p)
    _train_args(p)
    p.set_defaults(func=run_finetune)
    a = subparsers.add_parser("agora", help="Agora-style rounds: candidates, mined mistakes, pruning")
    _data_args(a)
    _train_args(a)
    a.add_argument("--theta", default="small", help="'bort' (the released 480-set grid), 'small', or a JSON file")
    a.add_argument("--mlm", help="MLM checkpoint dir for the infilling transformation g (--g mlm)")
    a.add_argument("--g", choices=("mlm", "dropout", "swap"), default="mlm",
                   help="g: MLM infilling (needs --mlm with a trained head), token dropout or span swap")  # fmt: skip
    a.add_argument("--allow-untrained-mlm", action="store_true", help="use --mlm even if its head looks untrained")
    a.add_argument("--labeller", help="fine-tuned classifier checkpoint dir (S; default: previous round's best)")
    a.add_argument("--rounds", type=int, help="at most this many rounds (default |Θ|)")
    a.add_argument("--replay", type=int, default=0)
    a.add_argument("--probe-fraction", type=float, default=0.5)
    a.add_argument("--points-per-mistake", type=int, default=2)
    a.add_argument("--prune", choices=("half", "notes"), default="half")
    a.add_argument("--sequential", action="store_true", help="train candidates one by one (not vmapped)")
    a.set_defaults(func=run_agora_cli)


def _prepare(args: argparse.Namespace):
    from flax_narrow.config import EncoderConfig
    from flax_narrow.tokenization import load_tokenizer

    from .finetune_data import PRESETS, Encoder, infer_label_names, load_examples
    from .tasks import Task

    columns: dict[str, Any] = {}
    for item in args.column:
        field, _, col = item.partition("=")
        columns[field] = col.split(",") if "," in col else col
    train_src, dev_src, name, metric = args.train, args.dev, args.dataset_config, args.metric
    kind = args.task
    if args.glue:
        if args.glue not in PRESETS:
            raise FlaxNarrowError(f"unknown preset {args.glue!r}; choose one of {', '.join(_presets())}")
        path, name, kind, cols, m = PRESETS[args.glue]
        train_src = dev_src = path
        columns = {**cols, **columns}
        metric = metric or m
    if not train_src:
        raise FlaxNarrowError("give --train (a file or hub name) or --glue")
    dev_src = dev_src or train_src
    train = load_examples(train_src, args.train_split, kind, columns, name=name)
    dev = load_examples(dev_src, args.dev_split, kind, columns, name=name)
    test = load_examples(args.test, args.test_split, kind, columns, name=name) if args.test else None
    task = Task(kind, infer_label_names(kind, train), metric)
    tok = load_tokenizer(args.tokenizer or args.model)
    preset = getattr(EncoderConfig, args.model, None) if not any(c in args.model for c in "/.") else None
    source = preset(vocab_size=len(tok), pad_token_id=tok.pad_token_id) if callable(preset) else args.model
    types = not callable(preset) or preset().type_vocab_size > 1
    enc = Encoder(tok, args.max_length, args.pair_format, token_types=types)
    return task, enc, train, dev, test, source


def _finetune_config(args: argparse.Namespace):
    from .finetune import FinetuneConfig

    return FinetuneConfig(
        learning_rate=args.lr,
        weight_decay=args.weight_decay,
        warmup_ratio=args.warmup_ratio,
        epochs=args.epochs,
        batch_size=args.batch_size,
        eval_batch_size=args.eval_batch_size,
        seed=args.seed,
        eval_every=args.eval_every,
        patience=args.patience,
        head=args.head,
    )


def run_finetune(args: argparse.Namespace) -> int:
    from .runtime import enable_compilation_cache

    enable_compilation_cache("auto")  # JAX_COMPILATION_CACHE_DIR wins; see train/runtime.py
    from .finetune import build_model, finetune

    task, enc, train, dev, test, source = _prepare(args)
    cfg = _finetune_config(args)
    model = build_model(task, source, seed=args.seed)
    test_data = None
    if test:
        strip = {"label", "tags"}
        test_data = enc.encode(task, [{k: v for k, v in e.items() if k not in strip} for e in test])
    result = finetune(
        model, task, enc.encode(task, train), enc.encode(task, dev), cfg, output_dir=args.output_dir, test=test_data
    )
    out = {"best_" + task.selection_metric: result.best_metric, "best_step": result.best_step}
    print(json.dumps({**out, "collapsed": result.collapsed}))
    return 0


def run_agora_cli(args: argparse.Namespace) -> int:
    from .runtime import enable_compilation_cache

    enable_compilation_cache("auto")  # JAX_COMPILATION_CACHE_DIR wins; see train/runtime.py
    from flax_narrow.modeling.bert import BertForMaskedLM

    from . import agora
    from .candidates import Candidate, bort_grid
    from .finetune import build_model

    task, enc, train, dev, _, source = _prepare(args)
    if args.theta == "bort":
        theta = bort_grid(args.epochs)
    elif args.theta == "small":
        theta = [
            Candidate(lr, args.weight_decay, args.warmup_ratio, args.batch_size, s, args.epochs)
            for lr in (args.lr, args.lr * 3)
            for s in (0, 1)
        ]
    else:
        with open(args.theta, encoding="utf-8") as fh:
            theta = [Candidate(**c) for c in json.load(fh)]
    from .augment import SpanSwap, TokenDropout

    if args.g == "mlm" and not args.mlm:
        raise FlaxNarrowError("--g mlm needs --mlm (an MLM checkpoint dir); or use --g dropout / --g swap")
    if args.g == "mlm":
        g = agora.MLMInfill(BertForMaskedLM.from_pretrained(args.mlm), enc.tokenizer, max_length=args.max_length,
                            allow_untrained=args.allow_untrained_mlm)  # fmt: skip
    else:
        g = TokenDropout() if args.g == "dropout" else SpanSwap()
    labeller = agora.ClassifierLabeller(build_model(task, args.labeller), task, enc) if args.labeller else None
    cfg = agora.AgoraConfig(
        args.output_dir,
        probe_fraction=args.probe_fraction,
        points_per_mistake=args.points_per_mistake,
        max_rounds=args.rounds,
        replay=args.replay,
        side_by_side=not args.sequential,
        seed=args.seed,
        finetune=dataclasses.replace(_finetune_config(args)),
    )
    result = agora.run_agora(
        task,
        enc,
        train,
        dev,
        theta,
        lambda seed: build_model(task, source, seed=seed),
        g,
        labeller,
        cfg,
        agora.KeepBetterHalf() if args.prune == "half" else agora.NotesPrefixRule(),
    )
    print(json.dumps({"final_round": result.round, "heldout": result.heldout, "rounds": len(result.rounds)}))
    return 0
