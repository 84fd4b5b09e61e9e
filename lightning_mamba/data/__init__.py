"""The data layer: documents (embedded corpus, installed packages' code, local files, hub) -> tokenizer -> cached
token streams -> packed fixed-length samples or random windows, behind one LightningDataModule (``--data.*``)."""

from .cache import fingerprint, load_or_build, open_token_cache, token_dtype, write_token_cache
from .code_corpus import CodeCorpus, CodeSettings, load_code_corpus
from .corpus import default_corpus_documents
from .datamodule import TextDataModule
from .errors import DataError
from .packed import PackedTextDataset, WindowTextDataset, document_index, encode_documents, split_documents
from .passkey import PasskeyDataModule, PasskeyError, PasskeyGenerator, PasskeySample, PasskeyTemplate, passkey_grid
from .sampler import RandomWindowSampler, ResumableSampler
from .sources import load_documents, source_identity
from .streams import LaneSampler, TextLanes
from .tokenization import (
    BPETokenizer,
    ByteTokenizer,
    FileTokenizer,
    HFTokenizer,
    Tokenizer,
    build_tokenizer,
    load_tokenizer,
    tokenizer_from_spec,
)

__all__ = [
    "BPETokenizer", "ByteTokenizer", "CodeCorpus", "CodeSettings", "DataError", "FileTokenizer", "HFTokenizer",
    "LaneSampler", "PackedTextDataset",
    "RandomWindowSampler", "ResumableSampler", "TextLanes", "WindowTextDataset", "load_code_corpus",
    "PasskeyDataModule", "PasskeyError", "PasskeyGenerator", "PasskeySample", "PasskeyTemplate", "passkey_grid",
    "TextDataModule", "Tokenizer", "build_tokenizer", "default_corpus_documents", "document_index",
    "encode_documents", "fingerprint", "load_documents", "load_or_build", "load_tokenizer", "open_token_cache",
    "source_identity", "split_documents", "token_dtype", "tokenizer_from_spec", "write_token_cache",
]
