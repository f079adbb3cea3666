"""Every bad input to ``flax-narrow convert | export | inspect``: one line naming the problem on stderr, exit code 2,
no traceback, nothing written. The expected lines are the ones listed in docs/errors.md (section
``## convert, export, inspect``), so the documentation and the CLI cannot drift apart."""

from __future__ import annotations

import json
import os
import re

import pytest

import flax_narrow as fn
from conftest import save_torch_model, tiny_hf_config
from convert_helpers import run_cli

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SECTION = "## convert, export, inspect"


def documented() -> dict[str, str]:
    """case id -> the documented stderr line, from docs/errors.md's table rows ``| `id` | `line` |``."""
    text = open(os.path.join(ROOT, "docs", "errors.md"), encoding="utf-8").read()
    start = text.index(SECTION)
    end = text.find("\n## ", start + len(SECTION))
    rows = re.findall(r"^\| `([a-z0-9-]+)` \| .*? \| `` (.+) `` \|$", text[start : end if end > 0 else None], re.M)
    return dict(rows)


def _hf(tmp) -> str:
    import torch
    import transformers

    torch.manual_seed(0)
    return save_torch_model(transformers.BertForMaskedLM(tiny_hf_config()).eval(), tmp / "hf")


def _write(path, text: str) -> str:
    path.write_text(text)
    return str(path)


def _flax(tmp, config: fn.EncoderConfig, cls=fn.BertForMaskedLM, name: str = "flax") -> str:
    return cls.from_config(config).save_pretrained(tmp / name)


def _config_dir(tmp, **hf) -> str:
    d = tmp / "cfg-only"
    d.mkdir()
    tiny_hf_config(**hf).save_pretrained(d)
    return str(d)


def _unknown_architecture(tmp) -> str:
    src = _hf(tmp)
    raw = json.loads(open(os.path.join(src, "config.json")).read())
    raw["architectures"] = ["GPT2LMHeadModel"]
    _write(tmp / "hf" / "config.json", json.dumps(raw))
    return src


def _bare_weights(tmp) -> str:
    src = _hf(tmp)
    os.rename(os.path.join(src, "model.safetensors"), tmp / "weights.safetensors")
    return str(tmp / "weights.safetensors")


def _broken_block(tmp) -> str:
    src = _flax(tmp, fn.EncoderConfig.tiny())
    raw = json.loads(open(os.path.join(src, "config.json")).read())
    raw["flax_narrow"] = {"architecture": "BertForMaskedLM"}
    _write(tmp / "flax" / "config.json", json.dumps(raw))
    return src


def _wrong_config(tmp) -> str:
    tiny_hf_config(hidden_size=64).to_json_file(tmp / "wrong.json")
    return str(tmp / "wrong.json")


# case id -> (setup(tmp) -> argv with SRC/DST/... resolved)
CASES = {
    "convert-missing-source": lambda t: ["convert", t / "nope", t / "out" / "dst"],
    "convert-empty-directory": lambda t: ["convert", (t / "empty").mkdir() or t / "empty", t / "out" / "dst"],
    "convert-no-weights": lambda t: ["convert", _config_dir(t), t / "out" / "dst"],
    "convert-not-weights": lambda t: ["convert", _write(t / "notes.txt", "hello, not weights" * 4), t / "out" / "dst"],
    "convert-bare-weights-no-config": lambda t: ["convert", _bare_weights(t), t / "out" / "dst"],
    "convert-unknown-architecture": lambda t: ["convert", _unknown_architecture(t), t / "out" / "dst"],
    "convert-unknown-head": lambda t: ["convert", _hf(t), t / "out" / "dst", "--head", "ner"],
    "convert-bad-dtype": lambda t: ["convert", _hf(t), t / "out" / "dst", "--dtype", "float8"],
    "convert-bad-storage-dtype": lambda t: ["convert", _hf(t), t / "out" / "dst", "--storage-dtype", "int8"],
    "convert-bad-tolerance": lambda t: ["convert", _hf(t), t / "out" / "dst", "--verify", "--verify-atol", "tiny"],
    "convert-missing-destination": lambda t: ["convert", _hf(t)],
    "convert-narrow-qa-head": lambda t: [
        "convert",
        _flax(t, fn.EncoderConfig.tiny_narrowbert(), fn.NarrowBertForMaskedLM),
        t / "out" / "dst",
        "--head",
        "question-answering",
    ],
    "convert-config-missing": lambda t: ["convert", _hf(t), t / "out" / "dst", "--config", t / "nope.json"],
    "convert-config-not-json": lambda t: [
        "convert",
        _hf(t),
        t / "out" / "dst",
        "--config",
        _write(t / "bad.json", "{hidden_size: 32"),
    ],
    "convert-config-not-object": lambda t: [
        "convert",
        _hf(t),
        t / "out" / "dst",
        "--config",
        _write(t / "l.json", "[1]"),
    ],
    "convert-config-bad-value": lambda t: [
        "convert",
        _hf(t),
        t / "out" / "dst",
        "--config",
        _write(t / "v.json", '{"vocab_size": "many"}'),
    ],
    "convert-bad-flax-narrow-block": lambda t: ["convert", _broken_block(t), t / "out" / "dst"],
    "convert-config-contradicts-weights": lambda t: [
        "convert",
        _hf(t),
        t / "out" / "dst",
        "--config",
        _wrong_config(t),
    ],
    "convert-strict-missing-head": lambda t: ["convert", _hf(t), t / "out" / "dst", "--head", "base", "--strict"],
    "convert-destination-exists": lambda t: [
        "convert",
        _hf(t),
        (t / "out" / "dst").mkdir(parents=True) or t / "out" / "dst",
    ],
    "convert-destination-inside-source": lambda t: ["convert", _hf(t), t / "hf" / "sub"],
    "export-missing-source": lambda t: ["export", t / "nope", t / "out" / "dst"],
    "export-hf-source": lambda t: ["export", _hf(t), t / "out" / "dst"],
    "export-roberta-task-head": lambda t: [
        "export",
        _flax(
            t,
            fn.EncoderConfig.tiny(model_type="roberta", position_offset=2, pad_token_id=1),
            fn.BertForSequenceClassification,
        ),
        t / "out" / "dst",
    ],
    "export-destination-exists": lambda t: [
        "export",
        _flax(t, fn.EncoderConfig.tiny()),
        (t / "out" / "dst").mkdir(parents=True) or t / "out" / "dst",
    ],
    "export-bad-storage-dtype": lambda t: [
        "export",
        _flax(t, fn.EncoderConfig.tiny()),
        t / "out" / "dst",
        "--storage-dtype",
        "int8",
    ],
    "inspect-missing-source": lambda t: ["inspect", t / "nope"],
    "inspect-not-weights": lambda t: ["inspect", _write(t / "notes.txt", "hello, not weights" * 4)],
    "inspect-config-not-json": lambda t: ["inspect", _hf(t), "--config", _write(t / "bad.json", "{hidden_size: 32")],
    "inspect-unknown-head": lambda t: ["inspect", _hf(t), "--head", "ner"],
}


def _tree(root) -> list[str]:
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, dirs, files in os.walk(root) for f in files + dirs)


def test_every_case_is_documented_and_every_documented_case_is_tested():
    assert sorted(documented()) == sorted(CASES)


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_one_documented_line_exit_2_and_nothing_written(tmp_path, capsys, case):
    tmp = tmp_path / "t"
    tmp.mkdir()
    argv = CASES[case](tmp)
    before = _tree(tmp)
    rc, out, err = _run(capsys, argv)
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2, (rc, err)
    assert len(lines) == 1 and "Traceback" not in err, err
    assert out == ""
    assert _tree(tmp) == before, "something was written"
    line = lines[0].replace(str(tmp), "TMP")
    # argparse quotes the choices it lists in some Python versions and not in others
    assert line.replace("'", "") == documented()[case].replace("'", "")


def _run(capsys, argv):
    """(exit code, stdout, stderr) of ``flax-narrow ARGV``; usage errors exit through argparse's SystemExit."""
    try:
        return run_cli(capsys, *argv)
    except SystemExit as e:
        out, err = capsys.readouterr()
        return e.code, out, err
