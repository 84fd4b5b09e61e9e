"""Tokenizers behind one small interface: bytes, a byte-level BPE trained on the corpus, or a tokenizer.json.

(Named ``tokenization`` so it does not shadow the HF ``tokenizers`` package it builds on.)

``data.tokenizer`` is ``byte`` (256 byte values + EOS = 256), ``bpe`` (trained on the training split, cached
under ``cache_dir`` and reused) or the path of a ``tokenizer.json`` (e.g. GPT-NeoX's, to evaluate the official
checkpoints). Every tokenizer ends documents with its EOS id and can be recorded in a checkpoint
(:meth:`Tokenizer.to_spec` / :func:`tokenizer_from_spec`) and saved as a ``tokenizer.json``.
"""

from __future__ import annotations

import os
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from ..progress import phase
from .cache import atomic_write, cache_write_error, check_cache_dir, fingerprint
from .errors import DataError

EOS = "<|endoftext|>"
EOS_NAMES = (EOS, "</s>", "<eos>", "<|end_of_text|>")  # looked up, in this order, in a tokenizer.json
BPE_VERSION = 1  # bump when the BPE recipe below changes: it keys the cached tokenizer files
MIN_BPE_VOCAB = 257  # the 256 byte symbols + EOS


class Tokenizer(ABC):
    """What the data layer and the analysis need from a tokenizer."""

    name: str        # what it is, for logs
    vocab_size: int  # every id is < vocab_size (the model's embedding size)
    eos_id: int      # ends every document in the token stream

    @abstractmethod
    def encode(self, text: str) -> list[int]: ...

    @abstractmethod
    def decode(self, ids: Sequence[int]) -> str: ...

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    @abstractmethod
    def to_spec(self) -> dict:
        """A JSON-able description that :func:`tokenizer_from_spec` turns back into this tokenizer."""

    @abstractmethod
    def to_hf(self) -> tokenizers.Tokenizer:
        """An HF tokenizer that encodes the same way (what :meth:`save` writes)."""

    @property
    def fingerprint(self) -> str:
        """Changes whenever the ids it produces could change (part of the token-cache key)."""
        return fingerprint(self.to_spec())

    def save(self, path: str) -> None:
        """Write a ``tokenizer.json`` (atomically) that :class:`FileTokenizer` loads back."""
        atomic_write(path, lambda f: f.write(self.to_hf().to_str().encode()))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name}, vocab_size={self.vocab_size}, eos_id={self.eos_id})"


def byte_symbols() -> list[str]:
    """GPT-2's printable stand-in character for each byte value (the ByteLevel alphabet, in byte order)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    symbols, extra = {}, 0
    for b in range(256):
        if b in printable:
            symbols[b] = chr(b)
        else:
            symbols[b] = chr(256 + extra)
            extra += 1
    return [symbols[b] for b in range(256)]


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes as ids 0..255, EOS = 256: no training, no unknown tokens, any text round-trips."""

    name, vocab_size, eos_id = "byte", 257, 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        pieces, current = [], bytearray()
        for i in ids:
            if i == self.eos_id:
                pieces += [current.decode("utf-8", errors="replace"), EOS]
                current = bytearray()
            elif 0 <= i < 256:
                current.append(i)
        return "".join(pieces) + current.decode("utf-8", errors="replace")

    def to_spec(self) -> dict:
        return {"kind": "byte"}

    def to_hf(self) -> tokenizers.Tokenizer:
        hf = tokenizers.Tokenizer(models.BPE(vocab={s: b for b, s in enumerate(byte_symbols())}, merges=[]))
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        hf.decoder = decoders.ByteLevel()
        hf.add_special_tokens([EOS])  # id 256
        return hf


def max_ids(n_tokens: int) -> int:
    """The embedding rows a tokenizer of ``n_tokens`` tokens may ask for: ids may leave gaps, not that many."""
    return 2 * n_tokens + 1024


class HFTokenizer(Tokenizer):
    """A ``tokenizers.Tokenizer``; documents end with the first EOS_NAMES token it knows."""

    def __init__(self, hf: tokenizers.Tokenizer, name: str):
        self.hf, self.name = hf, name
        # Text that spells a special token ("<|endoftext|>" in a web page) stays text: only the data layer
        # ends documents. (A runtime flag: not written into the saved tokenizer.json.)
        hf.encode_special_tokens = True
        vocab = hf.get_vocab(with_added_tokens=True)
        eos = next((t for t in EOS_NAMES if t in vocab), None)
        if eos is None:
            raise DataError(f"tokenizer {name} has no end-of-document token (looked for {', '.join(EOS_NAMES)}): "
                            f"add one to its added_tokens")
        self.eos_id = vocab[eos]
        self.vocab_size = max(vocab.values()) + 1  # ids can have gaps: size the embedding by the largest
        if self.vocab_size > max_ids(len(vocab)):  # e.g. an EOS numbered 5,000,000: a 5M-row embedding
            top = max(vocab, key=vocab.get)
            raise DataError(f"tokenizer {name}: token {top!r} has id {vocab[top]}, far beyond its {len(vocab)} tokens "
                            f"(the model's embedding would get {self.vocab_size} rows): renumber it to follow the "
                            f"others (ids below {max_ids(len(vocab))}; the largest id sizes the embedding)")

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False).ids  # no BOS/EOS templates: we add EOS ourselves

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self.hf.encode_batch_fast(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=False)

    def to_spec(self) -> dict:
        return {"kind": "json", "name": self.name, "json": self.hf.to_str()}

    @property
    def fingerprint(self) -> str:
        return fingerprint("tokenizer.json", self.hf.to_str())  # the content, not the name or path

    def to_hf(self) -> tokenizers.Tokenizer:
        return self.hf


class FileTokenizer(HFTokenizer):
    """A ``tokenizer.json`` file (e.g. GPT-NeoX-20B's, or one :meth:`Tokenizer.save` wrote)."""

    def __init__(self, path: str):
        try:
            hf = tokenizers.Tokenizer.from_file(path)
        except Exception as e:  # missing, not JSON, or not a tokenizer: one line, with the reason
            raise DataError(f"tokenizer file {path} cannot be loaded ({first_line(e)}): "
                            f"give a tokenizer.json saved by HF tokenizers") from e
        super().__init__(hf, os.path.abspath(path))


def first_line(e: BaseException) -> str:
    """The tokenizers library's reason, for a one-line error."""
    return str(e).splitlines()[0] if str(e) else repr(e)


class BPETokenizer(HFTokenizer):
    """A byte-level BPE (GPT-2 style pre-tokenization) trained on documents with HF ``tokenizers``."""

    @classmethod
    def train(cls, documents: Sequence[str], vocab_size: int = 8192) -> BPETokenizer:
        if vocab_size < MIN_BPE_VOCAB:
            raise DataError(f"data.vocab_size must be >= {MIN_BPE_VOCAB} for the bpe tokenizer (got {vocab_size})")
        hf = tokenizers.Tokenizer(models.BPE())
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        hf.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=[EOS],
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
        hf.train_from_iterator(documents, trainer=trainer, length=len(documents))
        return cls(hf, bpe_name(vocab_size))


def bpe_name(vocab_size: int) -> str:
    """The name of a BPE trained here (recorded in checkpoints with the tokenizer): its data.bpe_vocab_size."""
    return f"bpe-{vocab_size}"


def trained_bpe_size(name: str) -> int | None:
    """The data.bpe_vocab_size a BPE named by :func:`bpe_name` was trained at; None for other tokenizers' names."""
    match = re.fullmatch(r"bpe-(\d+)", name)
    return int(match[1]) if match else None


def cached_bpe(vocab_size: int, train_docs: Callable[[], Sequence[str]], cache_dir: str | None,
               cache_key: str) -> BPETokenizer:
    """The BPE for ``cache_key`` (what the training documents depend on) from ``cache_dir``, else trained on
    ``train_docs()`` and saved there. A file that does not load back is retrained over, never used."""
    if cache_dir is None:
        return _train_bpe(train_docs, vocab_size)
    path = os.path.join(cache_dir, f"tokenizer-bpe{vocab_size}-{fingerprint(cache_key, vocab_size, BPE_VERSION)}.json")
    if os.path.isfile(path):
        try:
            tok = BPETokenizer(tokenizers.Tokenizer.from_file(path), bpe_name(vocab_size))
            if tok.vocab_size <= vocab_size:
                return tok
        except Exception:  # damaged file: fall through and retrain
            pass
    check_cache_dir(cache_dir)  # before training, not after
    tok = _train_bpe(train_docs, vocab_size)
    try:
        tok.save(path)
    except OSError as e:
        raise cache_write_error(e, path) from e
    return tok


def _train_bpe(train_docs: Callable[[], Sequence[str]], vocab_size: int) -> BPETokenizer:
    with phase(f"data: training a BPE tokenizer of {vocab_size} tokens on the training split"):
        return BPETokenizer.train(train_docs(), vocab_size)


def check_tokenizer_spec(spec: str) -> None:
    if spec in ("byte", "bpe"):
        return
    spec = os.path.expanduser(spec)
    if spec.endswith(".json") and not os.path.isfile(spec):
        raise DataError(f"data.tokenizer {spec} does not exist: give the path of a tokenizer.json file")
    if not os.path.isfile(spec):
        raise DataError(f"unknown tokenizer '{spec}': use 'byte', 'bpe' or a path to a tokenizer.json file")


def load_tokenizer(spec: str) -> Tokenizer:
    """``byte`` or a ``tokenizer.json`` path (``bpe`` needs training: see :func:`build_tokenizer`)."""
    if spec == "bpe":
        raise DataError("the bpe tokenizer is trained by the data module: give the tokenizer.json it saved")
    check_tokenizer_spec(spec)
    return ByteTokenizer() if spec == "byte" else FileTokenizer(os.path.expanduser(spec))


def build_tokenizer(spec: str | Tokenizer, vocab_size: int = 8192,
                    train_docs: Sequence[str] | Callable[[], Sequence[str]] | None = None,
                    cache_dir: str | None = None, cache_key: str = "") -> Tokenizer:
    """The tokenizer ``spec`` names (see the module docstring). For ``bpe``, ``train_docs`` (a list, or a
    function returning one, called only when no cached BPE for ``cache_key`` exists) are its training text."""
    if isinstance(spec, Tokenizer):
        return spec
    if spec != "bpe":
        return load_tokenizer(spec)
    if train_docs is None:
        raise ValueError("build_tokenizer('bpe') needs train_docs")
    docs = train_docs if callable(train_docs) else (lambda: train_docs)
    return cached_bpe(vocab_size, docs, cache_dir, cache_key)


def tokenizer_from_spec(spec: dict) -> Tokenizer:
    """Inverse of :meth:`Tokenizer.to_spec` (checkpoints record the spec so they need no data folder)."""
    kind = spec.get("kind") if isinstance(spec, dict) else None
    if kind == "byte":
        return ByteTokenizer()
    if kind == "json" and "json" in spec:
        name = spec.get("name", "tokenizer.json")
        try:
            hf = tokenizers.Tokenizer.from_str(spec["json"])
        except Exception as e:  # damaged text (not JSON, not a tokenizer): one line, with the library's reason
            raise DataError(f"tokenizer {name} cannot be read as a tokenizer ({first_line(e)})") from e
        return HFTokenizer(hf, name)
    raise DataError(f"unknown tokenizer spec {kind!r} (expected kind 'byte', or 'json' with the tokenizer.json text)")
