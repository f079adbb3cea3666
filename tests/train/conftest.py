"""Session-wide caches for the training tests: packed data / tokenizers, and compiled programs of subprocesses."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory) -> str:
    """One data cache (stdlib corpus, trained tokenizers, packed rows) shared by every training test."""
    return str(tmp_path_factory.mktemp("train-data-cache"))


@pytest.fixture(scope="session")
def jax_cache(tmp_path_factory) -> str:
    """A persistent compilation cache for CLI subprocesses (identical steps compile once)."""
    return str(tmp_path_factory.mktemp("jax-compilation-cache"))


@pytest.fixture(scope="session")
def reference_run(data_cache):
    """One process, one device: the run the 8-device, tensor-parallel and 2-process runs must reproduce."""
    from train_helpers import reference_overrides

    from flax_narrow.train.config import load_config
    from flax_narrow.train.loop import pretrain

    r = pretrain(load_config("tiny", None, reference_overrides(data_cache, **{"mesh.data": 1})))
    return {"history": r.history, "evals": r.evals}
