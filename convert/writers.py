"""Checkpoint writers. Every write goes to a temporary directory beside the destination and is renamed into
place only when complete, so an interrupted or failed write never leaves a half-written checkpoint."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import queue
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np

from flax_narrow.errors import CheckpointError

FORMAT_VERSION = 1


@contextlib.contextmanager
def atomic_directory(destination: str | os.PathLike, *, overwrite: bool = False) -> Iterator[str]:
    """Yield a temporary directory; on success it replaces ``destination`` (atomically where the OS allows).

    Raises:
      CheckpointError: ``destination`` exists and ``overwrite`` is False, or its parent is not writable.
    """
    dest = os.path.abspath(os.fspath(destination))
    parent = os.path.dirname(dest)
    if os.path.exists(dest) and not overwrite:
        raise CheckpointError(f"{dest}: already exists; pass overwrite=True (CLI: --overwrite) to replace it")
    if os.path.exists(dest) and not os.path.isdir(dest):
        raise CheckpointError(f"{dest}: exists and is not a directory")
    try:
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(dest)}.tmp-", dir=parent)
    except OSError as e:
        raise CheckpointError(f"{parent}: cannot write there ({e.strerror})") from None
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700; the checkpoint gets the usual permissions
    try:
        yield tmp
        if os.path.exists(dest):
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(dest)}.old-", dir=parent)
            os.rmdir(old)
            os.rename(dest, old)
            os.rename(tmp, dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_json(path: str, obj: Any) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(obj, fh, indent=2, sort_keys=True)
        fh.write("\n")


def config_json(config_dict: dict[str, Any], hf_config: dict[str, Any], architecture: str) -> dict[str, Any]:
    """The config.json of a flax-narrow checkpoint: HF-readable fields plus the exact ``flax_narrow`` block."""
    cfg = dict(hf_config)
    cfg["architectures"] = [architecture]
    cfg["flax_narrow"] = {"format_version": FORMAT_VERSION, "architecture": architecture, "config": config_dict}
    return cfg


def write_flax_checkpoint(
    destination: str | os.PathLike,
    *,
    config_dict: dict[str, Any],
    hf_config: dict[str, Any],
    architecture: str,
    params: dict[str, np.ndarray],
    overwrite: bool = False,
    extra_files: dict[str, str] | None = None,
) -> str:
    """Write config.json (HF-readable, plus a ``flax_narrow`` block) and ``flax_model.safetensors``.

    ``params`` maps flax parameter paths (``bert.encoder.layer.0.attention.self.query.kernel``) to arrays.
    ``extra_files`` maps names to existing files copied alongside (tokenizer files).
    """
    from safetensors.numpy import save_file

    with atomic_directory(destination, overwrite=overwrite) as tmp:
        write_json(os.path.join(tmp, "config.json"), config_json(config_dict, hf_config, architecture))
        save_file(
            {k: np.ascontiguousarray(v) for k, v in params.items()},
            os.path.join(tmp, "flax_model.safetensors"),
            metadata={"format": "flax-narrow"},
        )
        for name, src in (extra_files or {}).items():
            shutil.copyfile(src, os.path.join(tmp, name))
    return os.path.abspath(os.fspath(destination))


# numpy dtype name -> safetensors dtype tag
SAFETENSORS_DTYPES = {
    "float64": "F64",
    "float32": "F32",
    "float16": "F16",
    "bfloat16": "BF16",
    "int64": "I64",
    "int32": "I32",
    "int16": "I16",
    "int8": "I8",
    "uint8": "U8",
    "bool": "BOOL",
}


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """One tensor of a streamed safetensors file: its name, dtype, shape and a function producing it.

    ``produce()`` returns the array, or an iterator of consecutive row blocks (along axis 0) that make it up, so
    that a large tensor need never be held whole in its output dtype.
    """

    name: str
    dtype: np.dtype
    shape: tuple[int, ...]
    produce: Callable[[], np.ndarray | Iterable[np.ndarray]]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize


def write_safetensors_stream(path: str, specs: list[TensorSpec], metadata: dict[str, str] | None = None) -> int:
    """Write a safetensors file one tensor at a time: memory stays near the largest single tensor.

    The header is computed from the specs (no tensor is read for it); then each ``produce()`` is called in turn,
    checked against its spec and written. Returns the number of bytes written.

    Raises:
      CheckpointError: a produced array does not match its spec (a bug in the caller's plan), or a duplicate name.
    """
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise CheckpointError(f"{path}: duplicate tensor names {sorted({n for n in names if names.count(n) > 1})}")
    header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for spec in specs:
        tag = SAFETENSORS_DTYPES.get(np.dtype(spec.dtype).name)
        if tag is None:
            raise CheckpointError(f"{spec.name}: dtype {np.dtype(spec.dtype).name} cannot be stored in safetensors")
        header[spec.name] = {"dtype": tag, "shape": list(spec.shape), "data_offsets": [offset, offset + spec.nbytes]}
        offset += spec.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
    blob += b" " * (-len(blob) % 8)  # pad the header to 8 bytes, as safetensors does
    with open(path, "wb") as fh:
        fh.write(len(blob).to_bytes(8, "little"))
        fh.write(blob)
        rows: dict[str, int] = {}
        # Reading/casting the next block (numpy, GIL released) overlaps with writing this one.
        for spec, block in _prefetch(_blocks(specs)):
            if block.dtype != np.dtype(spec.dtype) or tuple(block.shape[1:]) != tuple(spec.shape[1:]):
                raise CheckpointError(
                    f"{spec.name}: produced {block.dtype.name}{tuple(block.shape)}, planned "
                    f"{np.dtype(spec.dtype).name}{tuple(spec.shape)}"
                )
            fh.write(block.reshape(-1).view(np.uint8))
            rows[spec.name] = rows.get(spec.name, 0) + (block.shape[0] if block.ndim else 1)
        for spec in specs:
            if rows.get(spec.name, 0) != (spec.shape[0] if spec.shape else 1):
                raise CheckpointError(f"{spec.name}: produced {rows.get(spec.name, 0)} rows, planned {spec.shape}")
    return 8 + len(blob) + offset


def _blocks(specs: list[TensorSpec]) -> Iterator[tuple[TensorSpec, np.ndarray]]:
    for spec in specs:
        out = spec.produce()
        for block in [out] if isinstance(out, np.ndarray) else out:
            yield spec, np.ascontiguousarray(block)


def _prefetch(items: Iterator[Any], depth: int = 2) -> Iterator[Any]:
    """Run ``items`` in a background thread, at most ``depth`` ahead; its exceptions re-raise here."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(entry: tuple[str, Any]) -> bool:
        while not stop.is_set():
            try:
                q.put(entry, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def run() -> None:
        try:
            for item in items:
                if not put(("item", item)):
                    return
            put(("done", None))
        except BaseException as e:  # KeyboardInterrupt too: the consumer re-raises it
            put(("error", e))

    worker = threading.Thread(target=run, name="safetensors-prefetch", daemon=True)
    worker.start()
    try:
        while True:
            kind, item = q.get()
            if kind == "done":
                return
            if kind == "error":
                raise item
            yield item
    finally:
        stop.set()
        worker.join()
