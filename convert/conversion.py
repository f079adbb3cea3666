"""Checkpoint → flax-narrow checkpoint, streamed: no model is materialised and no tensor is held longer than it
takes to write it, so memory stays near the largest tensor (plus what the reader maps).

The plan (:mod:`flax_narrow.convert.plan`) comes from the same pieces ``from_pretrained`` uses (the opened
source, the model's abstract parameter tree from ``nnx.eval_shape``, :func:`flax_narrow.convert.loading.
plan_model_load`); only the last step differs: each source tensor is transformed and cast on its own and written
straight into ``flax_model.safetensors`` in a temporary directory, which is renamed into place when complete
(and, with ``verify=True``, only after the converted checkpoint matched the PyTorch model).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import tempfile

import numpy as np

from flax_narrow.config import EncoderConfig
from flax_narrow.errors import CheckpointError, NoTorchReference
from flax_narrow.modeling import HEADS, architecture_for, architecture_of  # noqa: F401  (HEADS: re-exported)

from . import export, loading, sources, verify, writers
from .plan import (  # noqa: F401  (re-exported: conversion's names before the plan had a module)
    CHUNK_BYTES,
    ConversionPlan,
    VerifyResult,
    check_destination,
    head_class,
    lazy_tensor,
    model_class,
    plan_conversion,
    storage_dtype_for,
    tensor_specs,
)
from .readers import FLAX_WEIGHTS

log = logging.getLogger(__name__)


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
    cfg = plan.config
    torch_side = "the PyTorch NarrowBERT (flax_narrow.convert.torch_narrowbert)" if cfg.is_narrow else "transformers"
    model = loading.load_checkpoint(plan.model_class, converted_dir, dtype="float32", param_dtype="float32")
    batch = verify.random_batch(
        model.config, batch=2, length=min(16, cfg.max_position_embeddings - cfg.position_offset)
    )
    with tempfile.TemporaryDirectory(prefix=".flax-narrow-verify-") as scratch:
        if opened.kind in ("safetensors", "pytorch"):
            ref_dir, reference = _hf_view(opened, plan, scratch), f"{torch_side} on the source checkpoint"
        else:
            ref_dir = os.path.join(scratch, "hf")
            export.export_checkpoint(converted_dir, ref_dir, copy_tokenizer=False)
            reference = f"{torch_side} on an HF export of the converted weights"
        try:
            v = verify.verify_against_torch(model, ref_dir, batch)
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
    row = architecture_for(architecture_of(plan.model_class).head, narrow=False)
    arch = (row.torch_roberta if plan.config.model_type == "roberta" else None) or row.name
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
