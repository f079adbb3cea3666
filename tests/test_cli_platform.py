"""``flax_narrow.cli.skip_absent_tpu``: libtpu installed on a machine with no TPU -> the CPU backend, and only then."""

import importlib.util
import os
import subprocess
import sys

import jax
import pytest
from jax._src import hardware_utils

from flax_narrow import cli


@pytest.fixture
def world(monkeypatch):
    """A machine with libtpu installed, no TPU chips, no other plugin and no JAX_PLATFORMS; records updates."""
    updates = []
    real_find_spec = importlib.util.find_spec
    state = {"libtpu": True, "chips": 0, "plugins": []}
    monkeypatch.delenv("JAX_PLATFORMS", raising=False)
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: (object() if state["libtpu"] else None) if name == "libtpu" else real_find_spec(name, *a),
    )
    monkeypatch.setattr(hardware_utils, "num_available_tpu_chips_and_device_id", lambda: (state["chips"], None))
    monkeypatch.setattr(cli, "_other_jax_plugins", lambda: state["plugins"])
    monkeypatch.setattr(jax.config, "update", lambda name, value: updates.append((name, value)))
    return state, updates


def test_libtpu_without_a_tpu_selects_the_cpu(world):
    _, updates = world
    assert cli.skip_absent_tpu() is True
    assert updates == [("jax_platforms", "cpu")]


@pytest.mark.parametrize(
    "change",
    ["user_set_platforms", "no_libtpu", "tpu_chips", "cuda_plugin"],
)
def test_left_alone_otherwise(world, monkeypatch, change):
    state, updates = world
    if change == "user_set_platforms":
        monkeypatch.setenv("JAX_PLATFORMS", "tpu")
    elif change == "no_libtpu":
        state["libtpu"] = False
    elif change == "tpu_chips":
        state["chips"] = 4
    else:
        state["plugins"] = ["xla_cuda12"]
    assert cli.skip_absent_tpu() is False
    assert updates == []


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu is not installed")
def test_no_libtpu_search_when_jax_platforms_is_unset():
    # The real thing, in a fresh process without the suite's JAX_PLATFORMS=cpu, as `flax-narrow` starts: without
    # the fix libtpu prints its TPU-metadata warnings ("could not determine TPU accelerator type", ...) on stderr
    # when the first backend starts.
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    code = (
        "from flax_narrow.cli import skip_absent_tpu; assert skip_absent_tpu(); "
        "import jax; print(jax.devices()[0].platform)"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "cpu"
    assert "TPU" not in out.stderr, out.stderr
