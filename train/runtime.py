"""Process-level JAX settings for training entry points: the persistent compilation cache.

A restarted or resumed job, a second run of the same model, and every host of a pod after the first
compile read the compiled step from disk instead of compiling it again (see benchmarks/RESULTS.md for the
measured effect). The cache directory is trusted code: keep it private to the user (the default is under
``~/.cache``), never a directory others can write.
"""

from __future__ import annotations

import logging
import os

import jax

log = logging.getLogger(__name__)


def default_cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "flax-narrow", "xla")


def enable_compilation_cache(setting: str | None = "auto") -> str | None:
    """Turn on JAX's persistent compilation cache; returns the directory in use (None: off).

    ``setting``: "auto" (``$XDG_CACHE_HOME/flax-narrow/xla`` or ``~/.cache/flax-narrow/xla``), a directory,
    or None / "" / "off". A directory already configured for JAX (``JAX_COMPILATION_CACHE_DIR`` or
    ``jax.config``) wins over the setting and is left as it is.
    """
    current = jax.config.jax_compilation_cache_dir
    if current:
        return current
    if not setting or setting == "off":
        return None
    path = default_cache_dir() if setting == "auto" else os.path.expanduser(setting)
    os.makedirs(path, mode=0o700, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", path)
    try:  # the cache decides once per process whether it is on; make it look again
        from jax._src import compilation_cache

        compilation_cache.reset_cache()
    except (ImportError, AttributeError):  # pragma: no cover - a JAX without it reads the setting at first use
        pass
    log.info("persistent compilation cache: %s", path)
    return path
