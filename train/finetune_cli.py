"""``flax-narrow finetune`` and ``flax-narrow agora``: parse the command line, build the run's
:class:`~flax_narrow.train.finetune_config.FinetuneRunConfig`, call :mod:`flax_narrow.train.finetune_run`.

The config is the defaults, then ``--config FILE``, then the flags given on the command line, then ``--set
section.field=value``: the file is the base a series of runs shares, what is typed on the command line changes
this run, and ``--set`` (which reaches every field, where the flags are shortcuts for some) comes last. Every
flag is one field (:data:`FLAGS`); a flag left out leaves the field to the file or its default.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any

from flax_narrow.errors import ConfigError

from .finetune_run import Prepared, model_presets, model_source  # noqa: F401 - the former home of these
from .tasks import TASKS

log = logging.getLogger(__name__)

# flag dest -> (section or None for a top-level field, field, value for a store_true flag or None)
FLAGS: dict[str, tuple[str | None, str, Any]] = {
    "model": ("model", "name_or_path", None),
    "tokenizer": ("model", "tokenizer", None),
    "task": ("data", "task", None),
    "glue": ("data", "glue", None),
    "train": ("data", "train", None),
    "dev": ("data", "dev", None),
    "test": ("data", "test", None),
    "dataset_config": ("data", "dataset_config", None),
    "train_split": ("data", "train_split", None),
    "dev_split": ("data", "dev_split", None),
    "test_split": ("data", "test_split", None),
    "max_length": ("data", "max_length", None),
    "pair_format": ("data", "pair_format", None),
    "metric": ("data", "metric", None),
    "positive_label": ("data", "positive_label", None),
    "holdout_fraction": ("data", "holdout_fraction", None),
    "lr": ("finetune", "learning_rate", None),
    "weight_decay": ("finetune", "weight_decay", None),
    "warmup_ratio": ("finetune", "warmup_ratio", None),
    "epochs": ("finetune", "epochs", None),
    "batch_size": ("finetune", "batch_size", None),
    "eval_batch_size": ("finetune", "eval_batch_size", None),
    "eval_every": ("finetune", "eval_every", None),
    "patience": ("finetune", "patience", None),
    "seed": ("finetune", "seed", None),
    "head": ("finetune", "head", None),
    "no_progress": ("finetune", "progress_bar", False),
    "output_dir": (None, "output_dir", None),
    "resume": (None, "resume", True),
    "theta": ("agora", "theta", None),
    "g": ("agora", "g", None),
    "mlm": ("agora", "mlm", None),
    "allow_untrained_mlm": ("agora", "allow_untrained_mlm", True),
    "labeller": ("agora", "labeller", None),
    "rounds": ("agora", "max_rounds", None),
    "replay": ("agora", "replay", None),
    "probe_fraction": ("agora", "probe_fraction", None),
    "points_per_mistake": ("agora", "points_per_mistake", None),
    "prune": ("agora", "prune", None),
    "sequential": ("agora", "side_by_side", False),
}


def _default(section: str | None, field: str) -> Any:
    import dataclasses

    from .finetune_config import SECTIONS, FinetuneRunConfig

    cls = FinetuneRunConfig if section is None else SECTIONS[section]
    f = next(f for f in dataclasses.fields(cls) if f.name == field)
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()


def _add(p: argparse.ArgumentParser, flag: str, help: str, **kw: Any) -> None:
    """A flag of :data:`FLAGS`: default None (not given), its field and default in the help."""
    dest = flag[2:].replace("-", "_")
    section, field, const = FLAGS[dest]
    name = field if section is None else f"{section}.{field}"
    if const is not None:
        p.add_argument(flag, action="store_true", default=None, help=f"{help} [{name}={const}]")
        return
    default = _default(section, field)
    shown = "" if default is None else f", default {default}"
    p.add_argument(flag, default=None, help=f"{help} [{name}{shown}]", **kw)


def _data_args(p: argparse.ArgumentParser) -> None:
    _add(p, "--model", "checkpoint dir, hub id, or a model preset (" + ", ".join(model_presets()) + ")")
    _add(p, "--tokenizer", "tokenizer dir or hub id (default: --model)")
    _add(p, "--task", "the task kind", choices=TASKS)
    _add(p, "--glue", "a GLUE/SuperGLUE preset (needs the hub): " + ", ".join(_presets()))
    _add(p, "--train", "train file (csv/tsv/json/jsonl/parquet) or hub dataset name")
    _add(p, "--dev", "dev file or hub dataset name (default: a held-out part of --train)")
    _add(p, "--test", "test file or hub dataset name; predictions go to OUTPUT/predictions.jsonl")
    _add(p, "--dataset-config", "hub dataset config name")
    _add(p, "--train-split", "split of a hub --train")
    _add(p, "--dev-split", "split of a hub --dev")
    _add(p, "--test-split", "split of a hub --test")
    p.add_argument(
        "--column",
        action="append",
        default=[],
        metavar="FIELD=COL",
        help="column map, repeatable (adds to the config file's columns) [data.columns]",
    )
    _add(p, "--max-length", "tokens per row", type=int)
    _add(p, "--pair-format", "how a pair is joined", choices=("single_sep", "double_sep"))
    _add(p, "--metric", "selection metric (default: the task's)")
    _add(
        p,
        "--positive-label",
        "binary classification: the class F1 scores (default: the data set's label 1, else the second name)",
    )
    _add(p, "--holdout-fraction", "without --dev: this fixed part of --train is held out for evaluation", type=float)
    _add(p, "--output-dir", "run directory")
    p.add_argument(
        "--config",
        default=None,
        metavar="FILE",
        help="JSON or YAML file with the sections model, data, finetune, mesh (agora: and agora), and output_dir; "
        "the flags given win over it",
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.FIELD=VALUE",
        help="override one field, after the file and the flags (repeatable): e.g. finetune.learning_rate=1e-4, "
        "data.columns={text_a: s, label: y}, mesh.data=2, output_dir=runs/x",
    )
    _add(p, "--resume", "continue an interrupted run in --output-dir")
    _add(p, "--no-progress", "no progress bar")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as JSON and exit")


def _train_args(p: argparse.ArgumentParser) -> None:
    _add(p, "--lr", "peak learning rate", type=float)
    _add(p, "--weight-decay", "decoupled weight decay", type=float)
    _add(p, "--warmup-ratio", "warmup part of the steps", type=float)
    _add(p, "--epochs", "epochs", type=float)
    _add(p, "--batch-size", "examples per step", type=int)
    _add(p, "--eval-batch-size", "examples per evaluation batch", type=int)
    _add(p, "--eval-every", "steps between evaluations (0: every epoch)", type=int)
    _add(p, "--patience", "early stopping patience in evaluations (0: off)", type=int)
    _add(p, "--seed", "init, data order, dropout and the held-out part", type=int)
    _add(p, "--head", "the classification head", choices=("standard", "bort"))


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
    _add(a, "--theta", "'bort' (the released 480-set grid), 'small', or a JSON file of candidates")
    _add(a, "--mlm", "MLM checkpoint dir for the infilling transformation g (--g mlm)")
    _add(a, "--g", "g: MLM infilling (needs --mlm with a trained head), token dropout or span swap",
         choices=("mlm", "dropout", "swap"))  # fmt: skip
    _add(a, "--allow-untrained-mlm", "use --mlm even if its head looks untrained")
    _add(a, "--labeller", "fine-tuned classifier checkpoint dir (S; default: previous round's best)")
    _add(a, "--rounds", "at most this many rounds (default |Θ|)", type=int)
    _add(a, "--replay", "rounds that re-train the survivors once Θ is exhausted", type=int)
    _add(a, "--probe-fraction", "part of dev mistakes are mined on (the rest is held out)", type=float)
    _add(a, "--points-per-mistake", "new points g makes of each mistake", type=int)
    _add(a, "--prune", "pruning rule", choices=("half", "notes"))
    _add(a, "--sequential", "train candidates one by one (not vmapped)")
    a.set_defaults(func=run_agora_cli)


def config_from_args(args: argparse.Namespace, command: str | None = None) -> Any:
    """The :class:`~flax_narrow.train.finetune_config.FinetuneRunConfig` of a parsed command line: the
    defaults, then ``--config``, then the flags given (each flag is one field, :data:`FLAGS`), then ``--set``.
    A Namespace without some of the attributes (an old caller's) leaves those fields alone."""
    from .finetune_config import load_finetune_config

    command = command or getattr(args, "command", None) or "finetune"
    flags: dict[str, Any] = {}
    for dest, (section, field, const) in FLAGS.items():
        value = getattr(args, dest, None)
        if value is None or value is False or (section == "agora" and command != "agora"):
            continue
        value = const if const is not None else value
        if section is None:
            flags[field] = value
        else:
            flags.setdefault(section, {})[field] = value
    columns = _columns(getattr(args, "column", None) or [])
    if columns:
        flags.setdefault("data", {})["columns"] = columns
    return load_finetune_config(
        getattr(args, "config", None), getattr(args, "overrides", None) or [], command=command, flags=flags
    )


def _columns(items: list[str]) -> dict[str, Any]:
    columns: dict[str, Any] = {}
    for item in items:
        field, eq, col = item.partition("=")
        if not eq or not field or not col:
            raise ConfigError(f"--column {item!r}: expected FIELD=COLUMN, e.g. --column text_a=sentence")
        columns[field] = tuple(col.split(",")) if "," in col else col
    return columns


def prepare(cfg: Any) -> Prepared:
    """:func:`flax_narrow.train.finetune_run.prepare` of a config, or of a parsed command line (converted with
    :func:`config_from_args`, for callers of the former ``prepare(args)``)."""
    from .finetune_run import prepare as prepare_config

    if isinstance(cfg, argparse.Namespace):
        cfg = config_from_args(cfg)
    return prepare_config(cfg)


_prepare = prepare  # the former name


def resolve_configs(args: argparse.Namespace, sections: tuple[str, ...] = ("finetune", "mesh")):
    """(FinetuneConfig, MeshConfig) of a parsed command line (the former API; see :func:`config_from_args`)."""
    cfg = config_from_args(args)
    return cfg.finetune, cfg.mesh


def _info_logging() -> None:
    import jax

    if jax.process_index() == 0:  # per-evaluation metrics at the default log level
        logging.getLogger("flax_narrow").setLevel(min(logging.getLogger().level, logging.INFO))


def _start(args: argparse.Namespace, command: str) -> Any:
    """The config, then (unless --print-config) the devices, the compilation cache and the log level."""
    from .cli import init_distributed
    from .runtime import enable_compilation_cache

    cfg = config_from_args(args, command)
    if getattr(args, "print_config", False):
        print(json.dumps(cfg.to_dict(), indent=2))
        return None
    from .finetune_run import check_output_dir

    check_output_dir(cfg)  # cheap checks first, before any device work
    init_distributed(args)
    enable_compilation_cache("auto")  # JAX_COMPILATION_CACHE_DIR wins; see train/runtime.py
    _info_logging()
    return cfg


def run_finetune(args: argparse.Namespace) -> int:
    """``flax-narrow finetune``: command line -> config -> :func:`finetune_run.finetune_from_config`."""
    from .finetune_run import finetune_from_config, prepare

    cfg = _start(args, "finetune")
    if cfg is None:
        return 0
    prep = prepare(cfg)
    result = finetune_from_config(cfg, prep)
    if result.preempted:
        print(f"flax-narrow finetune: stopped at step {result.final_step}; --resume continues", file=sys.stderr)
        return 128 + (result.stop_signal or 15)
    out = {"best_" + prep.task.selection_metric: result.best_metric, "best_step": result.best_step}
    if result.test_metrics:
        out["test"] = result.test_metrics
    import jax

    out["collapsed"] = result.collapsed
    if jax.process_index() == 0:
        print(json.dumps(out))
    return 0


def run_agora_cli(args: argparse.Namespace) -> int:
    """``flax-narrow agora``: command line -> config -> :func:`finetune_run.agora_from_config`."""
    from .finetune_run import agora_from_config

    cfg = _start(args, "agora")
    if cfg is None:
        return 0
    result = agora_from_config(cfg)
    if result.preempted:
        print(f"flax-narrow agora: stopped in round {result.round}; run again to resume", file=sys.stderr)
        return 128 + (result.stop_signal or 15)
    print(json.dumps({"final_round": result.round, "heldout": result.heldout, "rounds": len(result.rounds)}))
    return 0
