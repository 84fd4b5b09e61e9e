"""check_tokenizer: a run refuses a checkpoint trained with other token ids, and the line says what differs."""

from types import SimpleNamespace

import pytest

from lightning_mamba.data import BPETokenizer, ByteTokenizer, DataError
from lightning_mamba.training.checkpoint_io import check_tokenizer

TEXT = [f"the cat {i} sat on the mat, and the dog {i} lay by the door.\n" * 3 for i in range(30)]


def checkpoint(tokenizer) -> dict:
    return {"lightning_mamba": {"tokenizer": tokenizer.to_spec()}}


def test_the_same_tokenizer_passes():
    bpe = BPETokenizer.train(TEXT, 300)
    check_tokenizer(checkpoint(bpe), SimpleNamespace(tokenizer=BPETokenizer.train(TEXT, 300)), "last.ckpt")


def test_another_kind_of_tokenizer_names_both():
    with pytest.raises(DataError, match=r"trained with the tokenizer byte \(vocabulary 257\), but data.tokenizer gives "
                                        r"bpe-300"):
        check_tokenizer(checkpoint(ByteTokenizer()), SimpleNamespace(tokenizer=BPETokenizer.train(TEXT, 300)),
                        "last.ckpt")


def test_a_bpe_of_the_same_size_from_other_text_says_what_differs():
    """Both are bpe-300 of vocabulary 300: "bpe-300, but data.tokenizer gives bpe-300" said nothing useful."""
    theirs, mine = BPETokenizer.train(TEXT, 300), BPETokenizer.train([t.upper() for t in TEXT], 300)
    assert (theirs.name, theirs.vocab_size) == (mine.name, mine.vocab_size)
    with pytest.raises(DataError) as e:
        check_tokenizer(checkpoint(theirs), SimpleNamespace(tokenizer=mine), "last.ckpt")
    message = str(e.value)
    assert "another bpe-300 tokenizer" in message and "a BPE trained on other text" in message
    assert "set data.source" in message and "\n" not in message
