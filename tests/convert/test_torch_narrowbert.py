"""The PyTorch NarrowBERT in the library (``flax_narrow.convert.torch_narrowbert``): its loader reads both
HF layouts strictly, and ``convert``/``export --verify`` compare NarrowBERT with it on the selected rows."""

import os
import subprocess
import sys

import pytest
import torch

import flax_narrow as fn
from convert_helpers import assert_one_line_error, listing, run_cli
from flax_narrow.convert import keymap
from flax_narrow.convert.torch_narrowbert import (
    TorchNarrowBertForMaskedLM,
    TorchNarrowBertForSequenceClassification,
    TorchNarrowBertModel,
    load_torch_narrowbert,
)
from flax_narrow.convert.verify import random_batch, random_narrow_mask, verify_against_torch
from flax_narrow.errors import CheckpointError

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "modeling"))
from narrow_reference import TINY_NARROW, randomize, save_authors_checkpoint, save_port_checkpoint  # noqa: E402

CFG = TINY_NARROW


def _verify_diff(out: str) -> float:
    line = next(x for x in out.splitlines() if x.startswith("verify:"))
    assert "the PyTorch NarrowBERT" in line, line
    return float(line.split("max abs diff ")[1].split()[0])


@pytest.fixture(scope="module")
def mlm_ref():
    return randomize(TorchNarrowBertForMaskedLM(CFG), seed=0)


def test_import_flax_narrow_does_not_import_torch():
    code = "import sys, flax_narrow, flax_narrow.convert, flax_narrow.convert.verify; print('torch' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert r.stdout.strip() == "False"


@pytest.mark.parametrize("layout", ["authors", "port"])
def test_loader_reads_both_layouts_exactly(tmp_path, mlm_ref, layout):
    save = save_authors_checkpoint if layout == "authors" else save_port_checkpoint
    d = save(mlm_ref, tmp_path / layout, CFG, "NarrowBertForMaskedLM")
    loaded = load_torch_narrowbert(d)
    assert isinstance(loaded, TorchNarrowBertForMaskedLM) and not loaded.training
    theirs = mlm_ref.state_dict()
    assert sorted(loaded.state_dict()) == sorted(theirs)
    for k, v in theirs.items():
        assert torch.equal(loaded.state_dict()[k], v), k
    # the base model from the MLM checkpoint: the head is dropped, no pooler is invented
    base = load_torch_narrowbert(d, "NarrowBertModel")
    assert isinstance(base, TorchNarrowBertModel) and base.pooler is None
    assert torch.equal(
        base.encoder_narrow["layer"][1]["output"]["dense"].weight,
        mlm_ref.bert.encoder_narrow["layer"][1]["output"]["dense"].weight,
    )


def test_loader_refuses_missing_heads_and_pickled_code(tmp_path, mlm_ref):
    d = save_authors_checkpoint(mlm_ref, tmp_path / "mlm", CFG, "NarrowBertForMaskedLM")
    with pytest.raises(CheckpointError, match=r"missing keys \['bert.pooler.dense.bias', 'bert.pooler.dense.weight'"):
        load_torch_narrowbert(d, "NarrowBertForSequenceClassification")

    class Evil:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text((tmp_path / "mlm" / "config.json").read_text())
    torch.save({"bert.embeddings.word_embeddings.weight": Evil()}, bad / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="weights_only=True"):
        load_torch_narrowbert(bad)
    assert not (tmp_path / "pwned").exists()


def test_convert_verify_on_an_authors_checkpoint(tmp_path, capsys, mlm_ref):
    """The acceptance check: ``flax-narrow convert SRC DST --verify`` on a tiny authors'-layout NarrowBERT."""
    src = save_authors_checkpoint(mlm_ref, tmp_path / "authors", CFG, "NarrowBertForMaskedLM")
    rc, out, err = run_cli(capsys, "convert", src, tmp_path / "flax", "--verify")
    assert rc == 0, err
    assert "architecture: NarrowBertForMaskedLM" in out and "on the source checkpoint" in out
    assert _verify_diff(out) <= 1e-5


def test_verify_catches_a_wrong_narrow_layer_map(tmp_path, capsys, mlm_ref, monkeypatch):
    """The check can fail: a key map that swaps the two narrow layers is caught, and nothing is written."""
    src = save_port_checkpoint(mlm_ref, tmp_path / "port", CFG, "NarrowBertForMaskedLM")
    real = keymap.canonical_source_key

    def swapped(key, full_length_layers):
        for a, b in (
            (".encoder_narrow.layer.0.", ".encoder_narrow.layer.X."),
            (".encoder_narrow.layer.1.", ".encoder_narrow.layer.0."),
            (".encoder_narrow.layer.X.", ".encoder_narrow.layer.1."),
        ):
            key = key.replace(a, b)
        return real(key, full_length_layers)

    monkeypatch.setattr(keymap, "canonical_source_key", swapped)
    rc, _, err = run_cli(capsys, "convert", src, tmp_path / "flax", "--verify")
    assert_one_line_error(rc, err, "verification failed", "nothing was written")
    assert listing(tmp_path) == ["port"]


def test_sequence_classification_verify_and_export_verify(tmp_path, capsys):
    ref = randomize(TorchNarrowBertForSequenceClassification(CFG, 3), seed=1)
    src = save_port_checkpoint(ref, tmp_path / "port", CFG, "NarrowBertForSequenceClassification", num_labels=3)
    rc, out, err = run_cli(capsys, "convert", src, tmp_path / "flax", "--verify")
    assert rc == 0, err
    assert "logits (2, 3)" in out and _verify_diff(out) <= 1e-5
    rc, out, err = run_cli(capsys, "export", tmp_path / "flax", tmp_path / "hf", "--verify")
    assert rc == 0, err
    assert _verify_diff(out) <= 1e-5


def test_verify_against_torch_on_chosen_rows(tmp_path, mlm_ref):
    src = save_authors_checkpoint(mlm_ref, tmp_path / "authors", CFG, "NarrowBertForMaskedLM")
    model = fn.NarrowBertForMaskedLM.from_pretrained(src)
    batch = random_batch(model.config, batch=3, length=12, seed=1)
    sel = random_narrow_mask(batch["attention_mask"], seed=2)
    assert sel.any(axis=1).all() and not (sel & (batch["attention_mask"] == 0)).any()
    v = verify_against_torch(model, src, batch, narrow_mask=sel)
    assert v.output == "logits" and v.shape == (3, int(sel.sum(1).max()), CFG["vocab_size"])
    assert v.max_abs_diff <= 1e-5
    base = fn.NarrowBertModel.from_pretrained(src)
    v = verify_against_torch(base, src, batch, narrow_mask=sel)
    assert v.output == "last_hidden_state" and v.max_abs_diff <= 1e-5
