"""Checkpoint readers: lazy views of tensors by key, whatever the file format.

* safetensors (single file or sharded with ``model.safetensors.index.json``) through ``safetensors`` — no torch;
* PyTorch pickles (``pytorch_model.bin``, sharded too) through ``torch.load(weights_only=True, mmap=True)``
  only: a pickle that carries code is refused by torch's restricted unpickler and never executed.

Every reader exposes ``keys()``, ``shape(key)``, ``dtype(key)`` and ``get(key) -> np.ndarray``, loading one
tensor at a time so that conversion memory stays near one copy of the model.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterator

import numpy as np

from flax_narrow.config import read_json
from flax_narrow.errors import CheckpointError

SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PT_BIN = "pytorch_model.bin"
PT_BIN_INDEX = "pytorch_model.bin.index.json"
FLAX_WEIGHTS = "flax_model.safetensors"


class TensorSource:
    """Interface: a lazy mapping key -> array."""

    path: str

    def keys(self) -> list[str]:
        raise NotImplementedError

    def shape(self, key: str) -> tuple[int, ...]:
        raise NotImplementedError

    def dtype(self, key: str) -> str:
        raise NotImplementedError

    def get(self, key: str) -> np.ndarray:
        raise NotImplementedError

    def get_rows(self, key: str, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` of a tensor (along axis 0), reading no more of the file than needed where possible."""
        return self.get(key)[start:stop]

    def __contains__(self, key: str) -> bool:
        return key in set(self.keys())

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def close(self) -> None:
        pass


class SafetensorsSource(TensorSource):
    """One or several safetensors files, read lazily (memory-mapped)."""

    def __init__(self, files: list[str]):
        from safetensors import safe_open

        self.path = files[0] if len(files) == 1 else os.path.dirname(files[0])
        self._np_handles, self._flax_handles, self._where = {}, {}, {}
        for file in files:
            try:
                handle = safe_open(file, framework="np")
            except FileNotFoundError:
                raise CheckpointError(f"{file}: file not found (listed in the index but missing)") from None
            except Exception as e:  # safetensors raises SafetensorError for bad headers / truncated files
                raise CheckpointError(
                    f"{file}: not a valid safetensors file ({e}); re-download or re-export it"
                ) from None
            self._np_handles[file] = handle
            size = os.path.getsize(file)
            for key in handle.keys():
                self._where[key] = file
            self._check_size(file, size)

    def _check_size(self, file: str, size: int) -> None:
        # A truncated file has a valid header whose offsets run past the end: catch it before reading tensors.
        with open(file, "rb") as fh:
            header_len = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(header_len))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        if 8 + header_len + end > size:
            raise CheckpointError(
                f"{file}: truncated ({size} bytes, header says {8 + header_len + end}); re-download or re-export it"
            )

    def keys(self) -> list[str]:
        return list(self._where)

    def _slice(self, key: str):
        return self._np_handles[self._where[key]].get_slice(key)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._slice(key).get_shape())

    def dtype(self, key: str) -> str:
        return str(self._slice(key).get_dtype()).lower()

    def get(self, key: str) -> np.ndarray:
        file = self._where[key]
        if self.dtype(key) == "bf16":  # numpy has no bfloat16: read through the flax backend (ml_dtypes)
            from safetensors import safe_open

            if file not in self._flax_handles:
                self._flax_handles[file] = safe_open(file, framework="flax")
            return np.asarray(self._flax_handles[file].get_tensor(key))
        return self._np_handles[file].get_tensor(key)

    def get_rows(self, key: str, start: int, stop: int) -> np.ndarray:
        if self.dtype(key) == "bf16":
            return self.get(key)[start:stop]
        return self._slice(key)[start:stop]


class TorchPickleSource(TensorSource):
    """``pytorch_model.bin`` files, opened with ``weights_only=True`` (and memory-mapped where possible)."""

    def __init__(self, files: list[str]):
        try:
            import torch
        except ImportError:
            raise CheckpointError(
                f"{files[0]}: reading PyTorch .bin checkpoints needs torch; pip install 'flax-narrow[torch]' "
                "or convert the checkpoint to safetensors"
            ) from None
        self.path = files[0] if len(files) == 1 else os.path.dirname(files[0])
        self._tensors: dict = {}
        for file in files:
            if not os.path.exists(file):
                raise CheckpointError(f"{file}: file not found (listed in the index but missing)")
            try:
                with warnings.catch_warnings():  # torch's notes on pickle protocols: noise on a CLI's stderr
                    warnings.simplefilter("ignore", UserWarning)
                    try:
                        sd = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
                    except RuntimeError as e:
                        if "mmap" not in str(e):  # old non-zip format cannot be mmapped; retry without
                            raise
                        sd = torch.load(file, map_location="cpu", weights_only=True)
            except Exception as e:
                msg = str(e).strip().splitlines()
                if "Weights only load failed" not in str(e) and (
                    "zip archive" in str(e) or "corrupt" in str(e) or isinstance(e, (EOFError, OSError))
                ):
                    first = (msg[0] if msg else type(e).__name__).split(". ")[0]
                    raise CheckpointError(
                        f"{file}: cannot read: corrupt or truncated PyTorch checkpoint ({first}); re-download or "
                        "re-export it"
                    ) from None
                reason = next((m for m in msg if "Unsupported" in m or "global" in m.lower()), msg[0] if msg else "")
                raise CheckpointError(
                    f"{file}: refused to load ({type(e).__name__}: {reason.strip()[:300]}); only plain tensor "
                    "checkpoints are read (weights_only=True) — a pickle carrying code is never executed"
                ) from None
            if not isinstance(sd, dict):
                raise CheckpointError(f"{file}: expected a state dict, found {type(sd).__name__}")
            if "state_dict" in sd and isinstance(sd["state_dict"], dict):
                sd = sd["state_dict"]
            for key, value in sd.items():
                if not hasattr(value, "shape"):
                    raise CheckpointError(f"{file}: entry {key!r} is a {type(value).__name__}, not a tensor")
                self._tensors[key] = value

    def keys(self) -> list[str]:
        return list(self._tensors)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._tensors[key].shape)

    def dtype(self, key: str) -> str:
        return str(self._tensors[key].dtype).replace("torch.", "")

    def get(self, key: str) -> np.ndarray:
        import torch

        t = self._tensors[key].detach()
        if t.dtype == torch.bfloat16:
            import ml_dtypes

            return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        return t.numpy()


def _index_files(directory: str, index_name: str) -> list[str]:
    path = os.path.join(directory, index_name)
    weight_map = read_json(path, what="index file", error=CheckpointError).get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
        raise CheckpointError(f"{path}: not a valid index file (no weight_map of key -> file name)")
    return [os.path.join(directory, f) for f in sorted(set(weight_map.values()))]


def find_weight_files(directory: str) -> tuple[str, list[str]]:
    """The format ('flax', 'safetensors', 'pytorch') and weight files of a checkpoint directory.

    Preference: flax-narrow weights, then safetensors (single or sharded), then PyTorch pickles.
    """

    def has(name: str) -> bool:
        return os.path.isfile(os.path.join(directory, name))

    if has(FLAX_WEIGHTS):
        return "flax", [os.path.join(directory, FLAX_WEIGHTS)]
    if has(SAFETENSORS):
        return "safetensors", [os.path.join(directory, SAFETENSORS)]
    if has(SAFETENSORS_INDEX):
        return "safetensors", _index_files(directory, SAFETENSORS_INDEX)
    if has(PT_BIN):
        return "pytorch", [os.path.join(directory, PT_BIN)]
    if has(PT_BIN_INDEX):
        return "pytorch", _index_files(directory, PT_BIN_INDEX)
    raise CheckpointError(
        f"{directory}: no weights found (looked for {FLAX_WEIGHTS}, {SAFETENSORS}, {SAFETENSORS_INDEX}, {PT_BIN}, "
        f"{PT_BIN_INDEX})"
    )


def open_weights(path: str) -> tuple[str, TensorSource]:
    """Open a checkpoint directory or a single weights file; returns (format, source)."""
    if os.path.isdir(path):
        fmt, files = find_weight_files(path)
    elif os.path.isfile(path):
        files = [path]
        fmt = "safetensors" if path.endswith(".safetensors") else "pytorch"
        if os.path.basename(path) == FLAX_WEIGHTS:
            fmt = "flax"
    else:
        raise CheckpointError(f"{path}: no such file or directory")
    if fmt == "pytorch":
        return fmt, TorchPickleSource(files)
    return fmt, SafetensorsSource(files)
