"""Shared fixtures: tiny random transformers models saved to disk (no network), fp32 at highest precision."""

from __future__ import annotations

import logging
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# The CLIs turn on JAX's persistent compilation cache under ~/.cache/flax-narrow: keep tests out of the home
# directory (in-process CLI tests write there otherwise).
if "FLAX_NARROW_TEST_XDG" not in os.environ:  # made here (subprocesses inherit it): removed when the run ends
    import atexit
    import shutil
    import tempfile

    os.environ["FLAX_NARROW_TEST_XDG"] = tempfile.mkdtemp(prefix="flax-narrow-xdg-")
    atexit.register(shutil.rmtree, os.environ["FLAX_NARROW_TEST_XDG"], ignore_errors=True)
os.environ["XDG_CACHE_HOME"] = os.environ["FLAX_NARROW_TEST_XDG"]
# The suite runs on CPU (parity at highest precision), also where libtpu is installed for the deviceless TPU
# compile tests: without this, every JAX process (subprocesses included) would first search for a TPU.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
# 8 fake CPU devices for the sharding tests; single-device code runs on device 0 as before. Must be set
# before JAX initialises its backends, which is why it lives here.
jax.config.update("jax_num_cpu_devices", 8)
logging.getLogger("transformers").setLevel(logging.ERROR)

TINY_HF = dict(
    vocab_size=99,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=37,
    max_position_embeddings=64,
    hidden_dropout_prob=0.1,
    attention_probs_dropout_prob=0.1,
)


def tiny_hf_config(**kw):
    from transformers import BertConfig

    return BertConfig(**{**TINY_HF, **kw})


def save_torch_model(model, directory, *, fmt: str = "safetensors", dtype=None, **save_kw) -> str:
    """Save a transformers model as model.safetensors (optionally sharded) or as pytorch_model.bin."""
    import torch

    os.makedirs(directory, exist_ok=True)
    if fmt == "safetensors":
        model.save_pretrained(directory, **save_kw)
    elif fmt == "bin":
        model.config.save_pretrained(directory)
        sd = model.state_dict()
        if dtype is not None:
            sd = {k: v.to(dtype) for k, v in sd.items()}
        torch.save(sd, os.path.join(directory, "pytorch_model.bin"))
    else:
        raise ValueError(fmt)
    return str(directory)


@pytest.fixture
def padded_batch():
    """Two rows, the second padded, with token types; ids avoid the pad id 0."""
    ids = np.array([[2, 15, 16, 17, 18, 19, 20, 3], [2, 30, 31, 32, 3, 0, 0, 0]], np.int64)
    mask = (ids != 0).astype(np.int64)
    types = np.array([[0, 0, 0, 0, 1, 1, 1, 1], [0, 0, 1, 1, 1, 0, 0, 0]], np.int64)
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}


def torch_run(model, batch):
    import torch

    model.eval()
    with torch.no_grad():
        return model(**{k: torch.from_numpy(np.asarray(v)) for k, v in batch.items()})


def max_diff(a, b, mask=None) -> float:
    a = np.asarray(a, np.float32)
    b = b.detach().float().numpy() if hasattr(b, "detach") else np.asarray(b, np.float32)
    d = np.abs(a - b)
    if mask is not None:
        d = d[np.asarray(mask).astype(bool)]
    return float(d.max())
