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
