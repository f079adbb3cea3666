"""The streamed safetensors writer: readable by safetensors, row blocks, spec checks, atomic directory mode."""

import os

import ml_dtypes
import numpy as np
import pytest
from safetensors import safe_open

from flax_narrow.convert.writers import TensorSpec, atomic_directory, write_safetensors_stream
from flax_narrow.errors import CheckpointError


def test_whole_arrays_and_row_blocks_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    big = rng.standard_normal((10, 3)).astype(np.float32)
    arrays = {
        "a.kernel": rng.standard_normal((3, 5)).astype(np.float16),
        "b.bf16": rng.standard_normal((2, 2)).astype(ml_dtypes.bfloat16),
        "c.ids": np.arange(7, dtype=np.int64)[None],
        "scalar": np.array(1.5, np.float32),
    }
    specs = [TensorSpec(k, v.dtype, v.shape, lambda v=v: v) for k, v in arrays.items()]
    specs.append(TensorSpec("big", big.dtype, big.shape, lambda: (big[i : i + 4] for i in range(0, 10, 4))))
    path = str(tmp_path / "x.safetensors")
    n = write_safetensors_stream(path, specs, {"format": "pt"})
    assert n == os.path.getsize(path)
    assert int.from_bytes(open(path, "rb").read(8), "little") % 8 == 0
    with safe_open(path, "flax") as f:
        assert f.metadata() == {"format": "pt"}
        for k, v in {**arrays, "big": big}.items():
            np.testing.assert_array_equal(np.asarray(f.get_tensor(k)), v)


def test_produced_arrays_must_match_their_spec(tmp_path):
    path = str(tmp_path / "x.safetensors")
    wrong_dtype = [TensorSpec("x", np.dtype(np.float32), (2,), lambda: np.zeros(2, np.float16))]
    with pytest.raises(CheckpointError, match="produced float16"):
        write_safetensors_stream(path, wrong_dtype)
    short = [TensorSpec("x", np.dtype(np.float32), (4, 2), lambda: iter([np.zeros((3, 2), np.float32)]))]
    with pytest.raises(CheckpointError, match="produced 3 rows"):
        write_safetensors_stream(path, short)
    dup = [TensorSpec("x", np.dtype(np.float32), (1,), lambda: np.zeros(1, np.float32))] * 2
    with pytest.raises(CheckpointError, match="duplicate tensor names"):
        write_safetensors_stream(path, dup)


def test_atomic_directory_gets_the_usual_permissions(tmp_path):
    umask = os.umask(0o022)
    try:
        with atomic_directory(tmp_path / "out") as tmp:
            open(os.path.join(tmp, "f"), "w").close()
    finally:
        os.umask(umask)
    assert os.stat(tmp_path / "out").st_mode & 0o777 == 0o755
