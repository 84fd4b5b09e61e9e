"""Where documents come from: the embedded corpus, local files, or a Hugging Face hub dataset.

``data.source`` is one string:
- ``default``: the embedded corpus (:mod:`.corpus`);
- ``code``: the Python source of the installed packages (:mod:`.code_corpus`; here with its default settings,
  training and held-out files together: ``TextDataModule`` splits it by package);
- a local file or directory (searched recursively, symlinked folders followed): ``.txt``/``.md``/``.text`` files are one document each,
  ``.jsonl``/``.json``/``.parquet`` files hold one document per record in ``text_field``; ``.gz`` works too;
- otherwise a hub dataset ``name`` or ``name:config`` (its ``train`` split), which needs the network.
Local files go through HF ``datasets`` like hub data, so both behave the same; bytes that are not UTF-8 are
replaced (U+FFFD), not fatal.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import socket
import warnings
from urllib.parse import urlparse

from ..errors import is_disk_full
from .cache import cache_write_error
from .code_corpus import SOURCE as CODE_SOURCE, CodeSettings, code_identity, load_code_corpus
from .corpus import default_corpus_documents, default_corpus_identity
from .errors import DataError

# suffix -> HF datasets builder
FORMATS = {".txt": "text", ".text": "text", ".md": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
_COMPRESSED = (".gz",)
# what the data module writes into data.cache_dir (token caches, their sidecars, the corpus manifest, trained BPEs, the
# Arrow copy of local files): never documents, also where the source folder holds (or is) the cache folder
_CACHE_FILE = re.compile(r"^(tokens-[0-9a-f]+-[a-z]+\.(npy|json)|tokenizer-bpe\d+-[0-9a-f]+\.json)$")
HF_CACHE_SUBDIR = "hf_datasets"
CACHE_README = "README.md"  # the repo's data/ (the default cache_dir) explains itself in one: not a document


def file_format(path: str) -> str | None:
    name = path.lower()
    for suffix in _COMPRESSED:
        name = name.removesuffix(suffix)
    return FORMATS.get(os.path.splitext(name)[1])


def looks_like_path(source: str) -> bool:
    """A hub name is ``name`` or ``org/name[:config]``; anything else that names no file is a missing path."""
    return source.startswith(("/", ".", "~")) or source.count("/") > 1 or file_format(source) is not None


def local_files(path: str, cache_dir: str | None = None) -> list[str]:
    """The loadable files at ``path``: itself, or those under it (recursively, symlinked folders followed once each,
    sorted, hidden ones skipped, and in ``cache_dir`` the files the data module writes there and its README.md)."""
    if os.path.isfile(path):
        return [path]  # named explicitly: loaded as text unless its suffix says otherwise
    own = os.path.realpath(cache_dir) if cache_dir else None
    files, seen = [], {os.path.realpath(path)}
    # symlinked folders are followed (a corpus assembled from links is common), each real folder once: no loops
    for folder, dirs, names in os.walk(path, followlinks=True):
        ours = own is not None and os.path.realpath(folder) == own
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and not (ours and d == HF_CACHE_SUBDIR))
        real = [os.path.realpath(os.path.join(folder, d)) for d in dirs]
        dirs[:] = [d for d, r in zip(dirs, real) if r not in seen and not seen.add(r)]
        files += [os.path.join(folder, n) for n in sorted(names)
                  if not n.startswith(".") and file_format(n)
                  and not (ours and (_CACHE_FILE.match(n) or n == CACHE_README))]
    if not files and own is not None and os.path.realpath(path) == own:
        raise DataError(f"data.source {path} is the cache folder (data.cache_dir), which holds no text of yours: "
                        "point data.source at your text files")
    if not files:
        raise DataError(f"data.source {path}: no {'/'.join(FORMATS)} files in this directory")
    return files


def _texts(dataset, text_field: str, where: str) -> list[str]:
    if text_field not in dataset.column_names:
        raise DataError(f"{where} has no '{text_field}' field (it has: {', '.join(dataset.column_names)}): "
                        f"set data.text_field")
    return [t for t in dataset[text_field] if isinstance(t, str) and t.strip()]


@contextlib.contextmanager
def _quiet_datasets_errors():
    logger = logging.getLogger("datasets")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def load_local(path: str, text_field: str = "text", hf_cache_dir: str | None = None,
               cache_dir: str | None = None) -> list[str]:
    """Documents from local files, grouped by format (text, json, parquet), files in sorted order (``cache_dir``'s
    own files left out)."""
    import datasets

    groups: dict[str, list[str]] = {}
    for f in local_files(path, cache_dir):
        groups.setdefault(file_format(f) or "text", []).append(f)
    documents = []
    for builder in ("text", "json", "parquet"):
        if builder not in groups:
            continue
        # datasets' json reader applies encoding_errors only when the encoding is not spelled "utf-8" (it hands the
        # bytes to Arrow as they are): "utf_8", the same codec, makes it decode them with errors="replace" first
        options = {"text": {"sample_by": "document", "encoding_errors": "replace"},
                   "json": {"encoding": "utf_8", "encoding_errors": "replace"}, "parquet": {}}[builder]
        field = "text" if builder == "text" else text_field

        def read(**more) -> list[str]:
            with _quiet_datasets_errors():  # a malformed file is reported once, as our one-line DataError
                dataset = datasets.load_dataset(builder, data_files=groups[builder], split="train",
                                                cache_dir=hf_cache_dir, **options, **more)
            return _texts(dataset, field, f"data.source {path}")

        try:
            try:
                documents += read()
            except DataError:
                raise
            except Exception as e:
                if hf_cache_dir is None:
                    raise
                # a damaged Arrow copy (a killed build, a bad disk) fails here as a malformed file does: build the
                # copy again from the files, and blame them only if that fails too
                documents += read(download_mode="force_redownload")
                warnings.warn(f"data.source {path}: its Arrow copy under {hf_cache_dir} did not read ({_reason(e)}): "
                              f"rebuilt it from the files", stacklevel=2)
        except DataError:
            raise
        except Exception as e:  # malformed json/parquet: name the files, keep the reason
            written = _write_failure(e, hf_cache_dir)
            if written is not None:  # writing the Arrow copy under data.cache_dir failed: no fault of the files
                raise cache_write_error(written, hf_cache_dir) from e
            raise DataError(f"data.source {path}: cannot read its {builder} files ({_reason(e)})") from e
    return documents


def _chain(e: BaseException | None):
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


def _write_failure(e: BaseException, folder: str | None) -> OSError | None:
    """The OSError behind ``e`` that is a failed write: a full disk, or any error on a file under ``folder``."""
    for x in _chain(e):
        if isinstance(x, OSError) and (is_disk_full(x) or (folder and str(x.filename or "").startswith(folder))):
            return x
    return None


def _reason(e: BaseException) -> str:
    """The innermost error's type and first line (datasets wraps what went wrong in DatasetGenerationError)."""
    *_, e = _chain(e)
    text = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return text + (": save the file as UTF-8" if "UTF-8" in text or "utf-8" in text else "")


def hub_reachable() -> bool:
    """A cheap check before ``load_dataset``, which offline retries for ~25 s before failing."""
    from huggingface_hub import constants

    try:
        socket.getaddrinfo(urlparse(constants.ENDPOINT).hostname, 443)
        return True
    except OSError:
        return False


def load_hub(source: str, text_field: str = "text") -> list[str]:
    """The ``train`` split of hub dataset ``name[:config]``."""
    import datasets
    from huggingface_hub import constants

    name, _, config = source.partition(":")
    hint = "give a local file or directory as data.source instead"
    if not constants.HF_HUB_OFFLINE and not hub_reachable():
        raise DataError(f"data.source '{source}' is not a local path, and the Hugging Face hub cannot be reached "
                        f"(this machine is offline): {hint} (or set HF_HUB_OFFLINE=1 to use a cached copy)")
    try:
        dataset = datasets.load_dataset(name, config or None, split="train")
    except Exception as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DataError(f"data.source '{source}': cannot load it from the Hugging Face hub ({reason}): {hint}") from e
    return _texts(dataset, text_field, f"hub dataset '{source}'")


def load_documents(source: str, text_field: str = "text", hf_cache_dir: str | None = None,
                   cache_dir: str | None = None) -> list[str]:
    """The documents of ``source`` (see the module docstring), in a deterministic order, empty ones dropped.

    ``hf_cache_dir`` is where ``datasets`` keeps its Arrow copy of local files (None: its default); the files the
    data module writes into ``cache_dir`` (data.cache_dir) are never documents, if the source folder holds it."""
    if source == "default":
        documents = default_corpus_documents()
    elif source == CODE_SOURCE:
        corpus = load_code_corpus(CodeSettings())
        documents = corpus.documents["train"] + corpus.documents["val"]
    elif os.path.exists(os.path.expanduser(source)):
        documents = load_local(os.path.expanduser(source), text_field, hf_cache_dir, cache_dir)
    elif any(c in source for c in "*?["):  # a shell would have expanded it; a config file does not
        raise DataError(f"data.source {source} does not exist (patterns are not expanded): give a file, or the "
                        f"directory holding the files (read recursively)")
    elif looks_like_path(source):
        raise DataError(f"data.source {source} does not exist: give an existing file or directory, "
                        f"'default', or a hub dataset name")
    else:
        documents = load_hub(source, text_field)
    if not documents:
        raise DataError(f"data.source {source} holds no non-empty documents")
    return documents


def source_identity(source: str, text_field: str = "text", cache_dir: str | None = None) -> dict:
    """What the documents depend on, for cache fingerprints: package versions for the embedded corpus,
    each file's path, size and modification time for local data (``cache_dir``'s own files left out, as in
    :func:`load_documents`), the name for hub data."""
    if source == "default":
        return default_corpus_identity()
    if source == CODE_SOURCE:
        return code_identity(CodeSettings())
    path = os.path.expanduser(source)
    if os.path.exists(path):
        stats = [(os.path.abspath(f), os.stat(f)) for f in local_files(path, cache_dir)]
        return {"files": [[f, s.st_size, s.st_mtime_ns] for f, s in stats], "text_field": text_field}
    return {"hub": source, "text_field": text_field}  # no revision known offline; delete the cache to refresh
