"""What ``flax-narrow finetune`` and ``flax-narrow agora`` do, importable: :func:`prepare` (load and check the
data, tokenizer and model source of a :class:`~flax_narrow.train.finetune_config.FinetuneRunConfig`), then
:func:`finetune_from_config` or :func:`agora_from_config`. A notebook runs the same code as the command::

    cfg = load_finetune_config(file="run.yaml", overrides=["finetune.epochs=1"])
    result = finetune_from_config(cfg)
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
from collections.abc import Iterator
from typing import Any

from flax_narrow.errors import ConfigError, DataError, FlaxNarrowError

from .config import canonical_name, hyphenated
from .finetune_config import FinetuneRunConfig, check_resume, read_record, run_record, write_record

log = logging.getLogger(__name__)


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


_NOT_PRESETS = {"from_dict", "from_hf_config", "replace", "to_dict", "to_hf_config", "from_json"}


def _preset_methods() -> list[str]:
    from flax_narrow.config import EncoderConfig

    out = []
    for name in dir(EncoderConfig):
        if name.startswith("_") or name in _NOT_PRESETS:
            continue
        if callable(getattr(EncoderConfig, name)) and isinstance(
            EncoderConfig.__dict__.get(name), (classmethod, staticmethod)
        ):
            out.append(name)
    return sorted(out)


def model_presets() -> list[str]:
    """The model preset names ``finetune --model`` takes, in the one spelling (``tiny-bort``; ``tiny_bort``
    is accepted too)."""
    return hyphenated(_preset_methods())


def model_source(model: str, tokenizer: Any) -> tuple[Any, Any]:
    """(what ``build_model`` takes, its EncoderConfig): a preset name gives a config sized to ``tokenizer``, a
    path or hub id gives itself and the checkpoint's config."""
    from flax_narrow.config import EncoderConfig
    from flax_narrow.pretrained import read_checkpoint_config, resolve_path

    if not any(c in model for c in "/.~") and not os.path.exists(model):
        key = canonical_name(model, _preset_methods())
        if key is None:
            raise ConfigError(
                f"--model {model!r}: not a directory, and not a preset; presets: {', '.join(model_presets())}"
            )
        cfg = getattr(EncoderConfig, key)(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id)
        return cfg, cfg
    local = resolve_path(model)
    cfg, _, _ = read_checkpoint_config(local if os.path.isdir(local) else os.path.dirname(local))
    return model, cfg


def prepare(cfg: FinetuneRunConfig) -> Prepared:
    """Load and check everything ``cfg`` names: the tokenizer, the model source, each split's examples, the
    task (labels, metric, positive label) and the encoder.

    Without ``data.dev`` (and no GLUE preset), a fixed ``data.holdout_fraction`` of train, drawn by
    ``finetune.seed``, is held out (``Prepared.dev_held_out``) and the log says so.

    Raises:
      FlaxNarrowError subclasses, one line each: no model or train data given, a missing file, an empty one,
      a column typo, an empty label, ``max_length`` over the model's positions, a tokenizer larger than the
      model's vocabulary, an unknown preset or positive label.
    """
    from flax_narrow.tokenization import load_tokenizer

    from .finetune_data import PRESETS, Encoder, holdout, infer_label_names, load_split
    from .tasks import Task

    d = cfg.data
    columns: dict[str, Any] = {k: list(v) if isinstance(v, tuple) else v for k, v in d.columns.items()}
    train_src, dev_src, name, metric, kind = d.train, d.dev, d.dataset_config, d.metric, d.task
    if d.glue:
        path, name, kind, cols, m = PRESETS[d.glue]
        train_src = dev_src = path
        columns = {**cols, **columns}
        metric = metric or m
    if not cfg.model.name_or_path:
        raise ConfigError("give --model (model.name_or_path): a checkpoint directory, a hub id or a preset")
    if not train_src:
        raise FlaxNarrowError("give --train (a file or hub name) or --glue (data.train or data.glue)")
    model = cfg.model.name_or_path
    tok = load_tokenizer(cfg.model.tokenizer or model)
    source, model_cfg = model_source(model, tok)
    room = model_cfg.max_position_embeddings - model_cfg.position_offset
    if d.max_length > room:
        raise ConfigError(f"--max-length {d.max_length} exceeds the model's {room} positions ({model})")
    if len(tok) > model_cfg.vocab_size:
        raise ConfigError(
            f"the tokenizer has {len(tok)} ids but the model's vocab_size is {model_cfg.vocab_size}; "
            "give the tokenizer the model was trained with (--tokenizer)"
        )
    train, order = load_split(train_src, d.train_split, kind, columns, name=name)
    held_out = False
    seed = cfg.finetune.seed
    if dev_src:
        dev, _ = load_split(dev_src, d.dev_split, kind, columns, name=name)
    else:
        train, dev = holdout(train, d.holdout_fraction, seed)
        held_out = True
        log.warning(
            "no --dev: holding out %d of the %d training examples (a fixed %.0f%%, seed %d) for evaluation and "
            "model selection", len(dev), len(dev) + len(train), 100 * d.holdout_fraction, seed,
        )  # fmt: skip
    test = load_split(d.test, d.test_split, kind, columns, name=name)[0] if d.test else None
    labels = infer_label_names(kind, train, order)
    if kind == "classification" and not order:
        seen = sorted({str(e["label"]) for e in dev if "label" in e} - set(labels))
        if seen:
            raise DataError(f"dev labels {seen} never occur in the training data (labels: {list(labels)})")
    if kind in ("classification", "multilabel", "token") and not labels:
        raise DataError(f"{train_src}: no labels found for task {kind!r}")
    task = Task(kind, labels, metric, positive_label=d.positive_label)
    if task.positive is not None:
        log.info("binary F1 scores the positive label %r (label id %d)", task.positive, labels.index(task.positive))
    enc = Encoder(tok, d.max_length, d.pair_format, token_types=model_cfg.type_vocab_size > 1)
    return Prepared(task, enc, train, dev, test, source, model_cfg, held_out)


def check_output_dir(cfg: FinetuneRunConfig) -> str:
    """The output directory, checked before any file is read or written: given, not a file, not a finished
    finetune run (unless resuming), no checkpoints without ``resume``."""
    out = cfg.output_dir
    if not out:
        raise ConfigError("give --output-dir (output_dir)")
    if os.path.isfile(out):
        raise ConfigError(f"--output-dir {out}: is a file")
    if os.path.isfile(os.path.join(out, "summary.json")) and not cfg.resume:
        raise ConfigError(f"--output-dir {out} holds a finished run (summary.json); choose another directory")
    if cfg.command == "finetune" and _has_checkpoints(out) and not cfg.resume:
        raise ConfigError(
            f"{out} already holds fine-tuning checkpoints; pass --resume (resume=True) to continue, or choose "
            "another output directory"
        )
    return out


def _has_checkpoints(out: str) -> bool:
    ck = os.path.join(out, "checkpoints")
    return os.path.isdir(ck) and any(x.isdigit() for x in os.listdir(ck))


def _has_rounds(out: str) -> bool:
    return os.path.isdir(out) and any(x.startswith("round_") for x in os.listdir(out))


@contextlib.contextmanager
def recorded_run(cfg: FinetuneRunConfig, prep: Prepared) -> Iterator[None]:
    """Check a continued run against ``output_dir/finetune_config.json``, write the record for this one
    (process 0), run the body; a body that fails before leaving any progress (checkpoints, finished rounds)
    removes the record again (and the directory, when it made it and it is empty)."""
    import jax

    out = cfg.output_dir
    record = run_record(cfg, prep.model_config, prep.task.label_names)
    progress = _has_checkpoints if cfg.command == "finetune" else _has_rounds
    saved = read_record(out)
    if saved is not None and progress(out) and (cfg.resume or cfg.command == "agora"):
        check_resume(saved, json.loads(json.dumps(record)), out)
    main = jax.process_index() == 0
    made_dir = not os.path.exists(out)
    path = write_record(out, record) if main else None
    try:
        yield
    except BaseException:
        if path is not None and not progress(out):
            with contextlib.suppress(OSError):
                os.remove(path)
                if made_dir:
                    os.rmdir(out)
        raise


def finetune_from_config(cfg: FinetuneRunConfig, prep: Prepared | None = None) -> Any:
    """Fine-tune as ``flax-narrow finetune`` does: :func:`prepare` (unless ``prep`` is given), build the model,
    then :func:`~flax_narrow.train.finetune.finetune` on ``cfg.mesh`` into ``cfg.output_dir`` (which records
    the config in ``finetune_config.json``; ``cfg.resume`` continues and is refused when a shape-relevant field
    changed). Returns the :class:`~flax_narrow.train.finetune.FinetuneResult`."""
    from . import sharding as shd
    from .finetune import build_model, finetune

    _need_command(cfg, "finetune")
    out = check_output_dir(cfg)
    prep = prepare(cfg) if prep is None else prep
    task, enc = prep.task, prep.encoder
    test_data = enc.encode(task, prep.test) if prep.test else None
    train_data, dev_data = enc.encode(task, prep.train), enc.encode(task, prep.dev)
    model = build_model(task, prep.source, seed=cfg.finetune.seed)
    with recorded_run(cfg, prep):
        return finetune(
            model,
            task,
            train_data,
            dev_data,
            cfg.finetune,
            output_dir=out,
            test=test_data,
            resume=cfg.resume,
            tokenizer=enc.tokenizer,
            mesh=shd.make_mesh(cfg.mesh),
        )


def agora_from_config(cfg: FinetuneRunConfig, prep: Prepared | None = None) -> Any:
    """Run (or resume) Agora as ``flax-narrow agora`` does: Θ from ``agora.theta``, g from ``agora.g`` (and
    ``agora.mlm``), S from ``agora.labeller`` (loaded strictly), the pruning rule, and
    :func:`~flax_narrow.train.agora.run_agora` with ``cfg.agora_config()``. Returns the ``AgoraResult``."""
    from flax_narrow.modeling.bert import BertForMaskedLM
    from flax_narrow.pretrained import from_pretrained

    from . import agora
    from .augment import SpanSwap, TokenDropout
    from .finetune import build_model

    _need_command(cfg, "agora")
    check_output_dir(cfg)
    a = cfg.agora
    theta = theta_from_config(cfg)
    if a.g == "mlm" and not a.mlm:
        raise ConfigError("--g mlm needs --mlm (an MLM checkpoint dir); or use --g dropout / --g swap")
    prep = prepare(cfg) if prep is None else prep
    task, enc = prep.task, prep.encoder
    labeller = None
    if a.labeller:
        labeller = agora.ClassifierLabeller(agora.load_labeller_model(a.labeller, task), task, enc)
    if a.g == "mlm":
        mlm = from_pretrained(BertForMaskedLM, a.mlm, strict=True)
        if mlm.config.vocab_size < len(enc.tokenizer):
            raise ConfigError(
                f"--mlm {a.mlm}: vocab_size {mlm.config.vocab_size} is smaller than the tokenizer's "
                f"{len(enc.tokenizer)}"
            )
        g = agora.MLMInfill(mlm, enc.tokenizer, max_length=cfg.data.max_length, allow_untrained=a.allow_untrained_mlm)
    else:
        g = TokenDropout() if a.g == "dropout" else SpanSwap()
    prune = agora.KeepBetterHalf() if a.prune == "half" else agora.NotesPrefixRule()
    agora_cfg = cfg.agora_config()
    with recorded_run(cfg, prep):
        return agora.run_agora(
            task,
            enc,
            prep.train,
            prep.dev,
            theta,
            lambda seed: build_model(task, prep.source, seed=seed),
            g,
            labeller,
            agora_cfg,
            prune,
        )


def theta_from_config(cfg: FinetuneRunConfig) -> list[Any]:
    """Θ of ``agora.theta``: ``bort`` (the released grid at ``finetune.epochs``), ``small`` (lr and 3 x lr, seeds
    0 and 1, the rest from the ``finetune`` section), or a JSON file: a list of ``Candidate`` fields."""
    from .candidates import Candidate, bort_grid

    f, spec = cfg.finetune, cfg.agora.theta
    if spec == "bort":
        return bort_grid(f.epochs)
    if spec == "small":
        return [
            Candidate(lr, f.weight_decay, f.warmup_ratio, f.batch_size, s, f.epochs)
            for lr in (f.learning_rate, f.learning_rate * 3)
            for s in (0, 1)
        ]
    try:
        with open(spec, encoding="utf-8") as fh:
            raw = json.load(fh)
    except OSError as e:
        raise ConfigError(f"--theta {spec}: not 'bort' or 'small', and cannot read it ({e.strerror})") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"--theta {spec}: not valid JSON ({e})") from None
    if not isinstance(raw, list) or not raw:
        raise ConfigError(f"--theta {spec}: expected a non-empty JSON list of candidates")
    fields = {x.name for x in dataclasses.fields(Candidate)}
    out = []
    for i, c in enumerate(raw):
        bad = sorted(set(c) - fields) if isinstance(c, dict) else ["(not an object)"]
        if bad:
            raise ConfigError(f"--theta {spec}: candidate {i}: unknown field(s) {bad}; fields: {sorted(fields)}")
        out.append(Candidate(**c))
    return out


def _need_command(cfg: FinetuneRunConfig, command: str) -> None:
    if cfg.command != command:
        raise ConfigError(
            f"a {cfg.command} config given to {command}: load it with load_finetune_config(command={command!r})"
        )
