"""Every ```python block in README.md and docs/*.md runs as written (offline). A block preceded by the line
``<!-- no-run: reason -->`` is skipped (e.g. one that needs the hub), with the reason shown."""

import glob
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BLOCK = re.compile(r"(<!-- no-run: (?P<why>[^>]*) -->\s*\n)?```python\n(?P<code>.*?)```", re.S)


def _blocks():
    for path in [os.path.join(ROOT, "README.md"), *sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))]:
        text = open(path, encoding="utf-8").read()
        for i, m in enumerate(BLOCK.finditer(text)):
            yield pytest.param(m.group("code"), m.group("why"), id=f"{os.path.basename(path)}#{i}")


@pytest.mark.parametrize("code,why", list(_blocks()))
def test_doc_block_runs(code, why, tmp_path, monkeypatch):
    if why:
        pytest.skip(why)
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "<doc>", "exec"), {"__name__": "__doc__"})


def test_cli_reference_is_current():
    """docs/cli.md and README.md's CLI block are exactly what scripts/gen_cli_docs.py renders from --help."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("gen_cli_docs", os.path.join(ROOT, "scripts", "gen_cli_docs.py"))
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    current = open(os.path.join(ROOT, "docs", "cli.md"), encoding="utf-8").read()
    assert current == gen.render(), "docs/cli.md is stale: run python scripts/gen_cli_docs.py"
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    assert readme == gen.render_readme(readme), "README.md's CLI block is stale: run python scripts/gen_cli_docs.py"
