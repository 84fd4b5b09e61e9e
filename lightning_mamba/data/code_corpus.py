"""The code corpus (``data.source code``): the Python source files of the running interpreter's installed packages.

Why: byte-level source code is plentiful on any machine, needs no network, and is the kind of long, structured,
repetitive text on which a recurrent model with too large a state for its training length shows the failure to
forget quickly (Stuffed Mamba, arXiv 2410.07145).

What is read: every ``*.py`` file that an installed distribution's file list (its ``RECORD``) names, for the
distributions in the interpreter's ``site-packages`` (``sysconfig``'s purelib and platlib), read as bytes and
never imported. Editable installs are left out: their file list names a loader, not their source (and that
source is a working tree, which changes under the caches). A file is kept when its size is within
[``min_file_bytes``, ``max_file_bytes``] (too small: ``__init__`` stubs; too large: mostly generated tables)
and its content was not kept already (deduplicated by content hash across the whole corpus).

The split is BY DISTRIBUTION, never by file inside one: the held-out distributions are the named
``val_packages``, or else those whose name hashes (with the seed) below ``val_fraction``; a distribution's side
therefore does not depend on which others are installed. Held-out files are taken first, so a file whose
content also ships in a training distribution is held out and not trained on. (Near-copies across
distributions, e.g. ``lightning`` and ``pytorch-lightning``, are not detected: name both on one side if that
matters.)

The corpus differs by machine (installed packages and versions): :func:`load_code_corpus` returns a manifest
(distributions with versions, file counts, bytes, a hash of the exact content) that the data module writes
next to its token caches and that runs record; ``packages`` (a list of distribution or import names) pins it.
``max_bytes`` caps the total: files are then taken in a seeded order that mixes all distributions (not
alphabetically) until each side's budget (``val_fraction`` of it held out) is used.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib.metadata
import json
import os
import platform
import re
import sysconfig
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .errors import DataError

SOURCE = "code"
CODE_VERSION = 1  # bump when what is read or how it is split changes: it keys the caches
MIN_FILE_BYTES = 1024
MAX_FILE_BYTES = 512 * 1024


def normalize(name: str) -> str:
    """PEP 503 name normalisation: 'PyYAML' and 'pyyaml', 'typing_extensions' and 'typing-extensions' match."""
    return re.sub(r"[-_.]+", "-", name).lower()


def _unit(*parts) -> float:
    """A stable number in [0, 1) from ``parts`` (the same on every machine and Python version)."""
    digest = hashlib.blake2b(json.dumps(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0 ** 64


@dataclass(frozen=True)
class CodeSettings:
    """What the code corpus is built from (all of it keys the caches)."""

    packages: tuple[str, ...] | None = None       # distributions (or import names) to read; None: all installed
    val_packages: tuple[str, ...] | None = None   # held-out distributions; None: a hashed split by name
    min_file_bytes: int = MIN_FILE_BYTES
    max_file_bytes: int = MAX_FILE_BYTES
    max_bytes: int | None = None                  # cap on the corpus' total bytes (train + held out)
    val_fraction: float = 0.05
    seed: int = 0

    def __post_init__(self):
        for name in ("packages", "val_packages"):
            value = getattr(self, name)
            if value is not None:
                if isinstance(value, str) or not all(isinstance(v, str) and v.strip() for v in value):
                    raise DataError(f"data.code_{name} must be a list of package names, e.g. '[numpy, torch]' "
                                    f"(got {value!r})")
                object.__setattr__(self, name, tuple(value))
        if self.packages is not None and not self.packages:
            raise DataError("data.code_packages is an empty list: name packages, e.g. '[numpy, torch]', or use null "
                            "for all installed ones")
        if self.min_file_bytes < 1:
            raise DataError(f"data.code_min_file_bytes must be >= 1 (got {self.min_file_bytes})")
        if self.max_file_bytes < self.min_file_bytes:
            raise DataError(f"data.code_max_file_bytes={self.max_file_bytes} is below data.code_min_file_bytes="
                            f"{self.min_file_bytes}: raise it")
        if self.max_bytes is not None and self.max_bytes < 2 * self.min_file_bytes:
            raise DataError(f"data.code_max_bytes={self.max_bytes} cannot hold a training and a held-out file of at "
                            f"least data.code_min_file_bytes={self.min_file_bytes}: raise it, or null for no cap")

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update({k: list(v) if v is not None else None for k, v in d.items() if isinstance(v, tuple)})
        return d


@dataclass
class CodeFile:
    dist: str        # normalised distribution name
    relpath: str     # as the distribution's RECORD names it (relative to site-packages)
    path: Path
    size: int
    mtime_ns: int


@dataclass
class Distribution:
    key: str         # normalised name
    name: str        # as its metadata spells it
    version: str
    files: list[CodeFile] = field(default_factory=list)  # its .py files within the size limits, RECORD order
    small: int = 0   # .py files below min_file_bytes
    large: int = 0   # .py files above max_file_bytes


@dataclass
class CodeCorpus:
    documents: dict[str, list[str]]  # "train" / "val" -> file texts, in stream order
    manifest: dict


def site_dirs() -> list[str]:
    """The running interpreter's site-packages folders (purelib and platlib; often the same)."""
    paths = sysconfig.get_paths()
    return sorted({os.path.realpath(paths[k]) for k in ("purelib", "platlib") if paths.get(k)})


def _is_editable(dist: importlib.metadata.Distribution) -> bool:
    text = dist.read_text("direct_url.json")
    if not text:
        return False
    try:
        return bool(json.loads(text).get("dir_info", {}).get("editable"))
    except (ValueError, AttributeError):
        return False


def installed_distributions() -> tuple[dict[str, importlib.metadata.Distribution], dict[str, str]]:
    """(normalised name -> distribution) of site-packages, and (normalised name -> why it is left out)."""
    found: dict[str, importlib.metadata.Distribution] = {}
    excluded: dict[str, str] = {}
    for dist in importlib.metadata.distributions(path=site_dirs()):
        name = dist.metadata["Name"]
        if not name:
            continue
        key = normalize(name)
        if key in found or key in excluded:
            continue  # the first one on the path is the one the interpreter imports
        if _is_editable(dist):
            excluded[key] = "editable install (its source is a working tree, not an installed package)"
        else:
            found[key] = dist  # its file list is read only if it takes part (torch's is long)
    return found, excluded


def _resolve(names, found, excluded, setting: str) -> list[str]:
    """The normalised distribution names of ``names`` (distribution names, or import names of one distribution)."""
    by_import = None
    keys = []
    for name in names:
        key = normalize(name)
        if key in excluded:
            raise DataError(f"data.{setting}: '{name}' is left out of the code corpus ({excluded[key]}): "
                            f"remove it from the list")
        if key not in found:
            if by_import is None:
                by_import = {normalize(k): {normalize(d) for d in v}
                             for k, v in importlib.metadata.packages_distributions().items()}
            owners = by_import.get(key, set()) & set(found)
            if len(owners) != 1:
                close = difflib.get_close_matches(key, sorted(found), n=3)
                hint = f" (did you mean {', '.join(close)}?)" if close else ""
                raise DataError(f"data.{setting}: '{name}' is not a distribution installed for this interpreter{hint}: "
                                f"name installed packages (`pip list`), e.g. '[numpy, torch]'")
            key = owners.pop()
        if key not in keys:
            keys.append(key)
    return keys


def _scan(dist: importlib.metadata.Distribution, key: str, settings: CodeSettings) -> Distribution:
    """The distribution's .py files within the size limits (stat only: nothing is read here)."""
    out = Distribution(key=key, name=dist.metadata["Name"], version=dist.version or "unknown")
    for entry in dist.files or ():  # None: no RECORD (then no file of it is known)
        relpath = str(entry)
        if not relpath.endswith(".py") or relpath.startswith(".."):  # '../../bin/..': outside site-packages
            continue
        path = Path(dist.locate_file(entry))
        try:
            st = path.stat()
        except OSError:
            continue  # listed but gone (a partial uninstall)
        if not path.is_file():
            continue
        if st.st_size < settings.min_file_bytes:
            out.small += 1
        elif st.st_size > settings.max_file_bytes:
            out.large += 1
        else:
            out.files.append(CodeFile(key, relpath, path, st.st_size, st.st_mtime_ns))
    return out


def select(settings: CodeSettings) -> tuple[list[Distribution], list[Distribution], dict[str, str]]:
    """(training distributions, held-out distributions, distributions left out and why), each side sorted by
    name; only distributions with at least one .py file within the size limits take part."""
    found, excluded = installed_distributions()
    named = _resolve(settings.packages, found, excluded, "code_packages") if settings.packages else sorted(found)
    held = _resolve(settings.val_packages, found, excluded, "code_val_packages") if settings.val_packages else []
    keys = sorted(set(named) | set(held))
    scanned = {k: _scan(found[k], k, settings) for k in keys}
    for k in (k for k in keys if not scanned[k].files):
        if k in held or settings.packages is not None:  # named explicitly: say so rather than drop it
            raise DataError(f"data.source code: package '{scanned[k].name}' has no .py file of "
                            f"{settings.min_file_bytes} to {settings.max_file_bytes} bytes: pick another package or "
                            f"change data.code_min_file_bytes / data.code_max_file_bytes")
        excluded[k] = "no .py file within the size limits" if found[k].files is not None else "no file list (RECORD)"
    usable = [k for k in keys if scanned[k].files]
    if held:
        val = [k for k in usable if k in held]
        train = [k for k in usable if k not in held]
        if not train:
            raise DataError("data.code_val_packages holds out every package of the code corpus: leave some for "
                            "training (add to data.code_packages)")
    else:
        if len(usable) < 2:
            raise DataError(f"data.source code: a split by package needs at least 2 packages with Python files, "
                            f"found {len(usable)} ({', '.join(usable) or 'none'}): name more in data.code_packages")
        score = {k: _unit("code-split", settings.seed, k) for k in usable}
        val = [k for k in usable if score[k] < settings.val_fraction]
        if not val:  # few packages: hold out the one that hashes lowest
            val = [min(usable, key=score.get)]
        if len(val) == len(usable):
            val.remove(max(val, key=score.get))
        train = [k for k in usable if k not in val]
    return [scanned[k] for k in train], [scanned[k] for k in val], excluded


def _ordered(dists: list[Distribution], seed: int) -> list[CodeFile]:
    """All files of ``dists`` in a seeded order that mixes the distributions (what ``max_bytes`` takes a prefix of)."""
    files = [f for d in dists for f in d.files]
    return sorted(files, key=lambda f: (_unit("code-order", seed, f.dist, f.relpath), f.dist, f.relpath))


def _take(files: list[CodeFile], budget: float, seen: set[bytes], counts: dict) -> tuple[list[CodeFile], list[bytes]]:
    """Read ``files`` in order, skipping duplicate content, until ``budget`` bytes are taken."""
    kept, texts, total = [], [], 0
    for f in files:
        if total + f.size > budget:
            counts["over_max_bytes"] += 1
            continue
        try:
            raw = f.path.read_bytes()
        except OSError:
            counts["unreadable"] += 1
            continue
        digest = hashlib.blake2b(raw, digest_size=16).digest()
        if digest in seen:
            counts["duplicates"] += 1
            continue
        seen.add(digest)
        kept.append(f)
        texts.append(raw)
        total += len(raw)
    return kept, texts


def _side(dists: list[Distribution], kept: list[CodeFile], texts: list[bytes]) -> dict:
    per: dict[str, list[int]] = {}
    h = hashlib.blake2b(digest_size=16)
    for f, raw in zip(kept, texts):
        files_bytes = per.setdefault(f.dist, [0, 0])
        files_bytes[0] += 1
        files_bytes[1] += len(raw)
        h.update(hashlib.blake2b(raw, digest_size=16).digest())
    return {
        "distributions": [{"name": d.name, "version": d.version, "files": per[d.key][0], "bytes": per[d.key][1]}
                          for d in dists if d.key in per],
        "files": len(kept),
        "bytes": sum(len(t) for t in texts),
        "content_hash": h.hexdigest(),
    }


def load_code_corpus(settings: CodeSettings) -> CodeCorpus:
    """The code corpus' documents on each side of the split (one per file) and its manifest."""
    train_dists, val_dists, excluded = select(settings)
    counts = {"below_min_file_bytes": sum(d.small for d in train_dists + val_dists),
              "above_max_file_bytes": sum(d.large for d in train_dists + val_dists),
              "duplicates": 0, "over_max_bytes": 0, "unreadable": 0}
    cap = settings.max_bytes
    val_budget = float("inf") if cap is None else max(round(cap * settings.val_fraction), settings.min_file_bytes)
    train_budget = float("inf") if cap is None else cap - val_budget
    seen: set[bytes] = set()
    # held-out first: content shipped on both sides is held out, never trained on
    val_files, val_texts = _take(_ordered(val_dists, settings.seed), val_budget, seen, counts)
    train_files, train_texts = _take(_ordered(train_dists, settings.seed), train_budget, seen, counts)
    for side, texts, setting in (("training", train_texts, "code_packages"), ("held-out", val_texts, "code_val_packages")):
        if not texts:
            raise DataError(f"data.source code: the {side} packages give no Python file (after the size limits, "
                            f"deduplication and data.code_max_bytes={cap}): raise data.code_max_bytes or change "
                            f"data.{setting}")
    train, val = _side(train_dists, train_files, train_texts), _side(val_dists, val_files, val_texts)
    manifest = {
        "source": SOURCE,
        "version": CODE_VERSION,
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "split": "named packages" if settings.val_packages else "hashed by package name",
        "settings": settings.to_dict(),
        "train": train,
        "val": val,
        "skipped_files": counts,
        "excluded_distributions": {k: why for k, why in sorted(excluded.items())},
        "content_hash": hashlib.blake2b((train["content_hash"] + val["content_hash"]).encode(),
                                        digest_size=16).hexdigest(),
    }
    decode = lambda raw: raw.decode("utf-8", errors="replace")  # noqa: E731 (a stray non-UTF-8 byte is not fatal)
    return CodeCorpus({"train": [decode(t) for t in train_texts], "val": [decode(t) for t in val_texts]}, manifest)


def code_identity(settings: CodeSettings) -> dict:
    """What the corpus depends on, for cache fingerprints, without reading any file: the settings, the Python
    version, and per distribution its version and each candidate file's path, size and modification time."""
    train, val, _ = select(settings)

    def files(d: Distribution) -> str:
        stats = [[f.relpath, f.size, f.mtime_ns] for f in d.files]
        return hashlib.blake2b(json.dumps(stats).encode(), digest_size=16).hexdigest()

    return {"source": SOURCE, "version": CODE_VERSION, "python": platform.python_version(),
            "settings": settings.to_dict(),
            "train": [[d.key, d.version, files(d)] for d in train], "val": [[d.key, d.version, files(d)] for d in val]}


def manifest_summary(manifest: dict) -> dict:
    """Flat, scalar fields of a manifest, for a logger's hyperparameters (the full manifest goes to a file)."""
    def names(side: str) -> str:
        return ", ".join(f"{d['name']}=={d['version']}" for d in manifest[side]["distributions"])

    return {"source": manifest["source"], "content_hash": manifest["content_hash"], "python": manifest["python"],
            "split": manifest["split"], "train_files": manifest["train"]["files"],
            "train_bytes": manifest["train"]["bytes"], "val_files": manifest["val"]["files"],
            "val_bytes": manifest["val"]["bytes"], "train_distributions": names("train"),
            "val_distributions": names("val")}
