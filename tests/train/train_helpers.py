"""Shared helpers for the training tests: a small real-text config and running the CLI in subprocesses.

Subprocess runs use a persistent compilation cache, so that the runs of one test (killed / resumed) compile
the step once, and by default XLA's backend optimisation level 0, which compiles faster; comparisons that must
be bitwise exact against an in-process run use the default level, as the pytest process does.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def small_overrides(cache_dir: str, **extra: object) -> list[str]:
    """--set overrides for a tiny NarrowBERT on the first 400 standard-library docstrings."""
    values = {
        "data.cache_dir": cache_dir,
        "data.max_documents": 400,
        "data.tokenizer_vocab_size": 1024,
        "model.vocab_size": 1024,
        "train.log_every": 1,
        "train.progress_bar": "false",
        "train.global_batch_size": 16,
        "model.num_hidden_layers": 2,
        "model.full_length_layers": 1,
        "mesh.data": 1,
        **extra,
    }
    return [f"{k}={v}" for k, v in values.items()]


def reference_overrides(cache_dir: str, **extra: object) -> list[str]:
    """The exactness runs: 50 steps of 2 micro-batches, dropout on, evaluation every 10 steps."""
    values = {
        "train.steps": 50,
        "train.grad_accum_steps": 2,
        "train.eval_every": 10,
        "data.eval_fraction": 0.1,
        "checkpoint.every_steps": 5,
        **extra,
    }
    return small_overrides(cache_dir, **values)


def cli_env(jax_cache: str, *, fast_compile: bool = True) -> dict[str, str]:
    """Environment of CLI subprocesses. ``fast_compile=False`` keeps XLA's default optimisation, as in the
    pytest process, for results bitwise equal to in-process runs."""
    env = dict(os.environ)
    if fast_compile:
        env["XLA_FLAGS"] = "--xla_backend_optimization_level=0"
    env.update(
        JAX_DEFAULT_MATMUL_PRECISION="highest",
        JAX_COMPILATION_CACHE_DIR=jax_cache,
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_PLATFORMS="cpu",
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
    )
    return env


def pretrain_cmd(overrides: list[str], *extra: str) -> list[str]:
    cmd = [sys.executable, "-m", "flax_narrow.cli", "pretrain", "--preset", "tiny"]
    for o in overrides:
        cmd += ["--set", o]
    return cmd + list(extra)


def start(cmd: list[str], env: dict[str, str], log_path: str) -> subprocess.Popen:
    fh = open(log_path, "w")
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT)


def finish(proc: subprocess.Popen, log_path: str, timeout: float = 300) -> int:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError(f"timed out; log:\n{open(log_path).read()[-4000:]}") from None


def log_tail(path: str, n: int = 4000) -> str:
    with open(path) as fh:
        return fh.read()[-n:]


def wait_for(predicate, proc: subprocess.Popen, log_path: str, timeout: float = 240, poll: float = 0.02) -> None:
    """Poll until ``predicate()``; fail (with the log) if the process exits first or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if proc.poll() is not None:
            raise AssertionError(f"process exited ({proc.returncode}) before the condition; log:\n{log_tail(log_path)}")
        time.sleep(poll)
    proc.kill()
    raise AssertionError(f"condition not reached in {timeout}s; log:\n{log_tail(log_path)}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
