"""Typed, frozen pretraining configs split by concern, named presets, a config file and ``--set`` overrides.

A run is one :class:`PretrainConfig`: ``model`` (an :class:`~flax_narrow.config.EncoderConfig`), ``data``,
``train``, ``kd``, ``mesh`` and ``checkpoint``. It is built from a preset, then a JSON/YAML file, then
``key=value`` overrides, in that order::

    cfg = load_config(preset="tiny", file="run.yaml", overrides=["train.steps=200", "model.hidden_size=64"])

The file holds the same nested sections (and may name a ``preset`` itself)::

    preset: narrowbert-base
    data: {source: files, files: [corpus/*.txt], tokenizer: bert-base-uncased}
    train: {steps: 70000}
"""

from __future__ import annotations

import dataclasses
import glob
import os
from collections.abc import Callable, Sequence
from typing import Any

from flax_narrow.config import EncoderConfig
from flax_narrow.errors import ConfigError

from .config_io import (  # noqa: F401  (their former home: importers of train.config keep working)
    canonical_name,
    check_sections,
    coerce,
    hyphenated,
    jsonable,
    parse_overrides,
    read_config_file,
    section_values,
    update_section,
)

DATA_SOURCES = ("stdlib", "files", "hub")
PACKINGS = ("concat", "segments")
OPTIMIZERS = ("adamw", "lamb")
DECAYS = ("linear", "poly", "constant")
NONFINITE_ACTIONS = ("stop", "skip")
OUTPUT_BIAS_INITS = ("zeros", "unigram")


def _need(cond: bool, where: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{where}: {msg}")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where the text comes from and how it becomes fixed-length rows of token ids."""

    # "stdlib": docstrings of Python's standard library (offline, every machine); "files": local
    # text/JSON/parquet files (globs allowed); "hub": a datasets hub name (network needed).
    source: str = "stdlib"
    files: tuple[str, ...] = ()
    hub_name: str | None = None
    hub_config: str | None = None
    split: str = "train"
    text_column: str = "text"
    # Lazy reading for corpora too large to tokenize up front (per-host split, shuffle buffer).
    streaming: bool = False
    shuffle_buffer: int = 10_000
    # Held-out evaluation: explicit files, or a fraction of the documents (map-style data only).
    eval_files: tuple[str, ...] = ()
    eval_fraction: float = 0.02
    # A tokenizer directory or hub id; None trains a WordPiece tokenizer on the corpus (cached).
    tokenizer: str | None = None
    tokenizer_vocab_size: int = 8192
    seq_len: int = 128
    # How documents share a row (both cut the same stream into the same rows, so only the attention differs):
    # "concat": documents attend to each other across their SEP; "segments": the cache also stores int32
    # segment ids per row and the model keeps documents apart (no attention across a boundary, positions
    # restart per document; flax_narrow.ops.packing).
    packing: str = "concat"
    max_documents: int | None = None
    cache_dir: str = "~/.cache/flax-narrow"
    num_proc: int | None = None
    prefetch: int = 2

    def __post_init__(self) -> None:
        w = "data"
        _need(self.source in DATA_SOURCES, w, f"source {self.source!r} is not one of {DATA_SOURCES}")
        _need(self.seq_len >= 8, w, f"seq_len must be >= 8, got {self.seq_len}")
        _need(self.packing in PACKINGS, w, f"packing {self.packing!r} is not one of {PACKINGS}")
        _need(0.0 <= self.eval_fraction < 0.5, w, f"eval_fraction must be in [0, 0.5), got {self.eval_fraction}")
        _need(self.tokenizer_vocab_size >= 100, w, "tokenizer_vocab_size must be >= 100")
        _need(self.prefetch >= 0, w, f"prefetch must be >= 0, got {self.prefetch}")
        _need(self.shuffle_buffer >= 1, w, f"shuffle_buffer must be >= 1, got {self.shuffle_buffer}")
        if self.max_documents is not None:
            _need(self.max_documents >= 1, w, f"max_documents must be >= 1, got {self.max_documents}")
        _need(
            not self.files or self.source == "files",
            w,
            f"files are set but source is {self.source!r}, which ignores them; set data.source=files",
        )

    def resolved_files(self, patterns: Sequence[str] | None = None) -> list[str]:
        """Expand ``files`` (or ``patterns``) globs; raises naming a pattern that matches nothing."""
        out: list[str] = []
        for pattern in self.files if patterns is None else patterns:
            hits = sorted(glob.glob(os.path.expanduser(pattern)))
            if not hits:
                raise ConfigError(f"data.files: {pattern!r} matches no file")
            out.extend(hits)
        return out


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Steps, batch, masking, optimizer and logging."""

    steps: int = 100
    # Sequences per optimizer step (all hosts together); split into grad_accum_steps micro-batches.
    global_batch_size: int = 32
    grad_accum_steps: int = 1
    seed: int = 0
    # Masking: P = max_predictions slots per row; mask_prob of the non-special tokens (at most P) are
    # predicted; of those mask_token_prob become [MASK], random_token_prob a random token, the rest stay.
    max_predictions: int = 20
    mask_prob: float = 0.15
    mask_token_prob: float = 0.8
    random_token_prob: float = 0.1
    optimizer: str = "adamw"
    learning_rate: float = 5e-4
    end_learning_rate: float = 0.0
    warmup_steps: int | None = None
    warmup_ratio: float = 0.02
    decay: str = "linear"
    poly_power: float = 1.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.01
    clip_norm: float | None = 1.0
    on_nonfinite: str = "stop"
    # The MLM decoder bias of a model trained from scratch: "zeros" (BERT's init) or "unigram" (the
    # log-frequencies of the tokens in the training rows, so the loss starts at the unigram plateau instead of
    # log(vocab_size) and the first steps go to context; map-style data only, not with checkpoint.init_from).
    output_bias_init: str = "zeros"
    log_every: int = 10
    eval_every: int = 0
    eval_batches: int = 4
    # Wall-clock limits, in seconds of training steps (compilation, evaluation and checkpoints not counted),
    # checked at each log flush (every log_every steps): stop once max_seconds have passed (the schedule
    # still spans ``steps``; None: no limit), and evaluate each time another eval_every_seconds have passed
    # (0: off), so that runs of different speeds can be compared at equal time.
    max_seconds: float | None = None
    eval_every_seconds: float = 0.0
    progress_bar: bool = True
    # Peak FLOP/s per device for the MFU estimate; None looks the device kind up in a table.
    peak_tflops: float | None = None
    # JAX's persistent compilation cache, turned on by the CLI: "auto" (~/.cache/flax-narrow/xla), a
    # directory, or "off". JAX_COMPILATION_CACHE_DIR, when set, wins.
    compilation_cache_dir: str = "auto"

    def __post_init__(self) -> None:
        w = "train"
        for name in ("steps", "global_batch_size", "grad_accum_steps", "max_predictions", "log_every"):
            _need(getattr(self, name) >= 1, w, f"{name} must be >= 1, got {getattr(self, name)}")
        _need(
            self.global_batch_size % self.grad_accum_steps == 0,
            w,
            f"global_batch_size ({self.global_batch_size}) is not a multiple of grad_accum_steps "
            f"({self.grad_accum_steps})",
        )
        _need(0.0 < self.mask_prob <= 1.0, w, f"mask_prob must be in (0, 1], got {self.mask_prob}")
        _need(
            self.mask_token_prob >= 0 and self.random_token_prob >= 0,
            w,
            "mask_token_prob and random_token_prob must be >= 0",
        )
        _need(
            self.mask_token_prob + self.random_token_prob <= 1.0,
            w,
            f"mask_token_prob + random_token_prob must be <= 1, got {self.mask_token_prob + self.random_token_prob}",
        )
        _need(self.optimizer in OPTIMIZERS, w, f"optimizer {self.optimizer!r} is not one of {OPTIMIZERS}")
        _need(self.decay in DECAYS, w, f"decay {self.decay!r} is not one of {DECAYS}")
        _need(self.learning_rate > 0, w, f"learning_rate must be > 0, got {self.learning_rate}")
        _need(self.end_learning_rate >= 0, w, f"end_learning_rate must be >= 0, got {self.end_learning_rate}")
        _need(0.0 <= self.warmup_ratio < 1.0, w, f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.warmup_steps is not None:
            _need(
                0 <= self.warmup_steps < self.steps,
                w,
                f"warmup_steps must be in [0, steps={self.steps}), got {self.warmup_steps}",
            )
        _need(self.poly_power > 0, w, f"poly_power must be > 0, got {self.poly_power}")
        _need(0 <= self.b1 < 1 and 0 <= self.b2 < 1, w, "b1 and b2 must be in [0, 1)")
        _need(self.eps > 0, w, f"eps must be > 0, got {self.eps}")
        _need(self.weight_decay >= 0, w, f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.clip_norm is not None:
            _need(self.clip_norm > 0, w, f"clip_norm must be > 0 or null, got {self.clip_norm}")
        _need(
            self.on_nonfinite in NONFINITE_ACTIONS,
            w,
            f"on_nonfinite {self.on_nonfinite!r} is not one of {NONFINITE_ACTIONS}",
        )
        _need(
            self.output_bias_init in OUTPUT_BIAS_INITS,
            w,
            f"output_bias_init {self.output_bias_init!r} is not one of {OUTPUT_BIAS_INITS}",
        )
        _need(self.eval_every >= 0, w, f"eval_every must be >= 0 (0: never), got {self.eval_every}")
        _need(self.eval_batches >= 1, w, f"eval_batches must be >= 1, got {self.eval_batches}")
        if self.max_seconds is not None:
            _need(self.max_seconds > 0, w, f"max_seconds must be > 0 or null, got {self.max_seconds}")
        _need(
            self.eval_every_seconds >= 0, w, f"eval_every_seconds must be >= 0 (0: off), got {self.eval_every_seconds}"
        )
        if self.peak_tflops is not None:
            _need(self.peak_tflops > 0, w, f"peak_tflops must be > 0, got {self.peak_tflops}")

    @property
    def micro_batch_size(self) -> int:
        """Sequences per micro-batch (all hosts together)."""
        return self.global_batch_size // self.grad_accum_steps

    @property
    def num_warmup_steps(self) -> int:
        return self.warmup_steps if self.warmup_steps is not None else int(self.warmup_ratio * self.steps)


@dataclasses.dataclass(frozen=True)
class KDConfig:
    """Knowledge distillation: loss = mlm_weight * MLM + kd_weight * T^2 * KL(teacher_T || student_T)."""

    teacher: str | None = None
    temperature: float = 2.0
    mlm_weight: float = 1.0
    kd_weight: float = 0.0
    # Compute dtype of the teacher's forward (None: the student's compute dtype).
    teacher_dtype: str | None = None

    def __post_init__(self) -> None:
        w = "kd"
        _need(self.temperature > 0, w, f"temperature must be > 0, got {self.temperature}")
        _need(self.mlm_weight >= 0 and self.kd_weight >= 0, w, "mlm_weight and kd_weight must be >= 0")
        _need(self.mlm_weight + self.kd_weight > 0, w, "mlm_weight + kd_weight must be > 0")
        if self.kd_weight > 0:
            _need(self.teacher is not None, w, "kd_weight > 0 needs kd.teacher (a checkpoint path or hub id)")

    @property
    def enabled(self) -> bool:
        return self.teacher is not None and self.kd_weight > 0


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh axis sizes; -1 on one axis takes the remaining devices."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1

    def __post_init__(self) -> None:
        sizes = (self.data, self.fsdp, self.tensor)
        _need(all(s == -1 or s >= 1 for s in sizes), "mesh", f"axis sizes must be >= 1 or -1, got {sizes}")
        _need(sizes.count(-1) <= 1, "mesh", f"at most one axis may be -1, got {sizes}")


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """Orbax checkpoints under ``<output_dir>/checkpoints`` (or ``directory``)."""

    directory: str | None = None
    every_steps: int = 1000
    keep: int = 3
    async_save: bool = True
    # Continue from the latest checkpoint in the directory (exactly: same data order, masks and dropout).
    resume: bool = False
    # Initial weights: any checkpoint ``from_pretrained`` reads (a ``convert`` output, HF dir, hub id).
    init_from: str | None = None

    def __post_init__(self) -> None:
        _need(self.every_steps >= 1, "checkpoint", f"every_steps must be >= 1, got {self.every_steps}")
        _need(self.keep >= 1, "checkpoint", f"keep must be >= 1, got {self.keep}")


@dataclasses.dataclass(frozen=True)
class PretrainConfig:
    """Everything one pretraining run needs."""

    model: EncoderConfig = dataclasses.field(default_factory=EncoderConfig.tiny_narrowbert)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    kd: KDConfig = dataclasses.field(default_factory=KDConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    # Run directory: metrics.jsonl, tensorboard/, checkpoints/, config.json. None: no files written.
    output_dir: str | None = None
    preset: str | None = None

    def __post_init__(self) -> None:
        m, d, t = self.model, self.data, self.train
        room = m.max_position_embeddings - m.position_offset
        _need(
            d.seq_len <= room,
            "data.seq_len",
            f"{d.seq_len} exceeds the model's {room} usable positions (model.max_position_embeddings)",
        )
        _need(
            t.max_predictions <= d.seq_len - 2,
            "train.max_predictions",
            f"{t.max_predictions} must be <= seq_len - 2 = {d.seq_len - 2}",
        )
        if t.output_bias_init == "unigram":
            _need(
                not d.streaming,
                "train.output_bias_init",
                "'unigram' counts the training rows: needs data.streaming=false",
            )
            _need(
                self.checkpoint.init_from is None,
                "train.output_bias_init",
                "'unigram' starts a model from scratch; checkpoint.init_from brings its own bias (use 'zeros')",
            )
        if self.checkpoint.resume:
            _need(
                self.checkpoint_dir is not None,
                "checkpoint.resume",
                "needs checkpoint.directory or output_dir",
            )

    @property
    def checkpoint_dir(self) -> str | None:
        if self.checkpoint.directory is not None:
            return os.path.expanduser(self.checkpoint.directory)
        if self.output_dir is not None:
            return os.path.join(os.path.expanduser(self.output_dir), "checkpoints")
        return None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"preset": self.preset, "output_dir": self.output_dir, "model": self.model.to_dict()}
        for name in ("data", "train", "kd", "mesh", "checkpoint"):
            out[name] = _jsonable(dataclasses.asdict(getattr(self, name)))
        return out

    def replace(self, **changes: Any) -> PretrainConfig:
        return dataclasses.replace(self, **changes)


SECTIONS: dict[str, type] = {
    "model": EncoderConfig,
    "data": DataConfig,
    "train": TrainConfig,
    "kd": KDConfig,
    "mesh": MeshConfig,
    "checkpoint": CheckpointConfig,
}


_jsonable = jsonable


# --------------------------------------------------------------------------------------------- presets
def _tiny_stdlib_data(**kw: Any) -> DataConfig:
    return DataConfig(**{**dict(source="stdlib", seq_len=64, tokenizer_vocab_size=2048), **kw})


def _preset_tiny() -> PretrainConfig:
    """Tiny NarrowBERT (hidden 32, 4 layers, F=2) on stdlib docstrings: a CPU smoke test."""
    return PretrainConfig(
        model=EncoderConfig.tiny_narrowbert(vocab_size=2048, intermediate_size=64, max_position_embeddings=128),
        data=_tiny_stdlib_data(),
        train=TrainConfig(steps=100, global_batch_size=16, max_predictions=10, learning_rate=1e-3, log_every=10),
    )


def _preset_tiny_bert() -> PretrainConfig:
    cfg = _preset_tiny()
    return cfg.replace(model=cfg.model.replace(full_length_layers=None, model_type="bert"))


def _preset_demo_narrowbert() -> PretrainConfig:
    """The demo's NarrowBERT: hidden 64, 4 layers (F=2), 4 heads, FFN 256, L=32, P=5, batch 64, no dropout.

    Small and short so that two CPU cores run about a thousand steps of it in the demo's 150 s: from scratch,
    the MLM loss of a post-LN BERT sits on the unigram plateau for several hundred steps before context starts
    to pay (benchmarks/RESULTS.md, "Demo", has the recipe measurements: hidden 128 at L=128 and batch 16 stayed
    on the plateau for 400 steps; this shape left it after 600-900 steps; lr 2e-3 stayed on it for 1,000).
    lr 1e-3, constant after 30 warmup steps. ``steps`` is only an upper bound: the demo stops both runs by time
    (``train.max_seconds``), so the schedule must not depend on the step count.
    """
    model = EncoderConfig(
        vocab_size=4096,
        hidden_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=256,
        max_position_embeddings=32,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        full_length_layers=2,
        model_type="narrow_bert",
    )
    return PretrainConfig(
        model=model,
        data=DataConfig(source="stdlib", seq_len=32, tokenizer_vocab_size=4096, eval_fraction=0.05),
        train=TrainConfig(
            steps=20_000,
            global_batch_size=64,
            max_predictions=5,
            # every selected token becomes [MASK]: no shortcut of copying the kept 10%, so a loss below the
            # eval tokens' unigram entropy means the model uses context
            mask_token_prob=1.0,
            random_token_prob=0.0,
            learning_rate=1e-3,
            warmup_ratio=0.0015,  # 30 of the 20,000 steps (a ratio, so a run given fewer steps still validates)
            decay="constant",
            output_bias_init="unigram",
            log_every=10,
            eval_every=500,
            eval_batches=8,
        ),
    )


def _preset_demo_bert() -> PretrainConfig:
    cfg = _preset_demo_narrowbert()
    return cfg.replace(model=cfg.model.replace(full_length_layers=None, model_type="bert"))


def _base_train(**kw: Any) -> TrainConfig:
    # The NarrowBERT authors' published recipe: seq 512, batch 64 x accumulation 2, lr 5e-4 linear decay,
    # 2% warmup, 70k steps, AdamW (0.9, 0.999, 1e-8), weight decay 0.01.
    return TrainConfig(
        **{
            **dict(
                steps=70_000,
                global_batch_size=128,
                grad_accum_steps=2,
                max_predictions=80,
                learning_rate=5e-4,
                warmup_ratio=0.02,
                weight_decay=0.01,
                eps=1e-8,
                log_every=100,
                eval_every=2000,
                eval_batches=20,
            ),
            **kw,
        }
    )


def _base_data(tokenizer: str) -> DataConfig:
    # No default corpus at this size: set data.files or data.hub_name.
    return DataConfig(source="files", seq_len=512, tokenizer=tokenizer, eval_fraction=0.005)


def _preset_narrowbert_base() -> PretrainConfig:
    return PretrainConfig(
        model=EncoderConfig.narrowbert_base(dtype="bfloat16"),
        data=_base_data("bert-base-uncased"),
        train=_base_train(),
        checkpoint=CheckpointConfig(every_steps=2000),
    )


def _preset_bert_base() -> PretrainConfig:
    """The same-size BERT baseline for NarrowBERT (identical recipe)."""
    return PretrainConfig(
        model=EncoderConfig.bert_base(dtype="bfloat16"),
        data=_base_data("bert-base-uncased"),
        train=_base_train(),
        checkpoint=CheckpointConfig(every_steps=2000),
    )


def _preset_bort() -> PretrainConfig:
    """BORT's released recipe: MLM + Hinton KD from RoBERTa-large (0.1 MLM + 0.5 KD, T=2), Adam eps 1e-6,
    decoupled weight decay 0.01, peak lr 1e-4, 1% warmup then linear decay, clip 1.0. The batch size and
    step count are not in the released scripts; the values here are placeholders to set for a real run."""
    return PretrainConfig(
        model=EncoderConfig.bort(dtype="bfloat16"),
        data=_base_data("amazon/bort"),
        train=_base_train(
            steps=100_000,
            global_batch_size=256,
            grad_accum_steps=1,
            learning_rate=1e-4,
            warmup_ratio=0.01,
            eps=1e-6,
        ),
        kd=KDConfig(teacher="FacebookAI/roberta-large", temperature=2.0, mlm_weight=0.1, kd_weight=0.5),
        checkpoint=CheckpointConfig(every_steps=2000),
    )


PRESETS: dict[str, Callable[[], PretrainConfig]] = {
    "tiny": _preset_tiny,
    "tiny-bert": _preset_tiny_bert,
    "demo-narrowbert": _preset_demo_narrowbert,
    "demo-bert": _preset_demo_bert,
    "narrowbert-base": _preset_narrowbert_base,
    "bert-base": _preset_bert_base,
    "bort": _preset_bort,
}


def preset(name: str) -> PretrainConfig:
    """A named preset (see :data:`PRESETS`; ``tiny_bert`` and ``tiny-bert`` are the same)."""
    key = canonical_name(name, PRESETS)
    if key is None:
        raise ConfigError(f"unknown preset {name!r}; choose one of {hyphenated(PRESETS)}")
    return PRESETS[key]().replace(preset=key)


# --------------------------------------------------------------------------------------------- loading
def apply_updates(cfg: PretrainConfig, updates: dict[str, Any], *, where: str = "config") -> PretrainConfig:
    """Apply a nested dict of section -> {field: value} (values coerced to the field types)."""
    changes: dict[str, Any] = {}
    for section, values in updates.items():
        if section == "preset":
            continue
        if section == "output_dir":
            changes["output_dir"] = None if values is None else str(values)
            continue
        if section not in SECTIONS:
            raise ConfigError(f"{where}: unknown section {section!r}; sections are {sorted(SECTIONS)}")
        if not isinstance(values, dict):
            raise ConfigError(f"{where}: section {section!r} must be a mapping, got {type(values).__name__}")
        current = changes.get(section, getattr(cfg, section))
        if section == "data" and values.get("files") and "source" not in values and current.source == "stdlib":
            # data.files on a preset reading the built-in corpus: the files are what the user means.
            values = {**values, "source": "files"}
        changes[section] = update_section(current, values, section, where)
    return dataclasses.replace(cfg, **changes)


def load_config(
    preset_name: str | None = None,
    file: str | os.PathLike | None = None,
    overrides: Sequence[str] = (),
) -> PretrainConfig:
    """Preset, then file, then ``section.field=value`` overrides. The file's ``preset`` key is used when
    ``preset_name`` is None; with neither, the ``tiny`` preset."""
    file_data = read_config_file(file) if file is not None else {}
    name = preset_name or file_data.get("preset") or "tiny"
    cfg = preset(name)
    if file_data:
        cfg = apply_updates(cfg, file_data, where=os.fspath(file))
    nested = parse_overrides(overrides, list(SECTIONS), ("output_dir", "preset"))
    if nested:
        cfg = apply_updates(cfg, nested, where="--set")
    return cfg


def config_from_dict(d: dict[str, Any]) -> PretrainConfig:
    """Inverse of :meth:`PretrainConfig.to_dict` (used to read a run's saved config)."""
    known = canonical_name(d["preset"], PRESETS) if d.get("preset") else None
    base = preset(known) if known else PretrainConfig()
    rest = {k: v for k, v in d.items() if k not in ("model", "preset")}
    cfg = apply_updates(base, rest, where="saved config")
    return cfg.replace(model=EncoderConfig.from_dict(d["model"]), preset=d.get("preset"))
