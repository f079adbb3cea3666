"""The wheel puts only `flax_narrow` at the top of site-packages, with train/ and convert/ inside it."""

import os
import subprocess
import sys
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_wheel_has_only_flax_narrow_at_top_level(tmp_path):
    import shutil

    # build from a copy, so that setuptools' build/ and egg-info never land in the working tree
    src = tmp_path / "src"
    keep = ("flax_narrow", "train", "convert", "pyproject.toml", "README.md")
    shutil.copytree(ROOT, src, ignore=lambda d, names: [n for n in names if d == ROOT and n not in keep])
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), src],
        check=True,
    )
    (wheel,) = [f for f in os.listdir(tmp_path) if f.endswith(".whl")]
    names = zipfile.ZipFile(tmp_path / wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))}
    assert top == {"flax_narrow"}
    assert "flax_narrow/train/__init__.py" in names and "flax_narrow/convert/keymap.py" in names
    assert not any(n.startswith("flax_narrow/tests") for n in names)


def test_layers_import_in_one_direction():
    # modeling/ops/config never import train or convert (the design's dependency arrow).
    import re

    for sub in ("modeling", "ops"):
        for root, _, files in os.walk(os.path.join(ROOT, "flax_narrow", sub)):
            for f in files:
                if f.endswith(".py"):
                    text = open(os.path.join(root, f)).read()
                    assert not re.search(r"^\s*(from|import)\s+flax_narrow\.(train|convert)", text, re.M), f


def test_ruff_is_clean():
    # One formatter and linter for the project (STYLE.md); `make lint` runs the same.
    paths = [
        p
        for p in ("flax_narrow", "train", "convert", "tests", "benchmarks", "scripts")
        if os.path.isdir(os.path.join(ROOT, p))
    ]
    ruff = os.path.join(os.path.dirname(sys.executable), "ruff")
    for cmd in ([ruff, "check", *paths], [ruff, "format", "--check", *paths]):
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        assert r.returncode == 0, r.stdout + r.stderr


def _lock_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("lock", os.path.join(ROOT, "scripts", "lock.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_lock_is_current_with_pyproject():
    # `make install` refuses a stale lock; this is the same check, so CI fails on a pyproject edit without `make lock`.
    lock = _lock_module()
    assert lock.recorded_digest() == lock.dependency_digest(), "requirements.lock is stale: run `make lock`"


def test_lock_check_fails_on_a_changed_dependency(tmp_path):
    lock = _lock_module()
    text = open(os.path.join(ROOT, "pyproject.toml")).read()
    changed = tmp_path / "pyproject.toml"
    changed.write_text(text.replace('"jax>=', '"jax>=0.0.1,<99; python_version>\'3\'", "jax>=', 1))
    assert lock.dependency_digest(str(changed)) != lock.dependency_digest()


def test_lock_pins_every_requirement_exactly():
    # Each dependency of pyproject (extras torch and dev included) is in the lock, with one exact version that the
    # requirement allows; installing the lock with --no-deps therefore resolves nothing.
    import tomllib
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    pins = {}
    for line in open(os.path.join(ROOT, "requirements.lock")):
        line = line.split("#")[0].strip()
        if line:
            name, version = line.split("==")
            pins[canonicalize_name(name)] = version
    project = tomllib.load(open(os.path.join(ROOT, "pyproject.toml"), "rb"))["project"]
    reqs = project["dependencies"] + [r for extra in ("torch", "dev") for r in project["optional-dependencies"][extra]]
    for text in reqs:
        req = Requirement(text)
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} is not in requirements.lock"
        assert req.specifier.contains(pins[name], prereleases=True), f"{req.name}=={pins[name]} violates {text}"
    assert pins["torch"].endswith("+cpu")


def test_makefile_libtpu_is_the_version_jax_pins():
    # `make test` installs libtpu for the deviceless TPU compile tests; it must be a version jax[tpu] accepts.
    import re
    from importlib.metadata import requires, version

    from packaging.requirements import Requirement

    pinned = re.search(r"^LIBTPU := libtpu==(\S+)$", open(os.path.join(ROOT, "Makefile")).read(), re.M)
    assert pinned, "Makefile: no LIBTPU := libtpu==VERSION line"
    wanted = [Requirement(r) for r in requires("jax") or [] if r.startswith("libtpu") and 'extra == "tpu"' in r]
    assert wanted, f"jax {version('jax')} declares no libtpu for its tpu extra"
    assert wanted[0].specifier.contains(pinned.group(1)), f"libtpu=={pinned.group(1)} violates jax's {wanted[0]}"


def test_lock_takes_the_pins_uv_writes_to_its_output_file(tmp_path, monkeypatch):
    # uv pip compile --quiet --output-file F prints nothing: the lock must come from F (it was written empty).
    lock = _lock_module()
    target = tmp_path / "requirements.lock"
    target.write_text("# pyproject-dependencies-sha256: old\n# Written by `make lock` x\nnumpy==1.0\n")
    seen = {}

    def fake_run(cmd, **kw):
        out = cmd[cmd.index("--output-file") + 1]
        seen["seeded"] = open(out).read()
        with open(out, "w") as fh:
            fh.write("numpy==2.0\n    # via flax-narrow\ntorch==2.13.0+cpu\n")
        return subprocess.CompletedProcess(cmd, 0, stdout="", stderr="")

    monkeypatch.setattr(lock, "LOCK", str(target))
    monkeypatch.setattr(lock.subprocess, "run", fake_run)
    lock.write_lock("/nowhere", upgrade=False)
    text = target.read_text()
    assert "numpy==1.0" in seen["seeded"]  # seeded with the current pins
    assert "numpy==2.0" in text and "torch==2.13.0+cpu" in text and text.count("pyproject-dependencies-sha256") == 1
    assert not os.path.exists(str(target) + ".uv")
