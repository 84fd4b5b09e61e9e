import os

import pytest
import tokenizers
from tokenizers import models, pre_tokenizers

from lightning_mamba.data import (
    BPETokenizer,
    ByteTokenizer,
    DataError,
    FileTokenizer,
    build_tokenizer,
    load_tokenizer,
    tokenizer_from_spec,
)
from lightning_mamba.data.tokenization import EOS

TEXT = "To be, or not to be: that is the question.\nCafé — 日本語 ✓\t\n"


@pytest.fixture(scope="module")
def bpe(sample_documents):
    return BPETokenizer.train(sample_documents, vocab_size=1024)


def test_byte_round_trip_including_non_ascii():
    tok = ByteTokenizer()
    ids = tok.encode(TEXT)
    assert ids == list(TEXT.encode("utf-8")) and max(ids) < 256
    assert tok.decode(ids) == TEXT
    assert (tok.vocab_size, tok.eos_id) == (257, 256)
    assert tok.decode(ids + [tok.eos_id] + tok.encode("next")) == TEXT + EOS + "next"


def test_byte_tokenizer_saves_an_equivalent_tokenizer_json(tmp_path):
    path = str(tmp_path / "byte.json")
    ByteTokenizer().save(path)
    loaded = FileTokenizer(path)
    assert (loaded.vocab_size, loaded.eos_id) == (257, 256)
    assert loaded.encode(TEXT) == ByteTokenizer().encode(TEXT)
    assert loaded.decode(loaded.encode(TEXT)) == TEXT


def test_bpe_trains_and_round_trips(bpe, sample_documents):
    assert bpe.vocab_size <= 1024 and bpe.eos_id == bpe.hf.token_to_id(EOS)
    doc = sample_documents[0][:3000]
    ids = bpe.encode(doc)
    assert len(ids) < len(doc.encode()) / 2  # it compresses English
    assert bpe.decode(ids) == doc
    assert bpe.decode(bpe.encode(TEXT)) == TEXT  # unseen characters fall back to bytes
    assert bpe.encode_batch([doc, TEXT]) == [ids, bpe.encode(TEXT)]
    assert bpe.eos_id not in bpe.encode(doc + EOS)  # EOS is only ever appended, never read from text


def test_bpe_vocab_must_hold_the_bytes():
    with pytest.raises(DataError, match="data.vocab_size must be >= 257"):
        BPETokenizer.train(["some text"], vocab_size=200)


def test_bpe_is_cached_and_reused(tmp_path, sample_documents):
    calls = []

    def train_docs():
        calls.append(1)
        return sample_documents[:5]

    first = build_tokenizer("bpe", 512, train_docs, cache_dir=str(tmp_path), cache_key="corpus-a")
    again = build_tokenizer("bpe", 512, train_docs, cache_dir=str(tmp_path), cache_key="corpus-a")
    assert len(calls) == 1 and again.fingerprint == first.fingerprint
    build_tokenizer("bpe", 512, train_docs, cache_dir=str(tmp_path), cache_key="corpus-b")  # other documents
    assert len(calls) == 2
    # a damaged file is retrained over, not used
    for name in os.listdir(tmp_path):
        (tmp_path / name).write_text('{"not": "a tokenizer"')
    build_tokenizer("bpe", 512, train_docs, cache_dir=str(tmp_path), cache_key="corpus-a")
    assert len(calls) == 3
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]


def test_saved_bpe_loads_from_its_path(bpe, tmp_path):
    path = str(tmp_path / "tokenizer.json")
    bpe.save(path)
    loaded = build_tokenizer(path)
    assert isinstance(loaded, FileTokenizer)
    assert (loaded.vocab_size, loaded.eos_id) == (bpe.vocab_size, bpe.eos_id)
    assert loaded.encode(TEXT) == bpe.encode(TEXT)


def test_specs_round_trip(bpe):
    for tok in (ByteTokenizer(), bpe):
        back = tokenizer_from_spec(tok.to_spec())
        assert back.encode(TEXT) == tok.encode(TEXT) and back.eos_id == tok.eos_id
        assert back.fingerprint == tok.fingerprint


def test_tokenizer_json_without_eos_is_rejected(tmp_path):
    hf = tokenizers.Tokenizer(models.WordLevel({"hello": 0, "[UNK]": 1}, unk_token="[UNK]"))
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    path = str(tmp_path / "no_eos.json")
    hf.save(path)
    with pytest.raises(DataError, match="no end-of-document token"):
        FileTokenizer(path)


def test_bad_specs_say_what_is_accepted(tmp_path):
    with pytest.raises(DataError, match="unknown tokenizer 'gpt2': use 'byte', 'bpe' or a path to a tokenizer.json"):
        build_tokenizer("gpt2")
    with pytest.raises(DataError, match="does not exist"):
        load_tokenizer(str(tmp_path / "missing.json"))
    (tmp_path / "junk.json").write_text("[1, 2")
    with pytest.raises(DataError, match="cannot be loaded"):
        load_tokenizer(str(tmp_path / "junk.json"))
    assert isinstance(load_tokenizer("byte"), ByteTokenizer)
