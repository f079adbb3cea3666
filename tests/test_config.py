import json

import pytest

from flax_narrow import ConfigError, EncoderConfig


def test_presets_have_the_published_shapes():
    bort = EncoderConfig.bort()
    assert (bort.hidden_size, bort.num_hidden_layers, bort.num_attention_heads, bort.intermediate_size) == (
        1024,
        4,
        8,
        768,
    )
    assert bort.head_dim == 128 and bort.layer_norm_eps == 1e-5 and bort.head_layer_norm_eps == 1e-12
    assert bort.vocab_size == 50265 and bort.pad_token_id == 1 and bort.type_vocab_size == 1
    large = EncoderConfig.bert_large()
    assert (large.hidden_size, large.num_hidden_layers, large.num_attention_heads) == (1024, 24, 16)
    rob = EncoderConfig.roberta_base()
    assert rob.position_offset == rob.pad_token_id + 1 == 2
    nb = EncoderConfig.narrowbert_base()
    assert nb.num_full_layers == 2 and nb.num_narrow_layers == 10 and nb.is_narrow
    assert not EncoderConfig.bert_base().is_narrow


def test_hf_config_round_trip():
    for cfg in (
        EncoderConfig.bert_base(),
        EncoderConfig.roberta_large(),
        EncoderConfig.narrowbert_base(),
        EncoderConfig.tiny(num_labels=3, label_names=("a", "b", "c")),
    ):
        hf = json.loads(json.dumps(cfg.to_hf_config()))
        assert EncoderConfig.from_hf_config(hf) == cfg


def test_from_hf_config_reads_amazon_bort_config():
    hf = {
        "architectures": ["BertForMaskedLM"],
        "attention_probs_dropout_prob": 0.1,
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.1,
        "hidden_size": 1024,
        "initializer_range": 0.02,
        "intermediate_size": 768,
        "layer_norm_eps": 1e-05,
        "max_position_embeddings": 512,
        "model_type": "bert",
        "num_attention_heads": 8,
        "num_hidden_layers": 4,
        "pad_token_id": 1,
        "tokenizer_class": "RobertaTokenizer",
        "type_vocab_size": 1,
        "vocab_size": 50265,
    }
    cfg = EncoderConfig.from_hf_config(hf)
    assert cfg == EncoderConfig.bort(mlm_head_layer_norm_eps=None)
    assert cfg.position_offset == 0  # BORT positions start at 0 although its pad id is 1


def test_from_transformers_objects():
    from transformers import BertConfig, RobertaConfig

    assert EncoderConfig.from_hf_config(BertConfig()) == EncoderConfig.bert_base()
    rob = EncoderConfig.from_hf_config(
        RobertaConfig(vocab_size=50265, max_position_embeddings=514, type_vocab_size=1, layer_norm_eps=1e-5)
    )
    assert rob.model_type == "roberta" and rob.position_offset == 2


@pytest.mark.parametrize(
    "field,value,needle",
    [
        ("hidden_size", 30, "not a multiple of num_attention_heads"),
        ("hidden_act", "swish2", "hidden_act"),
        ("full_length_layers", 13, "full_length_layers"),
        ("dtype", "int8", "float dtype"),
        ("dtype", "float99", "not a dtype"),
        ("pad_token_id", 40000, "pad_token_id"),
        ("hidden_dropout_prob", 1.5, "hidden_dropout_prob"),
    ],
)
def test_validation_names_the_field(field, value, needle):
    with pytest.raises(ConfigError, match=needle):
        EncoderConfig(**{field: value})


def test_unsupported_hf_configs_are_refused():
    with pytest.raises(ConfigError, match="position_embedding_type"):
        EncoderConfig.from_hf_config({"model_type": "bert", "position_embedding_type": "relative_key"})
    with pytest.raises(ConfigError, match="model_type 'gpt2'"):
        EncoderConfig.from_hf_config({"model_type": "gpt2"})
    with pytest.raises(ConfigError, match="no field"):
        EncoderConfig().replace(hiden_size=3)


def test_narrowbert_configs_both_layouts():
    authors = {"model_type": "bert", "num_hidden_layers": 12, "full_length_layers": 2}
    port = {"model_type": "narrow_bert", "num_hidden_layers": 12, "num_narrow_layers": 10}
    for d in (authors, port):
        cfg = EncoderConfig.from_hf_config(d)
        assert cfg.full_length_layers == 2 and cfg.model_type == "narrow_bert"


def test_config_is_hashable_for_jit():
    assert hash(EncoderConfig.tiny()) == hash(EncoderConfig.tiny())
