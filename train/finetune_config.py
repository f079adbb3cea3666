"""The typed, sectioned config of a ``finetune`` or ``agora`` run, built like ``pretrain``'s
(:mod:`flax_narrow.train.config`: the same file reader, ``--set`` parser, type coercion and error messages).

A run is one :class:`FinetuneRunConfig`: ``model`` (:class:`ModelSource`: checkpoint or preset, tokenizer),
``data`` (:class:`FinetuneDataConfig`), ``finetune`` (:class:`~flax_narrow.train.finetune.FinetuneConfig`),
``mesh`` (:class:`~flax_narrow.train.config.MeshConfig`), ``agora`` (:data:`AgoraSettings`; ``agora`` only) and
the top-level ``output_dir`` and ``resume``. It is built from the defaults, then a JSON/YAML file, then the
command line's flags, then ``section.field=value`` overrides, each layer winning over the one before::

    cfg = load_finetune_config(file="run.yaml", overrides=["finetune.learning_rate=1e-4"])

The file holds the same sections::

    model: {name_or_path: runs/pretrain, tokenizer: null}
    data: {train: train.jsonl, dev: dev.jsonl, columns: {text_a: sentence, label: y}, max_length: 128}
    finetune: {learning_rate: 3.0e-5, epochs: 3, batch_size: 32}
    output_dir: runs/ft

The run directory records the resolved config (``finetune_config.json``); a resumed run whose shape-relevant
fields differ from the record is refused (:func:`check_resume`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import typing
from collections.abc import Mapping, Sequence
from typing import Any

from flax_narrow.config import SHAPE_FIELDS
from flax_narrow.errors import ConfigError

from .agora import AgoraConfig
from .config import (
    MeshConfig,
    canonical_name,
    check_sections,
    coerce,
    jsonable,
    parse_overrides,
    read_config_file,
    section_values,
)
from .finetune import FinetuneConfig
from .finetune_data import PAIR_FORMATS, PRESETS
from .tasks import TASKS

log = logging.getLogger(__name__)

RUN_CONFIG = "finetune_config.json"
TOP_LEVEL = ("output_dir", "resume")
FLAGS_LAYER = "command line"
G_CHOICES = ("mlm", "dropout", "swap")
PRUNE_CHOICES = ("half", "notes")


def _need(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


@dataclasses.dataclass(frozen=True)
class ModelSource:
    """Section ``model``: what is fine-tuned."""

    # A checkpoint directory (a finetune ``best/``, a pretrain run directory, a ``convert`` output), a hub id,
    # or a model preset name (``tiny``, ``tiny-bort``, ...: random init). Flag: --model.
    name_or_path: str | None = None
    # A tokenizer directory or hub id; None: the model's. Flag: --tokenizer.
    tokenizer: str | None = None


@dataclasses.dataclass(frozen=True)
class FinetuneDataConfig:
    """Section ``data``: the labelled examples and how they become fixed-shape rows."""

    task: str = "classification"
    # A GLUE/SuperGLUE preset (needs the hub): sets train/dev, the columns, the task and the metric.
    glue: str | None = None
    train: str | None = None
    dev: str | None = None
    test: str | None = None
    dataset_config: str | None = None
    train_split: str = "train"
    dev_split: str = "validation"
    test_split: str = "test"
    # Canonical field -> source column (``{text_a: sentence, label: y}``); a list (or "a,b") for choices.
    columns: dict[str, str | tuple[str, ...]] = dataclasses.field(default_factory=dict)
    max_length: int = 128
    pair_format: str = "single_sep"
    metric: str | None = None
    positive_label: str | None = None
    # Without ``dev``: this fixed part of ``train`` (drawn by finetune.seed) is held out for evaluation.
    holdout_fraction: float = 0.1

    def __post_init__(self) -> None:
        _need(self.task in TASKS, f"data.task (--task): {self.task!r} is not one of {TASKS}")
        if self.glue is not None:
            key = canonical_name(self.glue, PRESETS)
            _need(
                key is not None,
                f"data.glue (--glue): unknown preset {self.glue!r}; choose one of {', '.join(sorted(PRESETS))}",
            )
            object.__setattr__(self, "glue", key)
        _need(self.max_length >= 8, f"data.max_length (--max-length): must be >= 8, got {self.max_length}")
        _need(
            self.pair_format in PAIR_FORMATS,
            f"data.pair_format (--pair-format): {self.pair_format!r} is not one of {PAIR_FORMATS}",
        )
        _need(
            0 < self.holdout_fraction < 1,
            f"data.holdout_fraction (--holdout-fraction): must be in (0, 1), got {self.holdout_fraction}",
        )
        columns: dict[str, str | tuple[str, ...]] = {}
        for field, col in dict(self.columns).items():
            if isinstance(col, str) and "," in col:
                col = tuple(c.strip() for c in col.split(",") if c.strip())
            _need(bool(field) and bool(col), f"data.columns: {field}={col!r}: expected FIELD=COLUMN")
            columns[field] = col
        object.__setattr__(self, "columns", columns)


# ------------------------------------------------------------------------------------------------ agora
# AgoraSettings holds these command-level settings, and then every field of agora.AgoraConfig by name (so a
# field added there is settable here), except the ones the run fills: out_dir (output_dir), seed
# (finetune.seed) and the config sections (finetune, mesh: AgoraConfig's dataclass-typed fields take the
# run's section of the same name).
AGORA_FROM_RUN = ("out_dir", "seed")
_AGORA_COMMAND_FIELDS: list[tuple[str, Any, Any]] = [
    # 'bort' (the released 480-set grid), 'small' (lr x {1, 3}, seeds {0, 1}), or a JSON file of candidates.
    ("theta", str, "small"),
    # The transformation g: MLM infilling (needs ``mlm``), token dropout, or span swap.
    ("g", str, "mlm"),
    ("mlm", str | None, None),
    ("allow_untrained_mlm", bool, False),
    # A fine-tuned classifier checkpoint (S); None: the previous round's best.
    ("labeller", str | None, None),
    ("prune", str, "half"),
]


def _agora_config_fields() -> list[tuple[str, Any, Any]]:
    hints = typing.get_type_hints(AgoraConfig)
    out = []
    for f in dataclasses.fields(AgoraConfig):
        if f.name in AGORA_FROM_RUN or dataclasses.is_dataclass(hints[f.name]):
            continue
        if f.default is not dataclasses.MISSING:
            out.append((f.name, hints[f.name], dataclasses.field(default=f.default)))
        else:
            out.append((f.name, hints[f.name], dataclasses.field(default_factory=f.default_factory)))
    return out


def _agora_post_init(self: Any) -> None:
    _need(bool(self.theta), "agora.theta (--theta): give 'bort', 'small' or a JSON file of candidates")
    _need(self.g in G_CHOICES, f"agora.g (--g): {self.g!r} is not one of {G_CHOICES}")
    _need(self.prune in PRUNE_CHOICES, f"agora.prune (--prune): {self.prune!r} is not one of {PRUNE_CHOICES}")
    _need(
        self.max_rounds is None or self.max_rounds >= 1,
        f"agora.max_rounds (--rounds): must be >= 1, got {self.max_rounds}",
    )
    _need(self.replay >= 0, f"agora.replay (--replay): must be >= 0, got {self.replay}")
    _need(
        self.points_per_mistake >= 1,
        f"agora.points_per_mistake (--points-per-mistake): must be >= 1, got {self.points_per_mistake}",
    )
    _need(
        0 < self.probe_fraction < 1,
        f"agora.probe_fraction (--probe-fraction): must be in (0, 1), got {self.probe_fraction}",
    )
    _need(self.max_mistakes >= 1, f"agora.max_mistakes: must be >= 1, got {self.max_mistakes}")


def _to_agora_config(self: Any, out_dir: str, sections: Mapping[str, Any], seed: int) -> AgoraConfig:
    """The :class:`~flax_narrow.train.agora.AgoraConfig` of this section, its fields by name; ``sections`` fill
    its dataclass-typed fields (``finetune``, ``mesh``)."""
    hints = typing.get_type_hints(AgoraConfig)
    kw: dict[str, Any] = {"out_dir": out_dir, "seed": seed}
    for f in dataclasses.fields(AgoraConfig):
        if f.name in kw:
            continue
        if dataclasses.is_dataclass(hints[f.name]):
            if f.name in sections:
                kw[f.name] = sections[f.name]
        else:
            kw[f.name] = getattr(self, f.name)
    return AgoraConfig(**kw)


AgoraSettings = dataclasses.make_dataclass(
    "AgoraSettings",
    [*_AGORA_COMMAND_FIELDS, *_agora_config_fields()],
    frozen=True,
    namespace={"__post_init__": _agora_post_init, "to_agora_config": _to_agora_config},
)
AgoraSettings.__module__ = __name__
AgoraSettings.__doc__ = (
    "Section ``agora``: " + ", ".join(f.name for f in dataclasses.fields(AgoraSettings)) + ". The first "
    f"{len(_AGORA_COMMAND_FIELDS)} are the command's (Θ, g, MLM, labeller, pruning rule); the rest are "
    "agora.AgoraConfig's fields, by name."
)


# ------------------------------------------------------------------------------------------------ the run
@dataclasses.dataclass(frozen=True)
class FinetuneRunConfig:
    """Everything one ``finetune`` (``agora`` is None) or ``agora`` run needs."""

    model: ModelSource = dataclasses.field(default_factory=ModelSource)
    data: FinetuneDataConfig = dataclasses.field(default_factory=FinetuneDataConfig)
    finetune: FinetuneConfig = dataclasses.field(default_factory=FinetuneConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    agora: AgoraSettings | None = None  # type: ignore[valid-type]
    # Run directory: checkpoints, metrics, best/, predictions, summary, finetune_config.json (agora: rounds).
    output_dir: str | None = None
    # finetune: continue an interrupted run in output_dir (agora resumes after its last finished round).
    resume: bool = False

    def __post_init__(self) -> None:
        if self.agora is not None:
            _need(
                self.data.test is None,
                "agora does not score a test set; drop --test (use finetune --model ROUND_DIR/best --test)",
            )

    @property
    def command(self) -> str:
        return "finetune" if self.agora is None else "agora"

    def agora_config(self) -> AgoraConfig:
        """The :class:`~flax_narrow.train.agora.AgoraConfig` of an ``agora`` run."""
        _need(self.agora is not None, "this is a finetune config: it has no agora section")
        _need(self.output_dir is not None, "agora needs output_dir (--output-dir)")
        sections = {"finetune": self.finetune, "mesh": self.mesh}
        return self.agora.to_agora_config(self.output_dir, sections, self.finetune.seed)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"output_dir": self.output_dir, "resume": self.resume}
        for name in sections_of(self.command):
            out[name] = jsonable(dataclasses.asdict(getattr(self, name)))
        return out

    def replace(self, **changes: Any) -> FinetuneRunConfig:
        return dataclasses.replace(self, **changes)


SECTIONS: dict[str, type] = {
    "model": ModelSource,
    "data": FinetuneDataConfig,
    "finetune": FinetuneConfig,
    "mesh": MeshConfig,
    "agora": AgoraSettings,
}


def sections_of(command: str) -> tuple[str, ...]:
    """The sections a command reads (``agora`` only for ``agora``)."""
    _need(command in ("finetune", "agora"), f"command must be 'finetune' or 'agora', got {command!r}")
    return tuple(s for s in SECTIONS if s != "agora" or command == "agora")


def load_finetune_config(
    file: str | os.PathLike | None = None,
    overrides: Sequence[str] = (),
    *,
    command: str = "finetune",
    flags: Mapping[str, Any] | None = None,
) -> FinetuneRunConfig:
    """The defaults, then ``file`` (JSON/YAML), then ``flags``, then ``section.field=value`` ``overrides``.

    Args:
      file: a config file with the sections of ``command`` (and ``output_dir``, ``resume``).
      overrides: ``["finetune.learning_rate=1e-4", "data.columns={text_a: s, label: y}", "output_dir=runs/x"]``.
      command: "finetune" or "agora" (which adds the ``agora`` section).
      flags: {section: {field: value}} (and top-level fields) from the command line's flags (the CLI's
        mapping of ``--lr`` and the others); ``data.columns`` given here adds to the file's columns.

    Raises:
      ConfigError: an unknown section or field (the valid ones listed), a value of the wrong type, a value
        out of range (the field, the flag, the value and the limit named).
    """
    sections = sections_of(command)
    layers: list[tuple[str, Mapping[str, Any]]] = []
    if file is not None:
        layers.append((os.fspath(file), read_config_file(file)))
    if flags:
        layers.append((FLAGS_LAYER, flags))
    if overrides:
        layers.append(("--set", parse_overrides(overrides, sections, TOP_LEVEL)))
    return build_config(layers, command)


def build_config(layers: Sequence[tuple[str, Mapping[str, Any]]], command: str = "finetune") -> FinetuneRunConfig:
    """The defaults with each (where, nested dict) layer applied in turn, later layers winning field by field;
    unknown keys are refused naming ``where``. Built once at the end, so only the result is validated."""
    sections = sections_of(command)
    hints = typing.get_type_hints(FinetuneRunConfig)
    merged: dict[str, dict[str, Any]] = {s: {} for s in sections}
    top: dict[str, Any] = {}
    for where, data in layers:
        check_sections(data, sections, TOP_LEVEL, where)
        for key, values in data.items():
            if key in TOP_LEVEL:
                top[key] = coerce(values, hints[key], key)
                continue
            new = section_values(SECTIONS[key], values, key, where)
            if key == "data" and where == FLAGS_LAYER and "columns" in new:
                new["columns"] = {**merged["data"].get("columns", {}), **new["columns"]}
            merged[key].update(new)
    built = {s: SECTIONS[s](**merged[s]) for s in sections}
    return FinetuneRunConfig(**built, **top)


def config_from_dict(d: Mapping[str, Any]) -> FinetuneRunConfig:
    """Inverse of :meth:`FinetuneRunConfig.to_dict` (a run's recorded config)."""
    return build_config([("saved config", d)], "agora" if d.get("agora") is not None else "finetune")


# ------------------------------------------------------------------------------------------------ the record
# Fields whose change makes a checkpoint of the run unusable or its continuation a different computation
# (array shapes, the label set, the step's batch layout, the head): a resume that changes one is refused.
RESUME_SHAPE_KEYS = ("data.task", "data.max_length", "finetune.batch_size", "finetune.head")
_COSMETIC_KEYS = ("output_dir", "resume", "finetune.progress_bar")


def run_record(cfg: FinetuneRunConfig, model_config: Any, label_names: Sequence[str] | None) -> dict[str, Any]:
    """What ``finetune_config.json`` holds: the command, the resolved config, the model's shape fields, the
    label names."""
    return {
        "command": cfg.command,
        "config": cfg.to_dict(),
        "model": {f: getattr(model_config, f) for f in SHAPE_FIELDS},
        "labels": list(label_names) if label_names else None,
    }


def write_record(output_dir: str, record: Mapping[str, Any]) -> str:
    """Write ``output_dir/finetune_config.json`` (the caller runs it on process 0)."""
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, RUN_CONFIG)
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(record, fh, indent=2)
    return path


def read_record(output_dir: str) -> dict[str, Any] | None:
    path = os.path.join(output_dir, RUN_CONFIG)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: cannot read the run's recorded config ({e})") from None


def _flat(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, Mapping) and k != "columns":
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def check_resume(saved: Mapping[str, Any], new: Mapping[str, Any], where: str) -> None:
    """Refuse to continue the run recorded in ``saved`` with ``new`` (two :func:`run_record` dicts) when a
    shape-relevant field differs (the model's shape, the labels, :data:`RESUME_SHAPE_KEYS`), in one line
    naming each; other differences are logged as a warning."""
    problems = []
    if saved.get("command") != new.get("command"):
        problems.append(f"command: run {saved.get('command')} vs now {new.get('command')}")
    for f in SHAPE_FIELDS:
        a, b = saved.get("model", {}).get(f), new["model"].get(f)
        if a != b:
            problems.append(f"model {f}: run {a} vs now {b}")
    if saved.get("labels") != new.get("labels"):
        problems.append(f"labels: run {saved.get('labels')} vs now {new.get('labels')}")
    a, b = _flat(saved.get("config", {})), _flat(new["config"])
    for key in RESUME_SHAPE_KEYS:
        if a.get(key) != b.get(key):
            problems.append(f"{key}: run {a.get(key)!r} vs now {b.get(key)!r}")
    if problems:
        raise ConfigError(f"{where}: cannot resume, the run changed: " + "; ".join(problems))
    other = sorted(k for k in set(a) | set(b) if k not in _COSMETIC_KEYS and a.get(k) != b.get(k))
    if other:
        log.warning("resuming %s with changed settings: %s", where, ", ".join(other))
