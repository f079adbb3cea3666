"""flax-narrow checkpoint → HF PyTorch format (config.json + model.safetensors), streamed tensor by tensor.

The inverse of the load map: a flax path becomes its HF key (``keymap.hf_key_for``) with the inverse transform
(kernels transposed back to (out, in)), then the family's layout:

* BERT / BORT: transformers' own names. Tied weights are left out as transformers 5 ``save_pretrained`` does
  (``cls.predictions.decoder.{weight,bias}``); transformers re-ties them on load.
* RoBERTa (base and MLM): ``roberta.`` and ``lm_head.`` names (``EXPORT_RENAMES["roberta"]``).
* NarrowBERT: the authors' layout: ``bert.encoder.layer.{i}`` for i < F and ``bert.encoder_narrow.layer.{i-F}``
  for i >= F, a ``"model_type": "bert"`` config with ``full_length_layers`` and the authors' class names
  (``NarrowBertForMaskedLM``...). Their code runs on transformers 4.28, whose ``save_pretrained`` also stored the
  tied decoder copies and the ``position_ids`` buffer, so these are written too (loaders ignore them).
* A model without token types (``type_vocab_size=0``, the original GluonNLP BORT) gets one all-zero token-type
  row and ``type_vocab_size=1``, as ``amazon/bort`` has: transformers cannot express "no token types", and a
  zero row adds nothing.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil

import numpy as np

from flax_narrow.config import EncoderConfig
from flax_narrow.errors import CheckpointError, ConfigError, NoTorchReference
from flax_narrow.modeling import ARCHITECTURES, architecture_for, architecture_named

from . import keymap, loading, sources, verify, writers
from .plan import ConversionPlan, VerifyResult, check_destination, lazy_tensor, plan_conversion, storage_dtype_for

HF_WEIGHTS = "model.safetensors"
EXPORT_RENAMES: dict[str, list[tuple[str, str]]] = {
    "roberta": [
        (r"^bert\.", "roberta."),
        (r"^cls\.predictions\.transform\.dense\.", "lm_head.dense."),
        (r"^cls\.predictions\.transform\.LayerNorm\.", "lm_head.layer_norm."),
        (r"^cls\.predictions\.bias$", "lm_head.bias"),
    ],
}
ROBERTA_EXPORTABLE = tuple(a.name for a in ARCHITECTURES if a.torch_roberta)
_LAYER = re.compile(r"(^|\.)encoder\.layer\.(\d+)\.")


def hf_export_key(flax_path: str, config: EncoderConfig) -> tuple[str, str | None]:
    """(HF key in the family's layout, transform flax -> HF) for a flax parameter path."""
    key, transform = keymap.hf_key_for(flax_path)
    if config.is_narrow:
        f = config.num_full_layers

        def narrow(m: re.Match[str]) -> str:
            i = int(m.group(2))
            return m.group(0) if i < f else f"{m.group(1)}encoder_narrow.layer.{i - f}."

        key = _LAYER.sub(narrow, key)
    for pattern, repl in EXPORT_RENAMES.get(config.model_type, []):
        key = re.sub(pattern, repl, key)
    return key, transform


def hf_architecture_name(architecture: str, config: EncoderConfig, where: str | None = None) -> str:
    """The transformers (or NarrowBERT authors') class name for one of our architectures.

    Raises:
      CheckpointError: a RoBERTa-typed head that transformers' RoBERTa classes do not share with BERT.
      ConfigError: an architecture name flax-narrow does not implement.
    """
    at = where + ": " if where else ""
    named = architecture_named(architecture)
    if named is None:
        raise ConfigError(f"{at}architecture {architecture!r} is not one flax-narrow implements")
    row = architecture_for(named.head, config.is_narrow)
    if config.model_type == "roberta":
        if row.torch_roberta is None:
            raise CheckpointError(
                f"{at}exporting a RoBERTa-typed {row.name} is not supported (only {', '.join(ROBERTA_EXPORTABLE)}): "
                "transformers' RoBERTa task heads differ from BERT's"
            )
        return row.torch_roberta
    return row.name


@dataclasses.dataclass
class ExportReport:
    destination: str
    architecture: str  # as written into config.json
    layout: str
    num_tensors: int
    bytes_written: int
    notes: list[str]
    verification: VerifyResult | None = None


def _export_specs(plan: ConversionPlan, storage: str | None) -> tuple[list[writers.TensorSpec], dict]:
    cfg, src = plan.config, plan.opened.source
    specs: list[writers.TensorSpec] = []
    prefix = "bert." if any(p.startswith("bert.") for p in plan.load.assignments) else ""
    for path in sorted(plan.load.assignments):
        key, transform = plan.load.assignments[path]
        hf_key, t = hf_export_key(path, cfg)
        shape = plan.targets[path]
        hf_shape = tuple(reversed(shape)) if t == "transpose" else tuple(shape)
        dt = storage_dtype_for(storage or "source", cfg.param_dtype, src.dtype(key))

        assert keymap.flax_to_hf_transform(t) is keymap.TRANSFORMS[t]  # every transform is its own inverse
        specs.append(writers.TensorSpec(hf_key, dt, hf_shape, lazy_tensor(src, key, t, dt)))
    hf_config = cfg.to_hf_config()
    dt = specs[0].dtype if specs else np.dtype(np.float32)
    h = cfg.hidden_size
    if cfg.type_vocab_size == 0:
        name = hf_export_key(f"{prefix}embeddings.token_type_embeddings.embedding", cfg)[0]
        specs.append(writers.TensorSpec(name, dt, (1, h), lambda: np.zeros((1, h), dt)))
        hf_config["type_vocab_size"] = 1
    if cfg.is_narrow:  # transformers 4.28's save_pretrained layout, which the authors' code was written against
        by_key = {s.name: s for s in specs}
        emb, bias = by_key.get(f"{prefix}embeddings.word_embeddings.weight"), by_key.get("cls.predictions.bias")
        if emb is not None and bias is not None:
            specs.append(dataclasses.replace(emb, name="cls.predictions.decoder.weight"))
            specs.append(dataclasses.replace(bias, name="cls.predictions.decoder.bias"))
        n = cfg.max_position_embeddings
        specs.append(
            writers.TensorSpec(
                f"{prefix}embeddings.position_ids",
                np.dtype(np.int64),
                (1, n),
                lambda: np.arange(n, dtype=np.int64)[None],
            )
        )
    hf_config["dtype"] = np.dtype(specs[0].dtype).name if specs else "float32"
    return specs, hf_config


def export_checkpoint(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    storage_dtype: str | None = None,
    overwrite: bool = False,
    verify: bool = False,
    verify_atol: float = 1e-4,
    copy_tokenizer: bool = True,
) -> ExportReport:
    """Write a flax-narrow checkpoint as an HF checkpoint that transformers (or the NarrowBERT code) loads.

    Args:
      src: a flax-narrow checkpoint directory (``flax-narrow convert`` / ``save_pretrained`` output).
      dst: the HF directory to create, atomically.
      storage_dtype: dtype of the written tensors: None/'source' keeps the stored dtype; or a dtype name.
      verify: before renaming into place, load the export with transformers and compare it with the flax-narrow
        model on a random batch (fp32); fail, leaving nothing, beyond ``verify_atol``.

    Raises:
      CheckpointError: the source is not a flax-narrow checkpoint, is incomplete, or cannot be exported.
    """
    src = os.fspath(src)
    dest = check_destination(src, dst, overwrite)
    opened = sources.open_source(src)
    try:
        if opened.kind != "flax-narrow":
            raise CheckpointError(
                f"{src}: is a {opened.layout} checkpoint, not a flax-narrow one; `flax-narrow export` writes "
                "flax-narrow checkpoints (made by `flax-narrow convert` or save_pretrained) back to HF format"
            )
        plan = plan_conversion(opened)
        arch = hf_architecture_name(plan.architecture, plan.config, src)
        specs, hf_config = _export_specs(plan, storage_dtype)
        hf_config["architectures"] = [arch]
        notes = [n.replace("left for from_pretrained", "transformers will") for n in plan.notes]
        if plan.config.type_vocab_size == 0:
            notes.append("no token types: wrote one all-zero token-type row (type_vocab_size=1), as amazon/bort has")
        layout = (
            "NarrowBERT authors' layout (encoder_narrow.*, full_length_layers)"
            if plan.config.is_narrow
            else f"transformers {arch}"
        )
        report = ExportReport(dest, arch, layout, len(specs), 0, notes)
        with writers.atomic_directory(dest, overwrite=overwrite) as tmp:
            writers.write_json(os.path.join(tmp, "config.json"), hf_config)
            report.bytes_written = writers.write_safetensors_stream(
                os.path.join(tmp, HF_WEIGHTS), specs, {"format": "pt"}
            )
            if copy_tokenizer:
                for name, path in opened.tokenizer_files().items():
                    shutil.copyfile(path, os.path.join(tmp, name))
            if verify:
                report.verification = _verify_export(plan, src, tmp)
                v = report.verification
                if v.max_abs_diff is not None and not v.max_abs_diff <= verify_atol:
                    raise CheckpointError(
                        f"{src}: verification failed: transformers on the export differs by {v.max_abs_diff:.3g} "
                        f"> {verify_atol:g} in {v.output}; nothing was written"
                    )
    finally:
        opened.close()
    return report


def _verify_export(plan: ConversionPlan, src: str, exported: str) -> VerifyResult:
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError:
        return VerifyResult(skipped="torch is not installed (pip install 'flax-narrow[torch]')")
    cfg = plan.config
    torch_side = "the PyTorch NarrowBERT (flax_narrow.convert.torch_narrowbert)" if cfg.is_narrow else "transformers"
    model = loading.load_checkpoint(plan.model_class, src, dtype="float32", param_dtype="float32")
    batch = verify.random_batch(
        model.config, batch=2, length=min(16, cfg.max_position_embeddings - cfg.position_offset)
    )
    try:
        v = verify.verify_against_torch(model, exported, batch)
    except NoTorchReference as e:  # no PyTorch class for this architecture
        return VerifyResult(skipped=str(e))
    except Exception as e:  # PyTorch cannot load the export: that is a failed verification
        first = (str(e).strip().splitlines() or [""])[0][:300]
        raise CheckpointError(
            f"{src}: --verify: {torch_side} could not load the export ({type(e).__name__}: {first}); nothing "
            "was written"
        ) from None
    return VerifyResult(v.output, v.shape, v.max_abs_diff, f"{torch_side} on the export")


def describe(report: ExportReport) -> list[str]:
    """Human-readable lines summarising an export (the CLI prints them)."""
    lines = [
        f"layout:       {report.layout}",
        f"tensors:      {report.num_tensors} ({report.bytes_written / 2**20:.1f} MiB)",
    ]
    lines += [f"note:         {n}" for n in report.notes]
    v = report.verification
    if v is not None:
        lines.append(
            f"verify:       skipped ({v.skipped})"
            if v.skipped
            else f"verify:       {v.output} {v.shape}: max abs diff {v.max_abs_diff:.2e} vs {v.reference} (fp32)"
        )
    lines.append(f"wrote:        {report.destination}")
    return lines
