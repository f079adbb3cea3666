"""Checkpoint → flax-narrow checkpoint, streamed: no model is materialised and no tensor is held longer than it
takes to write it, so memory stays near the largest tensor (plus what the reader maps).

The plan comes from the same pieces ``from_pretrained`` uses (the model's abstract parameter tree from
``nnx.eval_shape``, :func:`flax_narrow.convert.keymap.plan_load`, ``check_layer_layout``); only the last step
differs: each source tensor is transformed and cast on its own and written straight into
``flax_model.safetensors`` in a temporary directory, which is renamed into place when complete (and, with
``verify=True``, only after the converted checkpoint matched the PyTorch model).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator

import numpy as np

from flax_narrow.config import EncoderConfig, canonical_dtype
from flax_narrow.errors import CheckpointError, ConfigError

from . import keymap, sources, writers
from .readers import FLAX_WEIGHTS, TensorSource

log = logging.getLogger(__name__)

CHUNK_BYTES = 8 * 2**20  # tensors above this (untransformed) are converted in row blocks of this size

# --head choices -> the architecture kept
HEADS = {
    "base": "BertModel",
    "mlm": "BertForMaskedLM",
    "sequence-classification": "BertForSequenceClassification",
    "token-classification": "BertForTokenClassification",
    "multiple-choice": "BertForMultipleChoice",
    "question-answering": "BertForQuestionAnswering",
}
_FAMILY_PREFIX = re.compile(r"^(XLMRoberta|Roberta|NarrowBert|Bort)")
_ALIASES = {"BertForPreTraining": "BertForMaskedLM", "BertLMHeadModel": "BertForMaskedLM"}


def canonical_architecture(architecture: str) -> str:
    """The BERT spelling of an architecture name: ``RobertaForMaskedLM`` -> ``BertForMaskedLM``."""
    name = _FAMILY_PREFIX.sub("Bert", architecture)
    return _ALIASES.get(name, name)


def model_class(architecture: str, config: EncoderConfig) -> type:
    """Our class for a transformers architecture name (``RobertaForMaskedLM``, ``NarrowBertModel``, ...)."""
    from flax_narrow.modeling import MODEL_CLASSES

    name = canonical_architecture(architecture)
    if name not in MODEL_CLASSES:
        raise ConfigError(
            f"architecture {architecture!r} is not one flax-narrow implements; pass --head "
            f"({', '.join(HEADS)}) to choose what to keep"
        )
    if config.is_narrow:  # same code, but the NarrowBERT name goes into the checkpoint
        return MODEL_CLASSES.get("NarrowBert" + name[len("Bert") :], MODEL_CLASSES[name])
    return MODEL_CLASSES[name]


def _guess_architecture(keys: list[str]) -> str:
    def has(pattern: str) -> bool:
        return any(re.search(pattern, k) for k in keys)

    if has(r"(^|\.)(cls\.predictions|lm_head)\."):
        return "BertForMaskedLM"
    if has(r"^qa_outputs\."):
        return "BertForQuestionAnswering"
    if has(r"^classifier\."):
        return "BertForSequenceClassification" if has(r"pooler\.dense\.") else "BertForTokenClassification"
    return "BertModel"


def _find(shapes: dict[str, tuple[int, ...]], pattern: str) -> tuple[str, tuple[int, ...]] | None:
    for key, shape in shapes.items():
        if re.search(pattern, key):
            return key, tuple(shape)
    return None


def check_config_against_shapes(config: EncoderConfig, shapes: dict[str, tuple[int, ...]], where: str) -> None:
    """Name the first config field that the weights contradict (instead of a list of every mis-shaped key).

    Raises:
      ConfigError: e.g. "config says hidden_size=512 but bert.embeddings.word_embeddings.weight is (99, 32)".
    """
    checks = [
        (r"embeddings\.word_embeddings\.(weight|embedding)$", ("vocab_size", "hidden_size")),
        (r"embeddings\.position_embeddings\.(weight|embedding)$", ("max_position_embeddings", "hidden_size")),
        (r"embeddings\.token_type_embeddings\.(weight|embedding)$", ("type_vocab_size", "hidden_size")),
        (r"encoder\.layer\.0\.intermediate\.dense\.weight$", ("intermediate_size", "hidden_size")),
        (r"encoder\.layer\.0\.intermediate\.dense\.kernel$", ("hidden_size", "intermediate_size")),
    ]
    for pattern, fields in checks:
        hit = _find(shapes, r"(^|\.)" + pattern)
        if hit is None:
            continue
        key, shape = hit
        want = tuple(getattr(config, f) for f in fields)
        if shape != want:
            said = ", ".join(f"{f}={getattr(config, f)}" for f in fields)
            raise ConfigError(
                f"{where}: the config says {said} but {key} has shape {shape}; fix config.json or pass --config"
            )
    if config.type_vocab_size and not _find(shapes, r"embeddings\.token_type_embeddings\."):
        if _find(shapes, r"embeddings\.word_embeddings\."):
            raise ConfigError(
                f"{where}: the config says type_vocab_size={config.type_vocab_size} but the weights have no "
                "token_type_embeddings; set type_vocab_size to 0 in the config"
            )


@dataclasses.dataclass
class ConversionPlan:
    """What a conversion will write (before anything is written)."""

    opened: sources.OpenedSource
    config: EncoderConfig
    model_class: type
    load: keymap.LoadPlan
    targets: dict[str, tuple[int, ...]]  # flax path -> shape, of the parameters written
    notes: list[str]

    @property
    def architecture(self) -> str:
        return self.model_class.hf_architecture


def _target_shapes(cls: type, config: EncoderConfig) -> dict[str, tuple[int, ...]]:
    from flax import nnx

    abstract = nnx.eval_shape(lambda: cls(config, rngs=nnx.Rngs(0)))
    return {
        ".".join(str(p) for p in path): tuple(v.shape) for path, v in nnx.to_flat_state(nnx.state(abstract, nnx.Param))
    }


def plan_conversion(
    opened: sources.OpenedSource, *, head: str = "auto", strict: bool = False, raise_problems: bool = True
) -> ConversionPlan:
    """Match a checkpoint to the parameters of the architecture to keep, strictly.

    Args:
      opened: from :func:`flax_narrow.convert.sources.open_source`.
      head: 'auto' (the checkpoint's architecture, else guessed from its keys) or one of ``HEADS``.
      strict: parameters of the kept architecture absent from the checkpoint are an error (by default the
        pooler/head is left out of the output and ``from_pretrained`` initialises it, with a warning).
      raise_problems: raise on key problems (else they stay in ``plan.load.problems``, for ``inspect``).

    Raises:
      ConfigError: the config contradicts the weights.
      CheckpointError: missing, unexpected or mis-shaped keys (all named).
    """
    config, where, src = opened.config, opened.path, opened.source
    assert config is not None
    keys = src.keys()
    shapes = {k: tuple(src.shape(k)) for k in keys}
    notes: list[str] = []
    if head == "auto":
        arch = opened.architecture or _guess_architecture(keys)
    elif head in HEADS:
        arch = HEADS[head]
    else:
        raise ConfigError(f"unknown head {head!r}; choose one of auto, {', '.join(HEADS)}")
    cls = model_class(arch, config)
    if opened.key_format == "hf":
        from flax_narrow.pretrained import check_layer_layout

        check_layer_layout(keys, config, where)
    check_config_against_shapes(config, shapes, where)
    targets = _target_shapes(cls, config)
    load = keymap.plan_load(
        targets,
        shapes,
        source_format=opened.key_format,
        full_length_layers=config.full_length_layers,
        allow_fresh=not strict,
    )
    if load.problems and raise_problems:
        raise CheckpointError(f"{where}: cannot convert to {cls.__name__}: " + "; ".join(load.problems))
    if load.fresh:
        notes.append(
            f"not in the checkpoint, left for from_pretrained to initialise: {_summarise(load.fresh)} "
            "(use --strict to refuse)"
        )
    if load.dropped_heads:
        notes.append(f"dropped (not part of {cls.__name__}): {_summarise(load.dropped_heads)}")
    stale = stale_decoder_gap(src, load)
    if stale:
        notes.append(
            f"untied MLM decoder copy differs from the word embeddings by up to {stale:.3g}: ignored, the decoder "
            "is tied to the word embeddings"
        )
    written = {p: s for p, s in targets.items() if p in load.assignments}
    return ConversionPlan(opened, config, cls, load, written, notes)


def _summarise(names: list[str], limit: int = 6) -> str:
    head = ", ".join(names[:limit])
    return head + (f" (+{len(names) - limit} more)" if len(names) > limit else "")


def stale_decoder_gap(src: TensorSource, load: keymap.LoadPlan, blocks: int = 64, rows: int = 32) -> float:
    """Max |decoder copy - word embeddings| over evenly spread row blocks, when a checkpoint stores an untied
    copy; 0 when it does not. Sampled, so as not to read the (ignored) copy whole: the copy is dropped either
    way, the figure only tells the user how stale it was."""
    dec = next((k for k in load.ignored if k.endswith("decoder.weight")), None)
    emb = next((key for key, _ in load.assignments.values() if key.endswith("word_embeddings.weight")), None)
    if dec is None or emb is None or src.shape(dec) != src.shape(emb):
        return 0.0
    n = src.shape(dec)[0]
    gap = 0.0
    for start in sorted({int(s) for s in np.linspace(0, max(n - rows, 0), blocks)}):
        a = src.get_rows(dec, start, start + rows).astype(np.float32)
        b = src.get_rows(emb, start, start + rows).astype(np.float32)
        gap = max(gap, float(np.abs(a - b).max(initial=0.0)))
    return gap


def lazy_tensor(
    src: TensorSource, key: str, transform: str | None, dtype: np.dtype
) -> Callable[[], np.ndarray | Iterator[np.ndarray]]:
    """A producer for :class:`writers.TensorSpec`: the transformed, cast tensor; large untransformed tensors
    (embedding tables) come as row blocks, so no whole copy in the output dtype is ever held."""

    def produce() -> np.ndarray | Iterator[np.ndarray]:
        shape = src.shape(key)
        row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * max(dtype.itemsize, 4)
        if transform is not None or len(shape) == 0 or shape[0] * row_bytes <= CHUNK_BYTES:
            return keymap.TRANSFORMS[transform](src.get(key)).astype(dtype, copy=False)
        step = max(1, CHUNK_BYTES // max(row_bytes, 1))
        return (
            src.get_rows(key, i, min(i + step, shape[0])).astype(dtype, copy=False) for i in range(0, shape[0], step)
        )

    return produce


def storage_dtype_for(choice: str | None, param_dtype: str, source_dtype: str) -> np.dtype:
    """The dtype a tensor is written in: 'param' (the config's param dtype), 'source', or a dtype name."""
    if choice in (None, "param"):
        return np.dtype(canonical_dtype(param_dtype))
    if choice == "source":
        dt = np.dtype(canonical_dtype(sources.dtype_name(source_dtype)))
        return dt if dt.kind == "f" or dt.name == "bfloat16" else np.dtype(np.float32)
    try:
        dt = np.dtype(canonical_dtype(choice))
    except TypeError:
        raise ConfigError(f"storage dtype {choice!r} is not a dtype name") from None
    if not (dt.kind == "f" or dt.name == "bfloat16"):
        raise ConfigError(f"storage dtype must be a float dtype, got {dt.name}")
    return dt


def tensor_specs(plan: ConversionPlan, storage: str | None) -> list[writers.TensorSpec]:
    """One lazily produced tensor per written parameter: read, transform (transpose), cast."""
    src = plan.opened.source
    specs = []
    for path in sorted(plan.load.assignments):
        key, transform = plan.load.assignments[path]
        dt = storage_dtype_for(storage, plan.config.param_dtype, src.dtype(key))

        specs.append(writers.TensorSpec(path, dt, plan.targets[path], lazy_tensor(src, key, transform, dt)))
    return specs


def write_checkpoint_files(
    directory: str, plan: ConversionPlan, *, storage: str | None, tokenizer_files: dict[str, str]
) -> int:
    """config.json (HF fields + ``flax_narrow`` block, as ``save_pretrained`` writes) and the streamed weights."""
    cfg = plan.config
    config_json = dict(cfg.to_hf_config())
    config_json["architectures"] = [plan.architecture]
    config_json["flax_narrow"] = {
        "format_version": writers.FORMAT_VERSION,
        "architecture": plan.architecture,
        "config": cfg.to_dict(),
    }
    writers.write_json(os.path.join(directory, "config.json"), config_json)
    n = writers.write_safetensors_stream(
        os.path.join(directory, FLAX_WEIGHTS), tensor_specs(plan, storage), {"format": "flax-narrow"}
    )
    for name, path in tokenizer_files.items():
        shutil.copyfile(path, os.path.join(directory, name))
    return n


@dataclasses.dataclass
class VerifyResult:
    """``--verify`` outcome: the compared output and its max abs difference, or why it was skipped."""

    output: str | None = None
    shape: tuple[int, ...] | None = None
    max_abs_diff: float | None = None
    reference: str | None = None
    skipped: str | None = None


@dataclasses.dataclass
class ConversionReport:
    destination: str
    layout: str
    architecture: str
    config: EncoderConfig
    config_origin: str
    num_parameters: int
    bytes_written: int
    storage_dtypes: list[str]
    notes: list[str]
    verification: VerifyResult | None = None


def check_destination(src: str, dst: str | os.PathLike, overwrite: bool) -> str:
    """Refuse early (before any work) a destination that exists without ``overwrite`` or that is the source."""
    dest = os.path.abspath(os.fspath(dst))
    if os.path.exists(dest) and not overwrite:
        raise CheckpointError(f"{dest}: already exists; pass --overwrite (overwrite=True) to replace it")
    if os.path.exists(src):
        s = os.path.realpath(src)
        d = os.path.realpath(dest)
        if d == s or s.startswith(d + os.sep) or (os.path.isdir(s) and d.startswith(s + os.sep)):
            raise CheckpointError(f"{dest}: the destination must not be, contain, or lie inside the source {src}")
    return dest


def convert_checkpoint(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    config: EncoderConfig | str | os.PathLike | None = None,
    head: str = "auto",
    dtype: str | None = None,
    param_dtype: str | None = None,
    storage_dtype: str | None = None,
    overwrite: bool = False,
    strict: bool = False,
    verify: bool = False,
    verify_atol: float = 1e-3,
    copy_tokenizer: bool = True,
    revision: str | None = None,
) -> ConversionReport:
    """Convert a checkpoint to a flax-narrow checkpoint directory that every model's ``from_pretrained`` reads.

    Args:
      src: HF directory / weights file / hub id, GluonNLP ``bort.params``, or a flax-narrow directory.
      dst: the directory to create (atomically: a temporary directory beside it is renamed into place).
      config: use this config (EncoderConfig or JSON path) instead of the checkpoint's.
      head: which architecture to keep (see :func:`plan_conversion`).
      dtype / param_dtype: compute and parameter dtypes recorded in the config.
      storage_dtype: dtype of the written tensors: None/'param' (= param dtype), 'source', or a dtype name.
      verify: before renaming into place, run the converted model and the PyTorch model (transformers', or
        :mod:`flax_narrow.convert.torch_narrowbert` for NarrowBERT) on the same random batch in fp32; fail
        (leaving nothing) when they differ by more than ``verify_atol``.

    Raises:
      CheckpointError / ConfigError: anything wrong with the source, the config or the destination.
    """
    src = os.fspath(src)
    dest = check_destination(src, dst, overwrite)
    opened = sources.open_source(src, config=config, revision=revision)
    try:
        changes = {k: v for k, v in (("dtype", dtype), ("param_dtype", param_dtype)) if v is not None}
        if changes:
            opened.config = opened.config.replace(**changes)
        plan = plan_conversion(opened, head=head, strict=strict)
        specs = tensor_specs(plan, storage_dtype)
        report = ConversionReport(
            destination=dest,
            layout=opened.layout,
            architecture=plan.architecture,
            config=plan.config,
            config_origin=opened.config_origin,
            num_parameters=sum(int(np.prod(s, dtype=np.int64)) for s in plan.targets.values()),
            bytes_written=0,
            storage_dtypes=sorted({np.dtype(s.dtype).name for s in specs}),
            notes=list(plan.notes),
        )
        tok = opened.tokenizer_files() if copy_tokenizer and opened.kind != "gluonnlp" else {}
        with writers.atomic_directory(dest, overwrite=overwrite) as tmp:
            report.bytes_written = write_checkpoint_files(tmp, plan, storage=storage_dtype, tokenizer_files=tok)
            if verify:
                report.verification = verify_conversion(opened, plan, tmp)
                v = report.verification
                if v.max_abs_diff is not None and not v.max_abs_diff <= verify_atol:
                    raise CheckpointError(
                        f"{src}: verification failed: {v.output} differs from {v.reference} by {v.max_abs_diff:.3g} "
                        f"> {verify_atol:g}; nothing was written (check --config, or raise --verify-atol for a "
                        "lossy --storage-dtype)"
                    )
    finally:
        opened.close()
    log.info("converted %s -> %s (%s, %d parameters)", src, dest, report.architecture, report.num_parameters)
    return report


def verify_conversion(opened: sources.OpenedSource, plan: ConversionPlan, converted_dir: str) -> VerifyResult:
    """Compare the converted checkpoint with the PyTorch model of the source, in fp32.

    HF sources are loaded by transformers itself (independent of our key map); NarrowBERT, which transformers
    lacks, by :mod:`flax_narrow.convert.torch_narrowbert` (its own state-dict names, not our key map), and
    compared on a set of selected rows. GluonNLP and flax-narrow sources have no PyTorch reader, so they are
    compared with an HF export of the converted weights: that checks the model, not the name map.
    """
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError:
        return VerifyResult(skipped="torch is not installed (pip install 'flax-narrow[torch]')")
    from flax_narrow.pretrained import from_pretrained

    from .verify import NoTorchReference, random_batch, verify_against_torch

    cfg = plan.config
    torch_side = "the PyTorch NarrowBERT (flax_narrow.convert.torch_narrowbert)" if cfg.is_narrow else "transformers"
    model = from_pretrained(plan.model_class, converted_dir, dtype="float32", param_dtype="float32")
    batch = random_batch(model.config, batch=2, length=min(16, cfg.max_position_embeddings - cfg.position_offset))
    with tempfile.TemporaryDirectory(prefix=".flax-narrow-verify-") as scratch:
        if opened.kind in ("safetensors", "pytorch"):
            ref_dir, reference = _hf_view(opened, plan, scratch), f"{torch_side} on the source checkpoint"
        else:
            from .export import export_checkpoint

            ref_dir = os.path.join(scratch, "hf")
            export_checkpoint(converted_dir, ref_dir, copy_tokenizer=False)
            reference = f"{torch_side} on an HF export of the converted weights"
        try:
            v = verify_against_torch(model, ref_dir, batch)
        except NoTorchReference as e:  # no PyTorch class for this architecture
            return VerifyResult(skipped=str(e))
        except Exception as e:  # PyTorch failed on the reference: the user asked for a check, so fail
            first = (str(e).strip().splitlines() or [""])[0][:300]
            raise CheckpointError(
                f"{opened.path}: --verify could not run {torch_side} on the reference ({type(e).__name__}: "
                f"{first}); convert without --verify, or report the problem"
            ) from None
    return VerifyResult(v.output, v.shape, v.max_abs_diff, reference)


def _hf_view(opened: sources.OpenedSource, plan: ConversionPlan, scratch: str) -> str:
    """A directory transformers can load: the source itself, or links to its weights plus a config.json."""
    d = opened.directory
    if opened.config_origin == "config.json" and os.path.isdir(opened.path):
        return d
    view = os.path.join(scratch, "src")
    os.makedirs(view)
    if len(opened.files) == 1:
        name = "model.safetensors" if opened.kind == "safetensors" else "pytorch_model.bin"
        os.symlink(os.path.abspath(opened.files[0]), os.path.join(view, name))
    else:
        for f in os.listdir(d):
            if f != "config.json":
                os.symlink(os.path.join(d, f), os.path.join(view, f))
    arch = canonical_architecture(plan.architecture)
    if plan.config.model_type == "roberta":
        arch = "Roberta" + arch[len("Bert") :]
    writers.write_json(os.path.join(view, "config.json"), plan.config.to_hf_config(architectures=[arch]))
    return view


def describe(report: ConversionReport) -> list[str]:
    """Human-readable lines summarising a conversion (the CLI prints them)."""
    cfg = report.config
    lines = [
        f"source:       {report.layout}",
        f"config:       {report.config_origin}; {cfg.num_hidden_layers} layers"
        + (f" (F={cfg.full_length_layers} full)" if cfg.is_narrow else "")
        + f", hidden {cfg.hidden_size}, heads {cfg.num_attention_heads}, FFN {cfg.intermediate_size}, "
        f"vocab {cfg.vocab_size}",
        f"architecture: {report.architecture}",
        f"parameters:   {report.num_parameters:,} stored as {'/'.join(report.storage_dtypes)} "
        f"({report.bytes_written / 2**20:.1f} MiB); params {cfg.param_dtype}, compute {cfg.dtype}",
    ]
    lines += [f"note:         {n}" for n in report.notes]
    v = report.verification
    if v is not None:
        if v.skipped:
            lines.append(f"verify:       skipped ({v.skipped})")
        else:
            lines.append(
                f"verify:       {v.output} {v.shape}: max abs diff {v.max_abs_diff:.2e} vs {v.reference} (fp32)"
            )
    lines.append(f"wrote:        {report.destination}")
    return lines
