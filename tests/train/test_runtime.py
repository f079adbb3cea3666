"""The persistent compilation cache the CLI turns on: a second process reads the compiled program back."""

import json
import os
import subprocess
import sys

import jax

from flax_narrow.train.runtime import default_cache_dir, enable_compilation_cache

SCRIPT = r"""
import json, sys
import jax, jax.numpy as jnp
from flax_narrow.train.runtime import enable_compilation_cache
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
hits = []
jax.monitoring.register_event_listener(lambda e, **kw: hits.append(e) if e.endswith("cache_hits") else None)
jnp.ones(3).block_until_ready()  # a compile before the cache is turned on must not stop it working
path = enable_compilation_cache(sys.argv[1])
jax.jit(lambda x: jnp.tanh(x @ x.T).sum())(jnp.ones((64, 64))).block_until_ready()
print(json.dumps({"path": path, "hits": len(hits)}))
"""


def _run(cache_dir, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    env.update(JAX_PLATFORMS="cpu", XDG_CACHE_HOME=str(tmp_path / "xdg"))
    r = subprocess.run([sys.executable, "-c", SCRIPT, cache_dir], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_second_process_hits_the_cache(tmp_path):
    cache = tmp_path / "cache"
    first = _run(str(cache), tmp_path)
    assert first == {"path": str(cache), "hits": 0} and os.listdir(cache)
    assert _run(str(cache), tmp_path)["hits"] >= 1


def test_auto_is_under_xdg_cache_home_and_off_is_off(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_cache_dir() == str(tmp_path / "flax-narrow" / "xla")
    assert _run("auto", tmp_path)["path"] == str(tmp_path / "xdg" / "flax-narrow" / "xla")
    assert _run("off", tmp_path)["path"] is None


def test_a_directory_already_configured_wins(tmp_path, monkeypatch):
    before = jax.config.jax_compilation_cache_dir
    try:
        jax.config.update("jax_compilation_cache_dir", str(tmp_path / "theirs"))
        assert enable_compilation_cache(str(tmp_path / "mine")) == str(tmp_path / "theirs")
        assert not (tmp_path / "mine").exists()
    finally:
        jax.config.update("jax_compilation_cache_dir", before)
