"""``from_pretrained`` and ``flax-narrow convert`` open checkpoints through one reader path
(``sources.open_source`` -> ``keymap`` -> ``loading``): every input kind that one accepts, the other accepts too,
and both read the same numbers from it."""

import json
import os

import numpy as np
import pytest
import torch
import transformers

import flax_narrow as fn
from conftest import save_torch_model, tiny_hf_config
from convert_helpers import hf_to_gluon_name, write_params

KINDS = [
    "hf-safetensors",
    "hf-sharded",
    "hf-bin",
    "weights-file",
    "flax-save_pretrained",
    "flax-converted",
    "flax-hf-config",
    "gluonnlp-file",
    "gluonnlp-dir",
    "hub-id",
]
# BORT's head dim is 128, so a GluonNLP file's head count can be inferred from hidden 128 (one head).
GLUON = dict(vocab_size=50, hidden_size=128, num_hidden_layers=1, num_attention_heads=1, intermediate_size=96)
GLUON.update(max_position_embeddings=32, type_vocab_size=1, layer_norm_eps=1e-5, pad_token_id=1)


@pytest.fixture(scope="module")
def mlm_torch():
    torch.manual_seed(0)
    return transformers.BertForMaskedLM(tiny_hf_config()).eval()


def _gluon_params(path) -> str:
    torch.manual_seed(1)
    model = transformers.BertForMaskedLM(transformers.BertConfig(**GLUON)).eval()
    arrays = {}
    for key, value in model.state_dict().items():
        name = hf_to_gluon_name(key)
        if name is not None:
            arrays[name] = value.numpy()
    arrays["decoder.3.weight"] = arrays["word_embed.0.weight"]
    return write_params(path, arrays)


def _source(kind: str, tmp_path, mlm_torch, monkeypatch) -> tuple[str, str | None]:
    """(SRC as a user would pass it, a --config JSON path or None)."""
    d = tmp_path / kind
    if kind == "hf-safetensors":
        return save_torch_model(mlm_torch, d), None
    if kind == "hf-sharded":
        src = save_torch_model(mlm_torch, d, max_shard_size="20KB")
        assert os.path.isfile(os.path.join(src, "model.safetensors.index.json"))
        return src, None
    if kind == "hf-bin":
        return save_torch_model(mlm_torch, d, fmt="bin"), None
    if kind == "weights-file":
        save_torch_model(mlm_torch, d)
        weights = tmp_path / "weights.safetensors"
        os.rename(d / "model.safetensors", weights)
        config = tmp_path / "config-for-weights.json"
        tiny_hf_config().to_json_file(config)
        return str(weights), str(config)
    if kind == "flax-save_pretrained":
        return fn.BertForMaskedLM.from_pretrained(save_torch_model(mlm_torch, tmp_path / "hf")).save_pretrained(d), None
    if kind == "flax-converted":
        assert _capsys_free_run("convert", save_torch_model(mlm_torch, tmp_path / "hf"), d) == 0
        return str(d), None
    if kind == "flax-hf-config":  # flax weights beside an HF-only config.json (no flax_narrow block)
        fn.BertForMaskedLM.from_pretrained(save_torch_model(mlm_torch, tmp_path / "hf")).save_pretrained(d)
        raw = json.loads((d / "config.json").read_text())
        raw.pop("flax_narrow")
        (d / "config.json").write_text(json.dumps(raw))
        return str(d), None
    if kind == "gluonnlp-file":
        return _gluon_params(tmp_path / "bort.params"), None
    if kind == "gluonnlp-dir":
        d.mkdir()
        _gluon_params(d / "bort.params")
        return str(d), None
    if kind == "hub-id":  # a hub id, mapped to a local directory in place of the network
        import huggingface_hub

        local = save_torch_model(mlm_torch, d)

        def snapshot_download(repo_id, **kw):
            if repo_id != "org/tiny-bert":
                raise OSError(f"offline: {repo_id}")
            return local

        monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
        return "org/tiny-bert", None
    raise AssertionError(kind)


def _capsys_free_run(*args):
    from flax_narrow.cli import main

    return main([str(a) for a in args])


@pytest.mark.parametrize("kind", KINDS)
def test_from_pretrained_and_convert_accept_the_same_inputs(tmp_path, mlm_torch, monkeypatch, kind, caplog):
    src, config = _source(kind, tmp_path, mlm_torch, monkeypatch)
    loaded = fn.BertForMaskedLM.from_pretrained(
        src, config=None if config is None else fn.EncoderConfig.from_hf_config(config)
    )
    dst = tmp_path / "converted"
    assert _capsys_free_run("convert", src, dst, *(("--config", config) if config else ())) == 0
    again = fn.BertForMaskedLM.from_pretrained(dst)
    cfg = loaded.config
    ids = np.array([[2, 5, 6, 7, 3, 0], [2, 8, 9, 3, 0, 0]]) % cfg.vocab_size
    mask = (ids != 0).astype(np.int32)
    a = np.asarray(loaded(ids, mask).logits)
    b = np.asarray(again(ids, mask).logits)
    np.testing.assert_array_equal(a, b)
    assert a.shape == (2, 6, cfg.vocab_size)
