"""The code-form passkey template (configs/passkey/code.yaml): a constant defined early, asked for at the end,
for models trained on Python source; it loads from YAML, makes exact-length prompts under the byte tokenizer and
is refused with one line when malformed."""

import os

import numpy as np
import pytest

from lightning_mamba.data.passkey import PasskeyError, PasskeyGenerator, load_template
from lightning_mamba.data.tokenization import load_tokenizer
from lightning_mamba.study.sweep import Study, SweepError

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CODE = os.path.join(ROOT, "configs", "passkey", "code.yaml")


def test_the_code_template_makes_prompts_whose_answer_is_the_key():
    template = load_template(CODE)
    assert "PASSKEY = {key}" in template.needle and template.question.startswith("assert PASSKEY")
    tok = load_tokenizer("byte")
    gen = PasskeyGenerator(tok, template)
    assert gen.canonical
    sample = gen.make(400, 0.5, "04721")
    text = bytes(int(i) for i in sample.input_ids).decode()
    assert len(sample.input_ids) == 400 and text.endswith("assert PASSKEY ==")
    assert "PASSKEY = 04721  # remember" in text and "counter = counter + 1" in text
    assert bytes(int(i) for i in sample.answer_ids).decode() == " 04721"
    assert np.array_equal(sample.tokens[-len(sample.answer_ids):], sample.answer_ids)


def test_the_paper_template_is_the_default_and_bad_files_are_one_line(tmp_path):
    assert load_template(None).question == "What is the passkey? The passkey is"
    bad = tmp_path / "bad.yaml"
    bad.write_text("needle: 'no key here'\n")
    with pytest.raises(PasskeyError, match="must contain"):
        load_template(str(bad))
    bad.write_text("colour: blue\n")
    with pytest.raises(PasskeyError, match="unknown: colour"):
        load_template(str(bad))
    with pytest.raises(PasskeyError, match="cannot be read"):
        load_template(str(tmp_path / "missing.yaml"))
    with pytest.raises(SweepError, match="passkey_template .* does not exist"):
        Study(states=[16], lens=[64], passkey_template=str(tmp_path / "missing.yaml")).validate()
    Study(states=[16], lens=[64], passkey_template=CODE).validate()
