"""``flax-narrow finetune`` and ``flax-narrow agora``: thin wrappers over :func:`finetune.finetune` and
:func:`agora.run_agora`."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from typing import Any

from flax_narrow.errors import ConfigError, FlaxNarrowError

from .finetune_data import DataError
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
    p.add_argument(
        "--positive-label",
        help="binary classification: the class F1 scores (default: the data set's label 1, else the second name)",
    )
    p.add_argument(
        "--holdout-fraction",
        type=float,
        default=0.1,
        help="without --dev: this fixed part of --train is held out for evaluation (default 0.1)",
    )
    p.add_argument("--output-dir", required=True)
    p.add_argument(
        "--config", default=None, metavar="FILE", help="JSON or YAML file with a finetune: (and mesh:) section"
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.FIELD=VALUE",
        help="override one field of the finetune (FinetuneConfig) or mesh section, after the flags (repeatable)",
    )
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in --output-dir")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


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
    from .cli import add_distributed_args

    p = subparsers.add_parser("finetune", help="fine-tune an encoder on a labelled data set")
    _data_args(p)
    _train_args(p)
    add_distributed_args(p)
    p.set_defaults(func=run_finetune)
    a = subparsers.add_parser("agora", help="Agora-style rounds: candidates, mined mistakes, pruning")
    _data_args(a)
    _train_args(a)
    add_distributed_args(a)
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


@dataclasses.dataclass
class Prepared:
    """Everything a fine-tuning or Agora run needs before any device work: the task, the encoder, the
    canonical examples of each split, and the model source (a config for a preset, else a checkpoint)."""

    task: Any
    encoder: Any
    train: list[dict[str, Any]]
    dev: list[dict[str, Any]]
    test: list[dict[str, Any]] | None
    source: Any
    model_config: Any
    dev_held_out: bool = False

    def __iter__(self):  # the former tuple: task, enc, train, dev, test, source
        return iter((self.task, self.encoder, self.train, self.dev, self.test, self.source))


def model_source(model: str, tokenizer: Any) -> tuple[Any, Any]:
    """(what ``build_model`` takes, its EncoderConfig): a preset name gives a config sized to ``tokenizer``, a
    path or hub id gives itself and the checkpoint's config."""
    from flax_narrow.config import EncoderConfig
    from flax_narrow.pretrained import read_checkpoint_config, resolve_path

    if not any(c in model for c in "/.~") and not os.path.exists(model):
        key = model.replace("-", "_")  # one spelling for every command: tiny-bort and tiny_bort
        preset = getattr(EncoderConfig, key, None)
        if key not in model_presets() or not callable(preset):
            raise ConfigError(
                f"--model {model!r}: not a directory, and not a preset; presets: {', '.join(model_presets())}"
            )
        cfg = preset(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id)
        return cfg, cfg
    local = resolve_path(model)
    cfg, _, _ = read_checkpoint_config(local if os.path.isdir(local) else os.path.dirname(local))
    return model, cfg


_NOT_PRESETS = {"from_dict", "from_hf_config", "replace", "to_dict", "to_hf_config", "from_json"}


def model_presets() -> list[str]:
    from flax_narrow.config import EncoderConfig

    out = []
    for name in dir(EncoderConfig):
        if name.startswith("_") or name in _NOT_PRESETS:
            continue
        attr = getattr(EncoderConfig, name)
        if callable(attr) and isinstance(EncoderConfig.__dict__.get(name), (classmethod, staticmethod)):
            out.append(name)
    return sorted(out)


def prepare(args: argparse.Namespace) -> Prepared:
    """Load and check everything a ``finetune`` / ``agora`` command line names (importable: the CLIs' logic).

    Raises:
      FlaxNarrowError subclasses, one line each: a missing file, an empty one, a column typo, an empty label,
      ``--max-length`` over the model's positions, an unknown preset or positive label.
    """
    from flax_narrow.tokenization import load_tokenizer

    from .finetune_data import PRESETS, Encoder, holdout, infer_label_names, load_split
    from .tasks import Task

    columns: dict[str, Any] = {}
    for item in args.column:
        field, eq, col = item.partition("=")
        if not eq or not field or not col:
            raise ConfigError(f"--column {item!r}: expected FIELD=COLUMN, e.g. --column text_a=sentence")
        columns[field] = col.split(",") if "," in col else col
    if args.max_length < 8:
        raise ConfigError(f"--max-length must be >= 8, got {args.max_length}")
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
    tok = load_tokenizer(args.tokenizer or args.model)
    source, model_cfg = model_source(args.model, tok)
    room = model_cfg.max_position_embeddings - model_cfg.position_offset
    if args.max_length > room:
        raise ConfigError(f"--max-length {args.max_length} exceeds the model's {room} positions ({args.model})")
    if len(tok) > model_cfg.vocab_size:
        raise ConfigError(
            f"the tokenizer has {len(tok)} ids but the model's vocab_size is {model_cfg.vocab_size}; "
            "give the tokenizer the model was trained with (--tokenizer)"
        )
    train, order = load_split(train_src, args.train_split, kind, columns, name=name)
    held_out = False
    if dev_src:
        dev, dev_order = load_split(dev_src, args.dev_split, kind, columns, name=name)
    elif args.glue is None:
        fraction = getattr(args, "holdout_fraction", 0.1)
        train, dev = holdout(train, fraction, args.seed)
        held_out = True
        log.warning(
            "no --dev: holding out %d of the %d training examples (a fixed %.0f%%, seed %d) for evaluation and "
            "model selection", len(dev), len(dev) + len(train), 100 * fraction, args.seed,
        )  # fmt: skip
    test = load_split(args.test, args.test_split, kind, columns, name=name)[0] if args.test else None
    labels = infer_label_names(kind, train, order)
    if kind == "classification" and not order:
        seen = sorted({str(e["label"]) for e in dev if "label" in e} - set(labels))
        if seen:
            raise DataError(f"dev labels {seen} never occur in the training data (labels: {list(labels)})")
    if kind in ("classification", "multilabel", "token") and not labels:
        raise DataError(f"{train_src}: no labels found for task {kind!r}")
    positive = getattr(args, "positive_label", None)
    task = Task(kind, labels, metric, positive_label=positive)
    if task.positive is not None:
        log.info("binary F1 scores the positive label %r (label id %d)", task.positive, labels.index(task.positive))
    enc = Encoder(tok, args.max_length, args.pair_format, token_types=model_cfg.type_vocab_size > 1)
    return Prepared(task, enc, train, dev, test, source, model_cfg, held_out)


_prepare = prepare  # the former name


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
        progress_bar=not getattr(args, "no_progress", False),
    )


def resolve_configs(args: argparse.Namespace, sections: tuple[str, ...] = ("finetune", "mesh")):
    """(FinetuneConfig, MeshConfig): the flags, then the ``--config`` file's sections, then ``--set``
    overrides, through the typed sectioned config of ``pretrain`` (an unknown field lists the valid ones)."""
    from .config import MeshConfig, parse_overrides, read_config_file, update_section

    values = {"finetune": _finetune_config(args), "mesh": MeshConfig()}
    data = read_config_file(args.config) if getattr(args, "config", None) else {}
    unknown = sorted(set(data) - set(sections))
    if unknown:
        raise ConfigError(f"{args.config}: unknown section(s) {unknown}; sections are {list(sections)}")
    for where, nested in ((args.config, data), ("--set", parse_overrides(getattr(args, "overrides", []), sections))):
        for section, fields in nested.items():
            if not isinstance(fields, dict):
                raise ConfigError(f"{where}: section {section!r} must be a mapping, got {type(fields).__name__}")
            values[section] = update_section(values[section], fields, section, where)
    return values["finetune"], values["mesh"]


def _check_args(args: argparse.Namespace) -> None:
    """Cheap checks first, before any file is read or written."""
    if not 0 < args.holdout_fraction < 1:
        raise ConfigError(f"--holdout-fraction must be in (0, 1), got {args.holdout_fraction}")
    if args.max_length < 8:
        raise ConfigError(f"--max-length must be >= 8, got {args.max_length}")
    out = args.output_dir
    if os.path.isfile(out):
        raise ConfigError(f"--output-dir {out}: is a file")
    if os.path.isfile(os.path.join(out, "summary.json")) and not args.resume:
        raise ConfigError(f"--output-dir {out} holds a finished run (summary.json); choose another directory")


def _info_logging() -> None:
    import jax

    if jax.process_index() == 0:  # per-evaluation metrics at the default log level
        logging.getLogger("flax_narrow").setLevel(min(logging.getLogger().level, logging.INFO))


def run_finetune(args: argparse.Namespace) -> int:
    from .runtime import enable_compilation_cache

    _check_args(args)
    cfg, mesh_cfg = resolve_configs(args)
    from .cli import init_distributed

    init_distributed(args)
    enable_compilation_cache("auto")  # JAX_COMPILATION_CACHE_DIR wins; see train/runtime.py
    _info_logging()
    from . import sharding as shd
    from .finetune import build_model, finetune

    prep = prepare(args)
    task, enc = prep.task, prep.encoder
    test_data = enc.encode(task, prep.test) if prep.test else None
    train_data, dev_data = enc.encode(task, prep.train), enc.encode(task, prep.dev)
    model = build_model(task, prep.source, seed=args.seed)
    result = finetune(
        model,
        task,
        train_data,
        dev_data,
        cfg,
        output_dir=args.output_dir,
        test=test_data,
        resume=args.resume,
        tokenizer=enc.tokenizer,
        mesh=shd.make_mesh(mesh_cfg),
    )
    if result.preempted:
        print(f"flax-narrow finetune: stopped at step {result.final_step}; --resume continues", file=sys.stderr)
        return 128 + (result.stop_signal or 15)
    out = {"best_" + task.selection_metric: result.best_metric, "best_step": result.best_step}
    if result.test_metrics:
        out["test"] = result.test_metrics
    import jax

    out["collapsed"] = result.collapsed
    if jax.process_index() == 0:
        print(json.dumps(out))
    return 0


def run_agora_cli(args: argparse.Namespace) -> int:
    from .runtime import enable_compilation_cache

    _check_args(args)
    if args.test:
        raise ConfigError("agora does not score a test set; drop --test (use finetune --model ROUND_DIR/best --test)")
    cfg_ft, mesh_cfg = resolve_configs(args)
    if args.rounds is not None and args.rounds < 1:
        raise ConfigError(f"--rounds must be >= 1, got {args.rounds}")
    if args.replay < 0:
        raise ConfigError(f"--replay must be >= 0, got {args.replay}")
    if args.points_per_mistake < 1:
        raise ConfigError(f"--points-per-mistake must be >= 1, got {args.points_per_mistake}")
    theta = _theta(args)
    from .cli import init_distributed

    init_distributed(args)
    enable_compilation_cache("auto")  # JAX_COMPILATION_CACHE_DIR wins; see train/runtime.py
    _info_logging()
    from flax_narrow.modeling.bert import BertForMaskedLM
    from flax_narrow.pretrained import from_pretrained

    from . import agora
    from .finetune import build_model

    prep = prepare(args)
    task, enc, train, dev, source = prep.task, prep.encoder, prep.train, prep.dev, prep.source
    from .augment import SpanSwap, TokenDropout

    labeller = None
    if args.labeller:
        labeller = agora.ClassifierLabeller(agora.load_labeller_model(args.labeller, task), task, enc)
    if args.g == "mlm":
        if not args.mlm:
            raise ConfigError("--g mlm needs --mlm (an MLM checkpoint dir); or use --g dropout / --g swap")
        mlm = from_pretrained(BertForMaskedLM, args.mlm, strict=True)
        if mlm.config.vocab_size < len(enc.tokenizer):
            raise ConfigError(
                f"--mlm {args.mlm}: vocab_size {mlm.config.vocab_size} is smaller than the tokenizer's "
                f"{len(enc.tokenizer)}"
            )
        g = agora.MLMInfill(mlm, enc.tokenizer, max_length=args.max_length, allow_untrained=args.allow_untrained_mlm)
    else:
        g = TokenDropout() if args.g == "dropout" else SpanSwap()
    cfg = agora.AgoraConfig(
        args.output_dir,
        probe_fraction=args.probe_fraction,
        points_per_mistake=args.points_per_mistake,
        max_rounds=args.rounds,
        replay=args.replay,
        side_by_side=not args.sequential,
        seed=args.seed,
        finetune=cfg_ft,
        mesh=mesh_cfg,
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
    if result.preempted:
        print(f"flax-narrow agora: stopped in round {result.round}; run again to resume", file=sys.stderr)
        return 128 + (result.stop_signal or 15)
    print(json.dumps({"final_round": result.round, "heldout": result.heldout, "rounds": len(result.rounds)}))
    return 0


def _theta(args: argparse.Namespace) -> list[Any]:
    from .candidates import Candidate, bort_grid

    if args.theta == "bort":
        return bort_grid(args.epochs)
    if args.theta == "small":
        return [
            Candidate(lr, args.weight_decay, args.warmup_ratio, args.batch_size, s, args.epochs)
            for lr in (args.lr, args.lr * 3)
            for s in (0, 1)
        ]
    try:
        with open(args.theta, encoding="utf-8") as fh:
            raw = json.load(fh)
    except OSError as e:
        raise ConfigError(f"--theta {args.theta}: not 'bort' or 'small', and cannot read it ({e.strerror})") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"--theta {args.theta}: not valid JSON ({e})") from None
    if not isinstance(raw, list) or not raw:
        raise ConfigError(f"--theta {args.theta}: expected a non-empty JSON list of candidates")
    fields = {f.name for f in dataclasses.fields(Candidate)}
    out = []
    for i, c in enumerate(raw):
        bad = sorted(set(c) - fields) if isinstance(c, dict) else ["(not an object)"]
        if bad:
            raise ConfigError(f"--theta {args.theta}: candidate {i}: unknown field(s) {bad}; fields: {sorted(fields)}")
        out.append(Candidate(**c))
    return out
