"""`flax-narrow convert` and `inspect`: every source layout, the dtype/head options, and every bad input giving
one line, a non-zero exit code and nothing left behind."""

import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
import transformers
from safetensors import safe_open

import flax_narrow as fn
from conftest import max_diff, save_torch_model, tiny_hf_config, torch_run
from convert_helpers import assert_one_line_error, listing, run_cli, write_params


@pytest.fixture(scope="module")
def mlm_torch():
    torch.manual_seed(0)
    return transformers.BertForMaskedLM(tiny_hf_config()).eval()


@pytest.fixture
def hf_dir(tmp_path, mlm_torch):
    return save_torch_model(mlm_torch, tmp_path / "hf")


def _logits(model, batch):
    return model(**batch).logits


@pytest.mark.parametrize("layout", ["safetensors", "sharded", "bin", "bin-fp16"])
def test_convert_every_hf_layout(tmp_path, capsys, padded_batch, mlm_torch, layout):
    src = tmp_path / layout
    if layout == "sharded":
        save_torch_model(mlm_torch, src, max_shard_size="20KB")
    elif layout.startswith("bin"):
        save_torch_model(mlm_torch, src, fmt="bin", dtype=torch.float16 if layout == "bin-fp16" else None)
    else:
        save_torch_model(mlm_torch, src)
    (src / "vocab.txt").write_text("[PAD]\n[UNK]\n")
    dst = tmp_path / "out"
    rc, out, err = run_cli(capsys, "convert", src, dst)
    assert rc == 0, err
    assert "architecture: BertForMaskedLM" in out and f"wrote:        {dst}" in out
    assert listing(dst) == ["config.json", "flax_model.safetensors", "vocab.txt"]
    ref = transformers.BertForMaskedLM.from_pretrained(str(src), dtype=torch.float32)
    model = fn.BertForMaskedLM.from_pretrained(dst)
    tol = 1e-4 if layout == "bin-fp16" else 1e-5
    assert (
        max_diff(_logits(model, padded_batch), torch_run(ref, padded_batch).logits, padded_batch["attention_mask"])
        <= tol
    )
    # every model class reads the converted directory (heads it lacks are initialised, with a warning)
    base = fn.BertModel.from_pretrained(dst)
    ref_h = torch_run(ref.bert, padded_batch).last_hidden_state
    assert max_diff(base(**padded_batch).last_hidden_state, ref_h, padded_batch["attention_mask"]) <= tol
    assert fn.BertForSequenceClassification.from_pretrained(dst, num_labels=3)(**padded_batch).logits.shape == (2, 3)


def test_converted_files_equal_what_from_pretrained_loads(tmp_path, capsys, hf_dir):
    """The streamed writer produces exactly the parameters the in-memory loader builds."""
    from flax import nnx

    assert run_cli(capsys, "convert", hf_dir, tmp_path / "out")[0] == 0
    direct = fn.BertForMaskedLM.from_pretrained(hf_dir)
    with safe_open(str(tmp_path / "out" / "flax_model.safetensors"), "np") as f:
        stored = {k: f.get_tensor(k) for k in f.keys()}
    flat = {
        ".".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(direct, nnx.Param))
    }
    assert sorted(stored) == sorted(flat)
    for k in flat:
        np.testing.assert_array_equal(stored[k], flat[k], err_msg=k)


def test_dtype_options(tmp_path, capsys, padded_batch, hf_dir):
    dst = tmp_path / "bf16"
    rc, out, _ = run_cli(capsys, "convert", hf_dir, dst, "--dtype", "bfloat16", "--storage-dtype", "float16")
    assert rc == 0 and "stored as float16" in out and "compute bfloat16" in out
    with safe_open(str(dst / "flax_model.safetensors"), "np") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}
    cfg = json.loads((dst / "config.json").read_text())["flax_narrow"]["config"]
    assert cfg["dtype"] == "bfloat16" and cfg["param_dtype"] == "float32"
    model = fn.BertForMaskedLM.from_pretrained(dst)
    assert model.config.dtype == "bfloat16"
    assert str(model.bert.embeddings.word_embeddings.embedding.get_value().dtype) == "float32"  # cast on load

    dst2 = tmp_path / "bf16-params"
    assert run_cli(capsys, "convert", hf_dir, dst2, "--param-dtype", "bfloat16")[0] == 0
    with safe_open(str(dst2 / "flax_model.safetensors"), "np") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}


def test_head_selection_drops_and_reports(tmp_path, capsys, padded_batch, hf_dir, mlm_torch):
    dst = tmp_path / "base"
    rc, out, _ = run_cli(capsys, "convert", hf_dir, dst, "--head", "base")
    assert rc == 0
    assert "dropped (not part of BertModel): cls.predictions.bias" in out
    assert "left for from_pretrained to initialise: pooler.dense.bias, pooler.dense.kernel" in out
    with safe_open(str(dst / "flax_model.safetensors"), "np") as f:
        assert not any(k.startswith(("cls.", "pooler.")) for k in f.keys())
    base = fn.BertModel.from_pretrained(dst)
    ref = torch_run(mlm_torch.bert, padded_batch).last_hidden_state
    assert max_diff(base(**padded_batch).last_hidden_state, ref, padded_batch["attention_mask"]) <= 1e-5
    rc, _, err = run_cli(capsys, "convert", hf_dir, tmp_path / "strict", "--head", "base", "--strict")
    assert_one_line_error(rc, err, "missing keys ['pooler.dense.bias', 'pooler.dense.kernel']")
    assert not (tmp_path / "strict").exists()


def test_bare_weights_file_needs_config(tmp_path, capsys, padded_batch, hf_dir, mlm_torch):
    weights = tmp_path / "weights.safetensors"
    os.rename(os.path.join(hf_dir, "model.safetensors"), weights)
    rc, _, err = run_cli(capsys, "convert", weights, tmp_path / "out")
    assert_one_line_error(rc, err, "no config.json", "--config")
    cfg = tmp_path / "cfg.json"
    tiny_hf_config().to_json_file(cfg)
    rc, out, err = run_cli(capsys, "convert", weights, tmp_path / "out", "--config", cfg, "--verify")
    assert rc == 0, err
    assert "config:       --config" in out and "verify:       logits" in out
    model = fn.BertForMaskedLM.from_pretrained(tmp_path / "out")
    ref = torch_run(mlm_torch, padded_batch).logits
    assert max_diff(model(**padded_batch).logits, ref, padded_batch["attention_mask"]) <= 1e-5


def test_verify_prints_difference_and_roberta_is_detected(tmp_path, capsys):
    torch.manual_seed(3)
    cfg = transformers.RobertaConfig(**{**tiny_hf_config().to_dict(), "max_position_embeddings": 40, "pad_token_id": 1})
    rob = transformers.RobertaForMaskedLM(cfg).eval()
    src = save_torch_model(rob, tmp_path / "roberta")
    rc, out, err = run_cli(capsys, "convert", src, tmp_path / "out", "--verify")
    assert rc == 0, err
    assert "HF RoBERTa" in out
    line = next(x for x in out.splitlines() if x.startswith("verify:"))
    assert float(line.split("max abs diff ")[1].split()[0]) <= 1e-5


def test_verify_multiple_choice_runs_choices(tmp_path, capsys):
    """A (B, L) verification batch becomes (B, C=2, L) for multiple choice (it used to crash in transformers)."""
    torch.manual_seed(4)
    src = save_torch_model(transformers.BertForMultipleChoice(tiny_hf_config()).eval(), tmp_path / "mc")
    rc, out, err = run_cli(capsys, "convert", src, tmp_path / "out", "--verify")
    assert rc == 0, err
    line = next(x for x in out.splitlines() if x.startswith("verify:"))
    assert "logits (2, 2)" in line and float(line.split("max abs diff ")[1].split()[0]) <= 1e-5


def test_inspect_reports_format_config_count_dtypes(tmp_path, capsys, mlm_torch):
    src = save_torch_model(mlm_torch, tmp_path / "bin", fmt="bin", dtype=torch.float16)
    rc, out, _ = run_cli(capsys, "inspect", src)
    assert rc == 0
    assert "HF BERT; PyTorch pickle (.bin)" in out and "architecture: BertForMaskedLM" in out
    n = sum(p.numel() for p in mlm_torch.parameters())  # tied: the decoder counted once
    assert f"parameters:   {n:,}" in out
    assert "float16:" in out and "problems:     none" in out
    rc, out, _ = run_cli(capsys, "inspect", src, "--json")
    report = json.loads(out)
    assert report["num_parameters"] == n and report["config"]["hidden_size"] == 32 and report["problems"] == []


def test_inspect_lists_key_problems_with_exit_code_1(tmp_path, capsys, mlm_torch):
    sd = dict(mlm_torch.state_dict())
    del sd["bert.encoder.layer.1.output.dense.weight"]
    sd["bert.encoder.layer.0.surprise.weight"] = torch.zeros(3)
    d = tmp_path / "bad"
    d.mkdir()
    tiny_hf_config().save_pretrained(d)
    torch.save(sd, d / "pytorch_model.bin")
    rc, out, _ = run_cli(capsys, "inspect", d)
    assert rc == 1
    assert "missing keys ['bert.encoder.layer.1.output.dense.kernel']" in out
    assert "unexpected keys ['bert.encoder.layer.0.surprise.weight']" in out


# ------------------------------------------------------------------------------------------- bad inputs
# Each: one line on stderr, exit code 2, and DST's parent directory exactly as it was.


def _expect_failure(capsys, tmp_path, src, fragments, *extra):
    out_parent = tmp_path / "outputs"
    out_parent.mkdir(exist_ok=True)
    before = listing(out_parent)
    rc, _, err = run_cli(capsys, "convert", src, out_parent / "dst", *extra)
    assert_one_line_error(rc, err, *fragments)
    assert rc == 2
    assert listing(out_parent) == before
    return err


class _Payload:
    def __reduce__(self):
        return (os.system, (f"touch {MARKER}",))


MARKER = "/tmp/flax_narrow_cli_pwned"


def test_bad_malicious_pickle_never_runs(tmp_path, capsys):
    if os.path.exists(MARKER):
        os.remove(MARKER)
    d = tmp_path / "evil"
    d.mkdir()
    tiny_hf_config().save_pretrained(d)
    torch.save({"bert.embeddings.word_embeddings.weight": _Payload()}, d / "pytorch_model.bin")
    _expect_failure(capsys, tmp_path, d, ["refused to load", "never executed"])
    with open(d / "pytorch_model.bin", "wb") as fh:  # a legacy (non-zip) pickle too
        pickle.dump({"x": _Payload()}, fh)
    _expect_failure(capsys, tmp_path, d, ["pytorch_model.bin"])
    rc, _, err = run_cli(capsys, "inspect", d)
    assert_one_line_error(rc, err, "pytorch_model.bin")
    assert not os.path.exists(MARKER)


def test_bad_truncated_and_corrupt_safetensors(tmp_path, capsys, hf_dir):
    f = os.path.join(hf_dir, "model.safetensors")
    data = open(f, "rb").read()
    with open(f, "wb") as fh:
        fh.write(data[: len(data) // 2])
    _expect_failure(capsys, tmp_path, hf_dir, ["model.safetensors", "truncated", "re-download"])
    with open(f, "wb") as fh:
        fh.write(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage" + b"\x00" * 32)
    _expect_failure(capsys, tmp_path, hf_dir, ["model.safetensors", "not a valid safetensors file"])


def test_bad_truncated_bin(tmp_path, capsys, mlm_torch):
    d = save_torch_model(mlm_torch, tmp_path / "bin", fmt="bin")
    f = os.path.join(d, "pytorch_model.bin")
    data = open(f, "rb").read()
    with open(f, "wb") as fh:
        fh.write(data[: len(data) // 2])
    _expect_failure(capsys, tmp_path, d, ["pytorch_model.bin", "corrupt or truncated", "re-download"])


def test_bad_params_magic_and_truncation(tmp_path, capsys):
    arrays = {"word_embed.0.weight": np.zeros((8, 128), np.float32)}
    bad_magic = write_params(tmp_path / "a.params", arrays, list_magic=0x113)
    _expect_failure(capsys, tmp_path, bad_magic, ["a.params", "magic 0x113", "expected 0x112"])
    bad_array = write_params(tmp_path / "b.params", arrays, array_magic=0xDEADBEEF)
    _expect_failure(capsys, tmp_path, bad_array, ["b.params", "0xDEADBEEF", "0xF993FAC9"])
    good = write_params(tmp_path / "c.params", arrays)
    data = open(good, "rb").read()
    with open(good, "wb") as fh:
        fh.write(data[:-100])
    _expect_failure(capsys, tmp_path, good, ["c.params", "truncated"])


def test_bad_unrecognised_file(tmp_path, capsys):
    f = tmp_path / "weights.bin.txt"
    f.write_bytes(b"hello world, not weights" * 4)
    _expect_failure(capsys, tmp_path, f, ["unrecognised weights file"])


def test_bad_config_contradicts_weights(tmp_path, capsys, hf_dir):
    wrong = tmp_path / "wrong.json"
    tiny_hf_config(hidden_size=64).to_json_file(wrong)
    _expect_failure(
        capsys,
        tmp_path,
        hf_dir,
        ["hidden_size=64", "word_embeddings.weight has shape (99, 32)", "--config"],
        "--config",
        wrong,
    )
    tiny_hf_config(num_hidden_layers=3).to_json_file(wrong)
    _expect_failure(capsys, tmp_path, hf_dir, ["num_hidden_layers=3", "encoder.layer [0, 1]"], "--config", wrong)


@pytest.mark.parametrize("problem", ["missing", "unexpected", "mis-shaped"])
def test_bad_keys_are_named(tmp_path, capsys, mlm_torch, problem):
    sd = dict(mlm_torch.state_dict())
    if problem == "missing":
        del sd["bert.encoder.layer.1.output.dense.weight"]
        fragment = "missing keys ['bert.encoder.layer.1.output.dense.kernel']"
    elif problem == "unexpected":
        sd["bert.encoder.layer.0.surprise.weight"] = torch.zeros(3)
        fragment = "unexpected keys ['bert.encoder.layer.0.surprise.weight']"
    else:
        sd["bert.encoder.layer.0.output.LayerNorm.bias"] = torch.zeros(31)
        fragment = "bert.encoder.layer.0.output.LayerNorm.bias: checkpoint (31,) vs model (32,)"
    d = tmp_path / problem
    d.mkdir()
    tiny_hf_config().save_pretrained(d)
    torch.save(sd, d / "pytorch_model.bin")
    _expect_failure(capsys, tmp_path, d, [fragment])


def test_bad_existing_destination_is_kept(tmp_path, capsys, hf_dir):
    dst = tmp_path / "outputs" / "dst"
    dst.mkdir(parents=True)
    (dst / "precious.txt").write_text("keep me")
    rc, _, err = run_cli(capsys, "convert", hf_dir, dst)
    assert_one_line_error(rc, err, "already exists", "--overwrite")
    assert listing(dst) == ["precious.txt"] and listing(tmp_path / "outputs") == ["dst"]
    rc, _, _ = run_cli(capsys, "convert", hf_dir, dst, "--overwrite")
    assert rc == 0 and "precious.txt" not in listing(dst) and listing(tmp_path / "outputs") == ["dst"]


def test_bad_unwritable_destination(tmp_path, capsys, hf_dir):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    rc, _, err = run_cli(capsys, "convert", hf_dir, blocker / "dst")
    assert_one_line_error(rc, err, "cannot write there")
    assert listing(tmp_path) == ["a-file", "hf"]


def test_bad_destination_inside_source(tmp_path, capsys, hf_dir):
    rc, _, err = run_cli(capsys, "convert", hf_dir, os.path.join(hf_dir, "sub"))
    assert_one_line_error(rc, err, "must not be, contain, or lie inside the source")


def test_failed_verification_and_interrupted_write_leave_nothing(tmp_path, capsys, hf_dir, monkeypatch):
    from flax_narrow.convert import conversion, writers

    monkeypatch.setattr(
        conversion, "verify_conversion", lambda *a: conversion.VerifyResult("logits", (2, 16, 99), 0.5, "transformers")
    )
    _expect_failure(capsys, tmp_path, hf_dir, ["verification failed", "0.5 > 0.001", "nothing was written"], "--verify")
    monkeypatch.undo()

    real = writers.TensorSpec.__init__
    calls = []

    def interrupt_on_the_fifth(self, *a, **k):
        real(self, *a, **k)
        produce = self.produce

        def wrapped():
            calls.append(1)
            if len(calls) == 5:
                raise KeyboardInterrupt
            return produce()

        object.__setattr__(self, "produce", wrapped)

    monkeypatch.setattr(writers.TensorSpec, "__init__", interrupt_on_the_fifth)
    (tmp_path / "outputs").mkdir(exist_ok=True)
    rc, _, err = run_cli(capsys, "convert", hf_dir, tmp_path / "outputs" / "dst")
    assert rc == 130 and "interrupted" in err and len(calls) == 5
    assert listing(tmp_path / "outputs") == []


def test_hub_id_offline_is_one_line(tmp_path, capsys):
    rc, _, err = run_cli(capsys, "convert", "no-such-org/no-such-model-xyz", tmp_path / "dst")
    assert_one_line_error(rc, err, "downloading it from the hub failed")


def test_console_script_exit_codes(tmp_path):
    """The installed `flax-narrow` script: a refused pickle exits 2 with one line, and runs nothing."""
    exe = os.path.join(os.path.dirname(sys.executable), "flax-narrow")
    if os.path.exists(MARKER):
        os.remove(MARKER)
    d = tmp_path / "evil"
    d.mkdir()
    tiny_hf_config().save_pretrained(d)
    torch.save({"x": _Payload()}, d / "pytorch_model.bin")
    r = subprocess.run([exe, "convert", str(d), str(tmp_path / "out")], capture_output=True, text=True)
    assert r.returncode == 2
    assert_one_line_error(r.returncode, r.stderr, "flax-narrow convert: error:", "refused to load")
    with open(d / "pytorch_model.bin", "wb") as fh:  # legacy pickle: torch's warnings must not reach stderr
        pickle.dump({"x": _Payload()}, fh)
    r = subprocess.run([exe, "inspect", str(d)], capture_output=True, text=True)
    assert_one_line_error(r.returncode, r.stderr, "flax-narrow inspect: error:", "refused to load")
    assert r.returncode == 2
    assert not os.path.exists(MARKER) and listing(tmp_path) == ["evil"]
    r = subprocess.run([exe, "convert", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "--storage-dtype" in r.stdout
    # success with --verify on a stale-decoder checkpoint: exit 0, and nothing from transformers on stderr
    from flax_narrow.convert.parity_demo import write_bort_like_checkpoint

    src = write_bort_like_checkpoint(str(tmp_path / "bort"), hidden=64, layers=2, vocab=200)
    r = subprocess.run([exe, "convert", src, str(tmp_path / "ok"), "--verify"], capture_output=True, text=True)
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert "verify:       logits (2, 16, 200): max abs diff" in r.stdout
