"""What the command tests share: a tiny exported checkpoint (byte tokenizer) and a held-out text file."""

import pytest

from lightning_mamba.data.tokenization import ByteTokenizer
from lightning_mamba.models.checkpoint import save_pretrained
from tests.tiny import tiny_lm


@pytest.fixture
def checkpoint(tmp_path):
    path = tmp_path / "model"
    save_pretrained(tiny_lm(vocab_size=257), str(path), tokenizer_spec=ByteTokenizer().to_spec())
    text = tmp_path / "held_out.txt"
    text.write_text("To be, or not to be, that is the question. " * 40)
    return path, text
