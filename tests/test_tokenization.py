"""load_tokenizer on tokenizers trained offline with the `tokenizers` library."""

import os

import pytest

from flax_narrow import CheckpointError, load_tokenizer

CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "narrow layers attend from selected rows to every token",
    "bort is a small bert found by architecture search",
] * 20


@pytest.fixture(scope="module")
def wordpiece_dir(tmp_path_factory):
    from tokenizers import BertWordPieceTokenizer

    d = tmp_path_factory.mktemp("wordpiece")
    tok = BertWordPieceTokenizer(lowercase=True)
    tok.train_from_iterator(CORPUS, vocab_size=200, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
    tok.save_model(str(d))  # vocab.txt only
    return d


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory):
    from tokenizers import ByteLevelBPETokenizer

    d = tmp_path_factory.mktemp("bpe")
    tok = ByteLevelBPETokenizer()
    tok.train_from_iterator(CORPUS, vocab_size=300, special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
    tok.save_model(str(d))  # vocab.json + merges.txt
    return d


def test_wordpiece_from_vocab_txt_and_saved_dir(wordpiece_dir, tmp_path):
    tok = load_tokenizer(wordpiece_dir)
    assert tok.is_fast and type(tok).__name__.startswith("BertTokenizer")
    assert len(tok) == len(open(wordpiece_dir / "vocab.txt").read().splitlines())
    enc = tok("The quick fox", "lazy dog")
    assert enc["input_ids"][0] == tok.cls_token_id and enc["input_ids"].count(tok.sep_token_id) == 2
    assert set(enc["token_type_ids"]) == {0, 1}
    assert tok.decode(enc["input_ids"], skip_special_tokens=True) == "the quick fox lazy dog"
    tok.save_pretrained(tmp_path / "saved")
    again = load_tokenizer(tmp_path / "saved")
    assert again("The quick fox")["input_ids"] == tok("The quick fox")["input_ids"]


def test_byte_level_bpe_like_bort(bpe_dir, tmp_path):
    tok = load_tokenizer(bpe_dir)
    assert tok.is_fast and type(tok).__name__.startswith("RobertaTokenizer") and len(tok) == 300
    ids = tok("the lazy dog")["input_ids"]
    assert ids[0] == tok.convert_tokens_to_ids("<s>") == 0 and ids[-1] == tok.convert_tokens_to_ids("</s>") == 2
    assert tok.pad_token_id == 1 and tok.mask_token == "<mask>"
    assert tok.decode(ids, skip_special_tokens=True) == "the lazy dog"
    assert len(ids) < len("the lazy dog")  # merges were applied: not a character-level fallback
    tok.save_pretrained(tmp_path / "saved")
    assert load_tokenizer(tmp_path / "saved")("the lazy dog")["input_ids"] == ids


def test_missing_tokenizer_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="no tokenizer files"):
        load_tokenizer(tmp_path)
    with pytest.raises(CheckpointError, match="no such directory"):
        load_tokenizer(os.path.join(str(tmp_path), "missing"))
