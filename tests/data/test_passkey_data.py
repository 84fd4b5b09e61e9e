"""The passkey generator (any tokenizer, exact lengths, depth, determinism, bad input) and the training mix."""

import numpy as np
import pytest
import torch

from lightning_mamba.data.packed import PackedTextDataset
from lightning_mamba.data.passkey import (
    PasskeyDataModule,
    PasskeyError,
    PasskeyGenerator,
    PasskeyMixDataset,
    PasskeyTemplate,
    default_depths,
    grid_samples,
    passkey_grid,
)
from lightning_mamba.data.tokenization import BPETokenizer, ByteTokenizer

NEEDLE = "The passkey is {key}. Remember it. {key} is the passkey.\n"


@pytest.fixture(scope="module")
def bpe(request):
    docs = request.getfixturevalue("sample_documents")
    return BPETokenizer.train(docs, 600)


@pytest.fixture(params=["byte", "bpe"])
def tokenizer(request):
    return ByteTokenizer() if request.param == "byte" else request.getfixturevalue("bpe")


def test_prompts_have_exact_length_one_needle_at_depth(tokenizer):
    gen = PasskeyGenerator(tokenizer)
    assert gen.canonical  # the pieces' encodings joined = the tokenizer's encoding of the text
    f = len(gen.filler_ids)
    rng = np.random.default_rng(0)
    for length in (gen.min_length, gen.min_length + 7, 500, 1234, 5000):
        for depth in (0.0, 0.1, 0.25, 0.5, 0.9, 1.0):
            s = gen.sample(length, depth, rng)
            assert len(s.input_ids) == length and s.length == length  # exact, in tokens
            text = tokenizer.decode(s.input_ids)
            needle = NEEDLE.replace("{key}", s.key)
            assert text.count(needle) == 1 and text.count(s.key) == 2  # the key only in the needle
            assert text.startswith(gen.template.instruction) and text.endswith(gen.template.question)
            assert tokenizer.decode(s.input_ids[s.needle_start:s.needle_start + s.needle_len]) == needle
            assert tokenizer.encode(text) == s.input_ids.tolist()  # canonical, the cut filler line included
            # the answer is the key's tokens in context: prompt + answer encodes to prompt tokens + answer tokens
            assert tokenizer.encode(text + " " + s.key) == s.tokens.tolist()
            assert tokenizer.decode(s.answer_ids) == " " + s.key
            filler = s.haystack_end - s.haystack_start - s.needle_len
            if filler >= 4 * f:
                assert abs(s.actual_depth - depth) <= (f / 2 + 1) / filler  # within half a filler line
            if depth in (0.0, 1.0) and filler:
                assert s.actual_depth == depth


def test_keys_are_seeded_five_digits_with_leading_zeros(tokenizer):
    gen = PasskeyGenerator(tokenizer)
    a = grid_samples(gen, 300, 0.5, 40, seed=1)
    b = grid_samples(gen, 300, 0.5, 40, seed=1)
    c = grid_samples(gen, 300, 0.5, 40, seed=2)
    assert [s.key for s in a] == [s.key for s in b] and all((x.tokens == y.tokens).all() for x, y in zip(a, b))
    assert [s.key for s in a] != [s.key for s in c]
    keys = [s.key for s in a + c]
    assert all(len(k) == 5 and k.isdigit() for k in keys) and any(k[0] == "0" for k in keys)
    assert len(set(keys)) > 70
    cells = list(passkey_grid(gen, [300, 400], default_depths(3), 2, seed=1))
    assert [(li, di) for li, di, _ in cells] == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]
    assert cells[2][2][0].key == grid_samples(gen, 300, 5 / 6, 2, seed=1)[0].key  # a cell's keys: its own seed
    assert default_depths(4) == [0.125, 0.375, 0.625, 0.875]


def one_line_error(fn, *words):
    with pytest.raises(PasskeyError) as e:
        fn()
    assert isinstance(e.value, ValueError) and "\n" not in str(e.value)
    for w in words:
        assert w in str(e.value)


def test_bad_input_says_what_to_change(bpe):
    gen = PasskeyGenerator(bpe)
    one_line_error(lambda: gen.make(gen.min_length - 1, 0.5, "12345"), "shorter than the template",
                   f">= {gen.min_length}")
    one_line_error(lambda: list(passkey_grid(gen, [10, 500], [0.5], 1)), "[10]", "shorter than the template")
    for depth in (-0.1, 1.5):
        one_line_error(lambda: gen.make(500, depth, "12345"), "outside [0, 1]")
    for key in ("12a45", "1234", "123456", 12345, "１２３４５"):
        one_line_error(lambda: gen.make(500, 0.5, key), "5 ASCII digits")
    one_line_error(lambda: PasskeyTemplate(needle="The passkey is here."), "{key}")
    one_line_error(lambda: PasskeyGenerator(bpe, PasskeyTemplate(question="What is the passkey? Th",
                                                                 answer="e passkey is {key}")), "prefix")
    one_line_error(lambda: list(passkey_grid(gen, [500], [0.5], 0)), "samples per cell")


def test_custom_template_and_digits(tokenizer):
    template = PasskeyTemplate(  # the official code's wording
        instruction="There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
                    "I will quiz you about the important information there.\n",
        needle="The pass key is {key}. Remember it. {key} is the pass key.\n",
        question="What is the pass key? The pass key is")
    gen = PasskeyGenerator(tokenizer, template, digits=7)
    s = gen.sample(800, 0.3, np.random.default_rng(3))
    assert len(s.key) == 7 and len(s.input_ids) == 800
    assert "The pass key is " + s.key in tokenizer.decode(s.input_ids)


# ---- training mode --------------------------------------------------------------------------------------
def text_stream(n=20_000, seed=0):
    return np.random.default_rng(seed).integers(0, 256, n).astype(np.int64)


@pytest.mark.parametrize("loss_on", ["answer", "all"])
def test_mix_dataset_shapes_labels_and_ratio(loss_on):
    tok, seq_len = ByteTokenizer(), 256
    text = PackedTextDataset(text_stream(), seq_len)
    mix = PasskeyMixDataset(text, PasskeyGenerator(tok), ratio=0.3, loss_on=loss_on, seed=0)
    instruction = tok.encode(PasskeyTemplate().instruction)
    n_passkey = 0
    for i in range(len(mix)):
        s = mix[i]
        assert s["input_ids"].shape == s["labels"].shape == (seq_len,)
        is_passkey = s["input_ids"][:len(instruction)].tolist() == instruction
        if not is_passkey:
            assert torch.equal(s["input_ids"], text[i]["input_ids"]) and torch.equal(s["labels"], text[i]["labels"])
            continue
        n_passkey += 1
        text_i = tok.decode(s["input_ids"].tolist())
        key = text_i.split("The passkey is ")[1][:5]
        q = text_i.index("The passkey is", text_i.index("What is the passkey?"))
        if loss_on == "answer":
            kept = s["labels"][s["labels"] != -100]
            assert tok.decode(kept.tolist()) == " " + key  # loss on the answer tokens only
            first = int((s["labels"] != -100).nonzero()[0])
            assert first == q + len("The passkey is") - 1  # label j is token j + 1
        else:
            assert (s["labels"] != -100).all() and torch.equal(s["labels"][:-1], s["input_ids"][1:])
            full = tok.decode(s["input_ids"].tolist() + [s["labels"][-1].item()])
            assert full[q:].startswith(f"The passkey is {key}")
    assert 0.15 < n_passkey / len(mix) < 0.45
    assert torch.equal(mix[5]["input_ids"], mix[5]["input_ids"])  # the same sample every time


def test_mix_dataset_rejects_too_short_seq_len():
    text = PackedTextDataset(text_stream(), 128)
    one_line_error(lambda: PasskeyMixDataset(text, PasskeyGenerator(ByteTokenizer()), 0.5), "data.seq_len=128")
    one_line_error(lambda: PasskeyMixDataset(text, PasskeyGenerator(ByteTokenizer()), 1.5), "passkey_ratio")
    PasskeyMixDataset(text, PasskeyGenerator(ByteTokenizer()), 0.0)  # no passkey samples: any seq_len


def test_datamodule_mixes_batches_and_keeps_text_validation(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for d in range(6):
        (corpus / f"doc{d}.txt").write_text("".join(f"{d} line {i}: the cat sat on the mat.\n" for i in range(60)))
    dm = PasskeyDataModule(passkey_ratio=1.0, passkey_loss="answer", source=str(corpus), tokenizer="byte",
                           seq_len=256, batch_size=4, val_fraction=0.2, cache_dir=str(tmp_path / "cache"))
    assert dm.vocab_size_for_model == 257 and dm.eos_id == 256 and dm.hparams.seq_len == 256
    assert dm.hparams.passkey_template["needle"] == NEEDLE  # plain data in hparams
    dm.prepare_data()
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape == batch["labels"].shape == (4, 256)
    assert ((batch["labels"] != -100).sum(1) == 6).all()  # " " + 5 digits per row, nothing else
    val = next(iter(dm.val_dataloader()))
    assert (val["labels"] != -100).all()  # validation: held-out text as TextDataModule's
    cells = list(dm.eval_grid([300, 600], [0.5], 2))
    assert len(cells) == 2 and all(len(s.input_ids) == n for (_, _, ss), n in zip(cells, (300, 600)) for s in ss)
    with pytest.raises(PasskeyError, match="passkey_loss"):
        PasskeyDataModule(passkey_loss="digits", source=str(corpus), tokenizer="byte")
