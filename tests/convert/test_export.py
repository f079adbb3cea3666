"""`flax-narrow export`: HF → flax-narrow → HF round trips that transformers reloads exactly, NarrowBERT in the
authors' layout, and the BORT end-to-end target (fp16 .bin with a stale decoder copy)."""

import json
import os
import sys

import numpy as np
import pytest
import torch
import transformers
from safetensors import safe_open
from safetensors.torch import load_file

import flax_narrow as fn
from conftest import max_diff, save_torch_model, tiny_hf_config, torch_run
from convert_helpers import assert_one_line_error, listing, run_cli

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "modeling"))
from narrow_reference import TINY_NARROW, RefForMaskedLM, randomize, save_authors_checkpoint, save_port_checkpoint  # noqa: E402


def _keys(path) -> list[str]:
    with safe_open(str(path), "np") as f:
        return sorted(f.keys())


def _round_trip(capsys, tmp_path, src, *convert_args) -> str:
    rc, _, err = run_cli(capsys, "convert", src, tmp_path / "flax", *convert_args)
    assert rc == 0, err
    rc, out, err = run_cli(capsys, "export", tmp_path / "flax", tmp_path / "back")
    assert rc == 0, err
    return str(tmp_path / "back")


HEADS = [
    "BertForMaskedLM",
    "BertModel",
    "BertForSequenceClassification",
    "BertForTokenClassification",
    "BertForQuestionAnswering",
    "BertForMultipleChoice",
]


@pytest.mark.parametrize("name", HEADS)
def test_hf_flax_hf_round_trip_is_exact(tmp_path, capsys, name):
    torch.manual_seed(1)
    original = getattr(transformers, name)(tiny_hf_config(num_labels=2 if "Question" in name else 3)).eval()
    src = save_torch_model(original, tmp_path / "hf")
    back = _round_trip(capsys, tmp_path, src)
    # the same tensors as transformers' own save_pretrained (tied copies left out the same way)
    assert _keys(os.path.join(back, "model.safetensors")) == _keys(os.path.join(src, "model.safetensors"))
    reloaded, info = getattr(transformers, name).from_pretrained(back, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    theirs, ours = original.state_dict(), reloaded.state_dict()
    assert sorted(theirs) == sorted(ours)
    for k in theirs:
        assert torch.equal(theirs[k], ours[k]), k
    cfg = json.loads(open(os.path.join(back, "config.json")).read())
    assert cfg["architectures"] == [name] and cfg["model_type"] == "bert" and "flax_narrow" not in cfg


def test_mlm_round_trip_outputs_and_tokenizer(tmp_path, capsys, padded_batch):
    torch.manual_seed(2)
    original = transformers.BertForMaskedLM(tiny_hf_config()).eval()
    src = save_torch_model(original, tmp_path / "hf")
    for name in ("vocab.txt", "tokenizer_config.json"):
        (tmp_path / "hf" / name).write_text("{}" if name.endswith(".json") else "[PAD]\n")
    back = _round_trip(capsys, tmp_path, src)
    assert listing(back) == ["config.json", "model.safetensors", "tokenizer_config.json", "vocab.txt"]
    reloaded = transformers.BertForMaskedLM.from_pretrained(back)
    ref = torch_run(original, padded_batch).logits
    assert max_diff(torch_run(reloaded, padded_batch).logits.numpy(), ref) == 0.0


def test_roberta_mlm_round_trip(tmp_path, capsys):
    torch.manual_seed(3)
    cfg = transformers.RobertaConfig(**{**tiny_hf_config().to_dict(), "max_position_embeddings": 40, "pad_token_id": 1})
    original = transformers.RobertaForMaskedLM(cfg).eval()
    src = save_torch_model(original, tmp_path / "hf")
    back = _round_trip(capsys, tmp_path, src)
    assert _keys(os.path.join(back, "model.safetensors")) == _keys(os.path.join(src, "model.safetensors"))
    reloaded, info = transformers.RobertaForMaskedLM.from_pretrained(back, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    ids = np.array([[0, 5, 6, 7, 2, 1, 1]])
    batch = {"input_ids": ids, "attention_mask": (ids != 1).astype(np.int64)}
    assert max_diff(torch_run(reloaded, batch).logits.numpy(), torch_run(original, batch).logits) == 0.0


NARROW = TINY_NARROW


@pytest.mark.parametrize("layout", ["authors", "port"])
def test_narrowbert_exports_in_the_authors_layout(tmp_path, capsys, layout):
    ref = randomize(RefForMaskedLM(NARROW), seed=0)
    save = save_authors_checkpoint if layout == "authors" else save_port_checkpoint
    src = save(ref, tmp_path / layout, NARROW, "NarrowBertForMaskedLM")
    rc, out, err = run_cli(capsys, "inspect", src)
    assert rc == 0 and ("authors' layout" if layout == "authors" else "port layout") in out
    rc, out, err = run_cli(capsys, "convert", src, tmp_path / "flax", "--verify")
    assert rc == 0, err
    assert "architecture: NarrowBertForMaskedLM" in out and "vs the PyTorch NarrowBERT" in out
    assert float(out.split("max abs diff ")[1].split()[0]) <= 1e-5
    rc, out, err = run_cli(capsys, "export", tmp_path / "flax", tmp_path / "back")
    assert rc == 0, err
    back = tmp_path / "back"
    cfg = json.loads((back / "config.json").read_text())
    assert cfg["model_type"] == "bert" and cfg["full_length_layers"] == 2 and cfg["num_hidden_layers"] == 4
    assert cfg["architectures"] == ["NarrowBertForMaskedLM"]
    sd = load_file(str(back / "model.safetensors"))
    assert {k.split(".layer.")[0] + ".layer." + k.split(".layer.")[1].split(".")[0] for k in sd if ".layer." in k} == {
        "bert.encoder.layer.0",
        "bert.encoder.layer.1",
        "bert.encoder_narrow.layer.0",
        "bert.encoder_narrow.layer.1",
    }
    # transformers 4.28's layout: tied decoder copies and the position_ids buffer are there too
    assert torch.equal(sd.pop("cls.predictions.decoder.weight"), sd["bert.embeddings.word_embeddings.weight"])
    assert torch.equal(sd.pop("cls.predictions.decoder.bias"), sd["cls.predictions.bias"])
    # the authors' state-dict names, loaded strictly into the PyTorch reference written from the spec
    fresh = RefForMaskedLM(NARROW).eval()
    fresh.load_state_dict(sd, strict=True)
    for k, v in ref.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k
    # and flax-narrow reads its own export back to the same model
    again = fn.NarrowBertForMaskedLM.from_pretrained(back)
    ids = np.array([[2, 11, 12, 13, 14, 3]])
    labels = np.array([[-100, 5, -100, 7, -100, -100]])
    batch = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}
    with torch.no_grad():
        ref_logits, _ = ref(**{k: torch.from_numpy(v) for k, v in batch.items()}, labels=torch.from_numpy(labels))
    got = again(**batch, labels=labels).logits
    assert np.abs(np.asarray(got) - ref_logits.numpy()).max() <= 1e-5


def test_export_refuses_what_is_not_flax_narrow(tmp_path, capsys):
    src = save_torch_model(transformers.BertModel(tiny_hf_config()), tmp_path / "hf")
    rc, _, err = run_cli(capsys, "export", src, tmp_path / "out")
    assert_one_line_error(rc, err, "not a flax-narrow one", "flax-narrow convert")
    assert listing(tmp_path) == ["hf"]


def test_export_verify_and_existing_destination(tmp_path, capsys):
    m = fn.BertForSequenceClassification.from_config(fn.EncoderConfig.tiny(num_labels=3), seed=5)
    m.save_pretrained(tmp_path / "flax")
    rc, out, err = run_cli(capsys, "export", tmp_path / "flax", tmp_path / "hf", "--verify")
    assert rc == 0, err
    line = next(x for x in out.splitlines() if x.startswith("verify:"))
    assert float(line.split("max abs diff ")[1].split()[0]) <= 1e-5
    rc, _, err = run_cli(capsys, "export", tmp_path / "flax", tmp_path / "hf")
    assert_one_line_error(rc, err, "already exists")


def _bort_done_criterion(tmp_path, capsys, hidden: int, vocab: int) -> float:
    """The issue's target: fp16 .bin with a stale decoder -> convert --verify -> export -> transformers."""
    from flax_narrow.convert.parity_demo import write_bort_like_checkpoint

    src = write_bort_like_checkpoint(str(tmp_path / "bort"), hidden=hidden, layers=4, vocab=vocab, seed=0)
    original = transformers.BertForMaskedLM.from_pretrained(src, dtype=torch.float32)
    original.cls.predictions.decoder.weight = original.bert.embeddings.word_embeddings.weight  # re-tie
    rc, out, err = run_cli(capsys, "convert", src, tmp_path / "flax", "--verify")
    assert rc == 0, err
    assert "untied MLM decoder copy differs" in out
    verified = float(next(x for x in out.splitlines() if x.startswith("verify:")).split("max abs diff ")[1].split()[0])
    assert verified <= 1e-4
    rc, out, err = run_cli(capsys, "export", tmp_path / "flax", tmp_path / "back")
    assert rc == 0, err
    assert "cls.predictions.decoder.weight" not in _keys(tmp_path / "back" / "model.safetensors")
    exported = transformers.BertForMaskedLM.from_pretrained(str(tmp_path / "back"))
    assert exported.cls.predictions.decoder.weight is exported.bert.embeddings.word_embeddings.weight
    ids = np.array([[0, 18077 % vocab, 4082, 7804 % vocab, 8606 % vocab, 2457, 2], [0, 20, 30, 40, 2, 1, 1]])
    batch = {"input_ids": ids, "attention_mask": (ids != 1).astype(np.int64)}
    ref = torch_run(original, batch).logits
    return max_diff(torch_run(exported, batch).logits.numpy(), ref, batch["attention_mask"])


def test_bort_like_fp16_bin_converts_verifies_exports(tmp_path, capsys):
    assert _bort_done_criterion(tmp_path, capsys, hidden=128, vocab=5000) <= 1e-4


@pytest.mark.slow
def test_full_size_bort_fp16_bin_converts_verifies_exports(tmp_path, capsys):
    diff = _bort_done_criterion(tmp_path, capsys, hidden=1024, vocab=50265)
    print(f"full-size BORT: transformers on the export vs the original (re-tied) logits: {diff:.2e}")
    assert diff <= 1e-4
