"""The GluonNLP/MXNet `bort.params` reader, on files the tests write in the documented binary layout."""

import json

import numpy as np
import pytest
import torch
import transformers

import flax_narrow as fn
from conftest import max_diff, torch_run
from convert_helpers import hf_to_gluon_name, run_cli, write_params
from flax_narrow.convert import gluonnlp
from flax_narrow.convert.sources import open_source
from flax_narrow.errors import CheckpointError, ConfigError

# BORT's proportions, tiny: hidden 256 = 2 heads of BORT's head dim 128 (so the head count can be inferred).
SHAPE = dict(
    vocab_size=100,
    hidden_size=256,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=192,
    max_position_embeddings=64,
    type_vocab_size=1,
    layer_norm_eps=1e-5,
    pad_token_id=1,
)


@pytest.fixture(scope="module")
def bort_torch():
    """A transformers BertForMaskedLM standing in for BORT; its token-type row is zero (GluonNLP has none)."""
    torch.manual_seed(0)
    model = transformers.BertForMaskedLM(transformers.BertConfig(**SHAPE)).eval()
    with torch.no_grad():
        model.bert.embeddings.token_type_embeddings.weight.zero_()
        for name, p in model.named_parameters():  # LayerNorms away from (1, 0), so a swapped gamma/beta shows
            if "LayerNorm" in name:
                p.add_(torch.randn_like(p) * 0.1)
        model.cls.predictions.bias.normal_()
    model.cls.predictions.transform.LayerNorm.eps = 1e-12  # GluonNLP's MLM-head LayerNorm eps
    return model


def _gluon_arrays(model, dtype=np.float32) -> dict[str, np.ndarray]:
    arrays = {}
    for key, value in model.state_dict().items():
        name = hf_to_gluon_name(key)
        if name is not None:
            arrays[name] = value.numpy().astype(dtype)
    arrays["decoder.3.weight"] = arrays["word_embed.0.weight"]  # GluonNLP saves the shared weight twice
    return arrays


@pytest.fixture
def params_file(tmp_path, bort_torch):
    return write_params(tmp_path / "bort.params", _gluon_arrays(bort_torch))


def _batch():
    ids = np.array([[0, 17, 23, 45, 67, 2, 1, 1], [0, 88, 12, 2, 1, 1, 1, 1]], np.int64)
    return {"input_ids": ids, "attention_mask": (ids != 1).astype(np.int64)}


def test_reader_parses_the_documented_layout(tmp_path, bort_torch):
    arrays = _gluon_arrays(bort_torch, np.float16)
    src = gluonnlp.GluonParamsSource(write_params(tmp_path / "x.params", arrays))
    assert src.ndim_width == 4
    assert sorted(src.keys()) == sorted(arrays)
    for name, a in arrays.items():
        assert src.shape(name) == a.shape and src.dtype(name) == "float16"
        np.testing.assert_array_equal(src.get(name), a)
    np.testing.assert_array_equal(src.get_rows("word_embed.0.weight", 3, 7), arrays["word_embed.0.weight"][3:7])


def test_reader_falls_back_to_8_byte_ndim(tmp_path, bort_torch):
    arrays = _gluon_arrays(bort_torch)
    src = gluonnlp.GluonParamsSource(write_params(tmp_path / "x.params", arrays, ndim_width=8))
    assert src.ndim_width == 8
    np.testing.assert_array_equal(src.get("encoder.position_weight"), arrays["encoder.position_weight"])


def test_name_table_covers_the_spec(bort_torch):
    for key in bort_torch.state_dict():
        name = hf_to_gluon_name(key)
        if name is not None:
            assert gluonnlp.gluon_to_hf_key(name) == key
    assert gluonnlp.gluon_to_hf_key("decoder.3.weight") == "cls.predictions.decoder.weight"
    assert gluonnlp.gluon_to_hf_key("encoder.transformer_cells.0.attention_cell.mystery") is None


def test_config_is_inferred_from_shapes(params_file):
    opened = open_source(params_file)
    cfg = opened.config
    opened.close()
    expected = fn.EncoderConfig(**{**SHAPE, "type_vocab_size": 0, "mlm_head_layer_norm_eps": 1e-12})
    assert cfg == expected


def test_convert_params_matches_pytorch(tmp_path, capsys, params_file, bort_torch):
    dst = tmp_path / "flax"
    rc, out, err = run_cli(capsys, "convert", params_file, dst, "--verify")
    assert rc == 0, err
    assert "GluonNLP/MXNet .params" in out and "inferred from the weights' shapes" in out
    assert "max abs diff" in out  # verified against transformers on an HF export
    batch = _batch()
    model = fn.BortForMaskedLM.from_pretrained(dst)
    assert model.config.type_vocab_size == 0
    ref = torch_run(bort_torch, batch).logits
    assert max_diff(model(**batch).logits, ref, batch["attention_mask"]) <= 1e-4
    # the export carries a zero token-type row, and transformers reproduces the logits
    rc, out, err = run_cli(capsys, "export", dst, tmp_path / "hf")
    assert rc == 0, err
    back = transformers.BertForMaskedLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32)
    back.cls.predictions.transform.LayerNorm.eps = 1e-12  # transformers has one eps for every LayerNorm
    assert max_diff(torch_run(back, batch).logits, ref, batch["attention_mask"]) <= 1e-4


def test_explicit_config_and_contradiction(tmp_path, capsys, params_file):
    cfg = fn.EncoderConfig(**{**SHAPE, "type_vocab_size": 0, "num_attention_heads": 4})
    good = tmp_path / "good.json"
    good.write_text(json.dumps(cfg.to_dict()))
    rc, out, err = run_cli(capsys, "convert", params_file, tmp_path / "four-heads", "--config", good)
    assert rc == 0, err
    assert fn.BertForMaskedLM.from_pretrained(tmp_path / "four-heads").config.num_attention_heads == 4
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(cfg.replace(intermediate_size=100).to_dict()))
    rc, _, err = run_cli(capsys, "convert", params_file, tmp_path / "bad", "--config", bad)
    assert rc == 2 and "intermediate_size=100" in err and not (tmp_path / "bad").exists()


def test_structural_errors(tmp_path):
    name = "word_embed.0.weight"
    path = write_params(tmp_path / "x.params", {name: np.zeros((4, 128), np.float32)})
    data = open(path, "rb").read()
    names_at = len(data) - 8 - 8 - len(name)  # uint64 name count, uint64 length, bytes
    with open(path, "wb") as fh:
        fh.write(data[:names_at] + (2).to_bytes(8, "little") + data[names_at + 8 :])
    with pytest.raises(CheckpointError, match="1 arrays but 2 names"):
        gluonnlp.GluonParamsSource(path)
    with open(path, "wb") as fh:
        fh.write(data + b"extra")
    with pytest.raises(CheckpointError, match="5 unexpected bytes"):
        gluonnlp.GluonParamsSource(path)
    with pytest.raises(ConfigError, match="no transformer cells"):
        gluonnlp.infer_config({"bert.embeddings.word_embeddings.weight": (4, 128)}, "x.params")
    with pytest.raises(ConfigError, match="pass --config with num_attention_heads"):
        gluonnlp.infer_config(
            {
                "bert.embeddings.word_embeddings.weight": (4, 100),
                "bert.encoder.layer.0.intermediate.dense.weight": (50, 100),
            },
            "x.params",
        )
