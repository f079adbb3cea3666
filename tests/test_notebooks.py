"""The Colab notebooks: committed without outputs, and each runs top to bottom offline at tiny size
(``FLAX_NARROW_NOTEBOOK_SIZE=tiny``) in a kernel of this interpreter, rendering at least one plot."""

from __future__ import annotations

import json
import os
import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
EXPECTED = ["01_convert_and_infer.ipynb", "02_finetune_and_agora.ipynb", "03_pretrain_narrowbert.ipynb"]


def _code_cells(nb: dict) -> list[dict]:
    return [c for c in nb["cells"] if c["cell_type"] == "code"]


def _source(cell: dict) -> str:
    src = cell["source"]
    return src if isinstance(src, str) else "".join(src)


def test_the_three_notebooks_are_there():
    assert [p.name for p in NOTEBOOKS] == EXPECTED


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_without_outputs(path):
    nb = json.loads(path.read_text(encoding="utf-8"))
    for i, cell in enumerate(_code_cells(nb)):
        assert cell["outputs"] == [] and cell["execution_count"] is None, (
            f"{path.name}, code cell {i}: outputs are committed; clear them (Jupyter: Edit > Clear outputs of all "
            "cells, or `jupyter nbconvert --clear-output --inplace`)"
        )
    assert nb["metadata"]["kernelspec"]["name"] == "python3"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_setup_and_parameters_come_first(path):
    """Cell 1 detects Colab and the runtime and installs from the repository; a parameter cell reads the size."""
    cells = _code_cells(json.loads(path.read_text(encoding="utf-8")))
    setup, params = _source(cells[0]), _source(cells[1])
    assert "IN_COLAB" in setup and "RUNTIME" in setup and 'REPO_URL = "https://github.com/' in setup
    assert "FLAX_NARROW_NOTEBOOK_SIZE" in params
    for cell in cells:  # notebooks use the library, never the test helpers
        assert not any(s in _source(cell) for s in ("from tests", "import conftest", "_helpers")), _source(cell)


def _kernel_for_this_interpreter(directory: pathlib.Path) -> None:
    """A ``python3`` kernelspec running ``sys.executable``, first on JUPYTER_PATH (set by the caller)."""
    spec = directory / "kernels" / "python3"
    spec.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    (spec / "kernel.json").write_text(json.dumps({"argv": argv, "display_name": "Python 3", "language": "python"}))


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_offline_at_tiny_size(path, tmp_path, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    _kernel_for_this_interpreter(tmp_path / "jupyter")
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("FLAX_NARROW_NOTEBOOK_SIZE", "tiny")
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.setenv(var, "1")
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.setenv("TMPDIR", str(work))  # the notebooks' tempfile.mkdtemp() work directories land here
    monkeypatch.setenv("MPLCONFIGDIR", str(tmp_path / "matplotlib"))

    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, kernel_name="python3", timeout=600, resources={"metadata": {"path": str(work)}})
    client.execute()  # raises CellExecutionError, with the cell and its traceback, on any error

    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert f"Python: {sys.executable}" in text, "the notebook did not run in this interpreter's kernel"
    assert not [o for o in outputs if o.output_type == "error"]
    pngs = [o for o in outputs if "image/png" in o.get("data", {})]
    assert pngs, f"{path.name} rendered no plot"
    assert os.listdir(work), "the notebook wrote nothing under its work directory"


def test_notebooks_are_ruff_clean():
    import subprocess

    ruff = os.path.join(os.path.dirname(sys.executable), "ruff")
    for cmd in ([ruff, "check", "notebooks"], [ruff, "format", "--check", "notebooks"]):
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        assert r.returncode == 0, r.stdout + r.stderr
