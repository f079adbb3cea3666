"""``flax-narrow convert | export | inspect``: thin wrappers over :mod:`flax_narrow.convert.conversion`,
:mod:`~flax_narrow.convert.export` and :mod:`~flax_narrow.convert.inspection`.

Library errors become one line on stderr and exit code 2 (see ``flax_narrow.cli``); a failed ``--verify``
is such an error too, and leaves no destination behind.
"""

from __future__ import annotations

import argparse
import json

from flax_narrow.errors import CheckpointError
from flax_narrow.modeling import HEADS

DTYPES = ("float32", "bfloat16", "float16")


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``convert``, ``export`` and ``inspect`` sub-commands."""
    p = sub.add_parser(
        "convert",
        help="convert a checkpoint (HF BERT/RoBERTa/BORT/NarrowBERT, GluonNLP bort.params) to flax-narrow",
        description=(
            "Convert SRC to a flax-narrow checkpoint directory DST that every model class's from_pretrained "
            "reads. SRC: an HF directory (model.safetensors, sharded safetensors, pytorch_model.bin), a weights "
            "file, a hub id (when online), a NarrowBERT checkpoint (authors' or port layout), or the original "
            "GluonNLP bort.params. The format is detected from the files' contents."
        ),
    )
    p.add_argument("src", metavar="SRC", help="checkpoint directory, weights file, or hub id")
    p.add_argument("dst", metavar="DST", help="flax-narrow checkpoint directory to create")
    p.add_argument(
        "--config",
        metavar="JSON",
        help="config.json to use instead of the checkpoint's (required for a bare weights file; for bort.params "
        "the config is otherwise inferred from the shapes)",
    )
    p.add_argument(
        "--head",
        default="auto",
        choices=("auto", *HEADS),
        help="which architecture to keep (default: the checkpoint's own); other heads are dropped",
    )
    p.add_argument("--dtype", choices=DTYPES, help="compute dtype recorded in the config (default: float32)")
    p.add_argument("--param-dtype", choices=DTYPES, help="parameter dtype recorded in the config (default: float32)")
    p.add_argument(
        "--storage-dtype",
        choices=(*DTYPES, "param", "source"),
        default="param",
        help="dtype of the stored tensors: 'param' (= --param-dtype, default), 'source' (as in SRC), or a dtype; "
        "from_pretrained casts to the param dtype on load",
    )
    p.add_argument("--strict", action="store_true", help="fail if the kept head/pooler is not in the checkpoint")
    p.add_argument(
        "--verify",
        action="store_true",
        help="run the PyTorch model (transformers', or flax-narrow's PyTorch NarrowBERT) and the converted model "
        "on the same random batch (fp32), print the max abs difference, and fail without writing DST if it "
        "exceeds --verify-atol",
    )
    p.add_argument("--verify-atol", type=float, default=1e-3, metavar="X", help="tolerance of --verify (1e-3)")
    p.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    p.add_argument("--no-tokenizer", action="store_true", help="do not copy tokenizer files from SRC")
    p.add_argument("--revision", help="hub revision (hub ids only)")
    p.set_defaults(func=_convert)

    p = sub.add_parser(
        "export",
        help="write a flax-narrow checkpoint back to HF format (config.json + model.safetensors)",
        description=(
            "Export the flax-narrow checkpoint SRC to an HF directory DST that transformers loads "
            "(BertForMaskedLM.from_pretrained(DST), ...). Tied weights are left out as transformers 5 does. "
            "NarrowBERT is written in the authors' layout (encoder_narrow.layer.*, full_length_layers) for "
            "their PyTorch code."
        ),
    )
    p.add_argument("src", metavar="SRC", help="flax-narrow checkpoint directory")
    p.add_argument("dst", metavar="DST", help="HF checkpoint directory to create")
    p.add_argument(
        "--storage-dtype",
        choices=(*DTYPES, "source"),
        default="source",
        help="dtype of the written tensors (default: source, as stored in SRC)",
    )
    p.add_argument(
        "--verify",
        action="store_true",
        help="load DST with transformers (NarrowBERT: flax-narrow's PyTorch NarrowBERT) and compare with the "
        "flax-narrow model on a random batch (fp32)",
    )
    p.add_argument("--verify-atol", type=float, default=1e-4, metavar="X", help="tolerance of --verify (1e-4)")
    p.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    p.add_argument("--no-tokenizer", action="store_true", help="do not copy tokenizer files from SRC")
    p.set_defaults(func=_export)

    p = sub.add_parser(
        "inspect",
        help="show a checkpoint's format, config, parameter count, dtypes and key problems",
        description="Describe SRC without converting it. Exit code 0: convertible; 1: problems found "
        "(listed); 2: unreadable.",
    )
    p.add_argument("src", metavar="SRC", help="checkpoint directory, weights file, or hub id")
    p.add_argument("--config", metavar="JSON", help="config.json to use instead of the checkpoint's")
    p.add_argument("--head", default="auto", choices=("auto", *HEADS), help="check against this architecture")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.set_defaults(func=_inspect)


def _os_errors_as_one_line(func):
    """OSError (unreadable SRC, disk full, permission denied) -> CheckpointError: one line, exit code 2."""

    def wrapped(args: argparse.Namespace) -> int:
        try:
            return func(args)
        except OSError as e:
            where = e.filename or getattr(args, "dst", None) or args.src
            raise CheckpointError(f"{where}: {e.strerror or e}") from None

    return wrapped


def _quiet_transformers(args: argparse.Namespace) -> None:
    """--verify loads transformers models: keep its progress bars and its note that it leaves a stale decoder
    copy untied (we re-tie it) off the terminal, unless -v."""
    if not getattr(args, "verify", False) or args.verbose:
        return
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        return
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


@_os_errors_as_one_line
def _convert(args: argparse.Namespace) -> int:
    from . import conversion

    _quiet_transformers(args)

    report = conversion.convert_checkpoint(
        args.src,
        args.dst,
        config=args.config,
        head=args.head,
        dtype=args.dtype,
        param_dtype=args.param_dtype,
        storage_dtype=args.storage_dtype,
        overwrite=args.overwrite,
        strict=args.strict,
        verify=args.verify,
        verify_atol=args.verify_atol,
        copy_tokenizer=not args.no_tokenizer,
        revision=args.revision,
    )
    print("\n".join(conversion.describe(report)))
    return 0


@_os_errors_as_one_line
def _export(args: argparse.Namespace) -> int:
    from . import export

    _quiet_transformers(args)

    report = export.export_checkpoint(
        args.src,
        args.dst,
        storage_dtype=args.storage_dtype,
        overwrite=args.overwrite,
        verify=args.verify,
        verify_atol=args.verify_atol,
        copy_tokenizer=not args.no_tokenizer,
    )
    print("\n".join(export.describe(report)))
    return 0


@_os_errors_as_one_line
def _inspect(args: argparse.Namespace) -> int:
    from . import inspection

    report = inspection.inspect_checkpoint(args.src, config=args.config, head=args.head)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2, default=str))
    else:
        print("\n".join(inspection.describe(report)))
    return 1 if report.problems else 0
