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
