"""``TextDataModule``: documents -> tokenizer -> cached token streams -> packed training samples.

``prepare_data`` does the slow work once (load documents, train the BPE, tokenize, write the caches under
``cache_dir``); later runs with the same source, tokenizer and split open the caches as memory maps and
skip all of it. ``seq_len``, ``batch_size`` and ``val_max_tokens`` do not key the caches: changing them
costs nothing.

The training order is a :class:`~.sampler.ResumableSampler`; its position (epoch, samples trained on) is
the module's ``state_dict``, which Lightning stores in every checkpoint, so a resumed run continues with the
very batches the interrupted one would have trained on next. With ``state_passing`` the order is instead
:class:`~.streams.LaneSampler`'s: contiguous lanes of the stream, read a chunk per batch, so that each sample
can start from the previous one's final state. With ``sampling random_windows`` each step instead trains on
windows at fresh random offsets of the stream (:class:`~.sampler.RandomWindowSampler`), resumable the same way.

``source code`` reads the Python source of the interpreter's installed packages (:mod:`.code_corpus`), split
by package; it differs by machine, so a manifest of what was read is written next to the token caches
(``tokens-<key>-corpus.json``), exposed as :attr:`TextDataModule.corpus_manifest`, stored in checkpoints
(with the data position), logged as the logger's ``corpus/*`` hyperparameters and written to
``corpus_manifest.json`` in the run directory.
"""

from __future__ import annotations

import json
import os
import warnings
from functools import cached_property

import lightning as L
import numpy as np
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader

from ..atomic import atomic_write_json
from ..progress import phase
from .cache import check_cache_dir, fingerprint, load_or_build, token_dtype
from .code_corpus import (
    MAX_FILE_BYTES,
    MIN_FILE_BYTES,
    SOURCE as CODE_SOURCE,
    CodeSettings,
    code_identity,
    load_code_corpus,
    manifest_summary,
)
from .errors import DataError
from .packed import (
    PACKING_VERSION,
    PackedTextDataset,
    WindowTextDataset,
    collate_samples,
    encode_documents,
    split_documents,
)
from .sampler import RandomWindowSampler, ResumableSampler
from .sources import HF_CACHE_SUBDIR, load_documents, source_identity
from .streams import LaneSampler, TextLanes
from .tokenization import MIN_BPE_VOCAB, Tokenizer, build_tokenizer, check_tokenizer_spec

SPLITS = ("train", "val")
SAMPLINGS = ("blocks", "random_windows")
MANIFEST_FILE = "corpus_manifest.json"  # in the run directory


class TextDataModule(L.LightningDataModule):
    """Language-modelling data: fixed-length samples packed from a tokenized, document-split corpus.

    Args:
        source: ``default`` (the embedded Shakespeare + King James Bible corpus), ``code`` (the Python source
            of this interpreter's installed packages, split by package: see the ``code_*`` settings; use it with
            ``tokenizer byte``), a local file or directory (.txt/.md: one document per file; .jsonl/.json/.parquet:
            one per record; a folder named ``code`` is ``./code``), or a Hugging Face hub dataset
            ``name[:config]`` (needs the network).
        tokenizer: ``byte`` (vocabulary 257), ``bpe`` (byte-level BPE trained on the training split and
            cached), or the path of a ``tokenizer.json`` file.
        bpe_vocab_size: Vocabulary size of the ``bpe`` tokenizer (ignored otherwise) and, with it, of the model; a
            corpus too small for it gives a smaller BPE, and a warning names the size to set.
        seq_len: Training length in tokens (T_train): the state is carried over this span and starts from
            zero at each sample.
        batch_size: Samples per batch.
        val_fraction: Fraction of the documents held out for validation (at least one document each side); for
            ``source code``, the share of packages held out (by a seeded hash of their names) and, with
            ``code_max_bytes``, the share of that cap given to them.
        val_max_tokens: Cap on the validation tokens used by ``val_dataloader`` (null: all of them).
        reset_at_document_boundaries: Also restart the state after each EOS inside a sample (adds
            ``seq_idx`` to the batches). The paper trains without such resets.
        state_passing: Train on contiguous lanes of the training stream instead of shuffled samples (for
            ``model.initial_state passed``, truncated BPTT): the stream is cut into ``batch_size`` lanes per process
            and row i of batch k + 1 continues row i of batch k exactly; an epoch is one pass over the lanes.
            Batches then carry ``state_reset`` (b,): True where a row starts afresh (each epoch start, and with
            reset_at_document_boundaries where a chunk starts a new document). Validation is unchanged.
        num_workers: DataLoader worker processes (0: load in the main process; samples are cheap slices).
        cache_dir: Folder for the trained tokenizer and the token caches (safe to delete). It may be, or lie in, a
            local ``source`` folder: the files written there are never read as documents.
        seed: Seed of the train/val document split and of the training-sample shuffle.
        text_field: Field holding the text in .jsonl/.json/.parquet files and hub datasets.
        sampling: ``blocks``: an epoch is a seeded shuffle of the stream's fixed non-overlapping seq_len + 1 blocks.
            ``random_windows``: every sample is the seq_len + 1 tokens at an offset drawn uniformly over the
            training stream, fresh at every step (no window repeats bar chance), seeded and resumable.
        windows_per_epoch: ``random_windows``: samples per epoch (all processes together), which sets Lightning's
            epoch length (default: training tokens // seq_len, as many as ``blocks`` has).
        code_packages: ``source code``: the distributions (or import names) to read, e.g. ``[numpy, torch]``;
            pins the corpus. Default: every installed distribution except editable installs.
        code_val_packages: ``source code``: the distributions held out for validation (added to
            ``code_packages``). Default: a seeded hash of the names holds out ``val_fraction`` of them.
        code_min_file_bytes: ``source code``: smaller .py files are skipped.
        code_max_file_bytes: ``source code``: larger .py files are skipped (mostly generated tables).
        code_max_bytes: ``source code``: cap on the corpus' total bytes (files taken in a seeded order that mixes
            the packages); null: all of it.
    """

    def __init__(
        self,
        source: str = "default",
        tokenizer: str = "bpe",
        bpe_vocab_size: int = 8192,
        seq_len: int = 2048,
        batch_size: int = 8,
        val_fraction: float = 0.05,
        val_max_tokens: int | None = None,
        reset_at_document_boundaries: bool = False,
        state_passing: bool = False,
        num_workers: int = 0,
        cache_dir: str = "data",
        seed: int = 0,
        text_field: str = "text",
        sampling: str = "blocks",
        windows_per_epoch: int | None = None,
        code_packages: list[str] | None = None,
        code_val_packages: list[str] | None = None,
        code_min_file_bytes: int = MIN_FILE_BYTES,
        code_max_file_bytes: int = MAX_FILE_BYTES,
        code_max_bytes: int | None = None,
    ) -> None:
        super().__init__()
        # Python callers (the analysis) may pass a Tokenizer object; the CLI passes a string.
        self._tokenizer = tokenizer if isinstance(tokenizer, Tokenizer) else None
        check_settings(tokenizer if self._tokenizer is None else None, bpe_vocab_size, seq_len, batch_size,
                       val_fraction, val_max_tokens, num_workers)
        check_sampling(sampling, windows_per_epoch, state_passing)
        if source != CODE_SOURCE:
            given = [n for n, v in (("code_packages", code_packages), ("code_val_packages", code_val_packages),
                                    ("code_max_bytes", code_max_bytes)) if v is not None]
            if given:
                raise DataError(f"data.{given[0]} applies to data.source code only (source is {source!r}): "
                                f"set data.source code, or drop it")
        self._code_settings = CodeSettings(
            code_packages, code_val_packages, code_min_file_bytes, code_max_file_bytes, code_max_bytes, val_fraction,
            seed) if source == CODE_SOURCE else None  # checks the code_* settings
        self.save_hyperparameters(ignore=["tokenizer"])
        # "~/cache" in a config file (no shell expands it): the token caches went to a folder named "~" in the working
        # directory, while datasets put its Arrow copy of local files under the home folder
        self.hparams.cache_dir = os.path.expanduser(cache_dir)
        self.hparams.tokenizer = tokenizer if self._tokenizer is None else self._tokenizer.name
        self._documents: dict[str, list[str]] | None = None
        self._streams: dict[str, np.ndarray] | None = None
        self._sampler: ResumableSampler | None = None  # the training order, once train_dataloader made it
        self._sampler_state: dict | None = None  # a checkpoint's position, until then
        self._manifest: dict | None = None  # source code: what the corpus holds (see corpus_manifest)

    # ---- what the model and the analysis read ---------------------------------------------------------
    @property
    def vocab_size_for_model(self) -> int:
        """The model's vocabulary: the tokenizer's, known without tokenizing (or training) anything."""
        if self._tokenizer is None and self.hparams.tokenizer == "bpe":
            return self.hparams.bpe_vocab_size  # the trained BPE has at most this many ids
        return self.tokenizer.vocab_size

    @property
    def tokenizer(self) -> Tokenizer:
        """The tokenizer, built on first use (training the BPE only if no cached one fits)."""
        if self._tokenizer is None:
            self._tokenizer = build_tokenizer(self.hparams.tokenizer, self.hparams.bpe_vocab_size,
                                              train_docs=lambda: self.documents["train"],
                                              cache_dir=self.hparams.cache_dir, cache_key=self.split_key)
            wanted, got = self.hparams.bpe_vocab_size, self._tokenizer.vocab_size
            if self.hparams.tokenizer == "bpe" and got < wanted:
                # the model was sized by vocab_size_for_model before the BPE existed: it has the rows asked for
                rank_zero_warn(f"data.bpe_vocab_size={wanted}, but the corpus gives the BPE only {got} tokens: the "
                               f"model's embedding and output layer have {wanted - got} rows no token uses: set "
                               f"data.bpe_vocab_size {got}")
        return self._tokenizer

    @property
    def eos_id(self) -> int:
        return self.tokenizer.eos_id

    def train_tokens(self) -> np.ndarray:
        """The training split as one flat token stream (``doc EOS doc EOS ...``, memory-mapped)."""
        return self.streams["train"]

    def val_tokens(self) -> np.ndarray:
        """The held-out split as one flat token stream (all of it: ``val_max_tokens`` is not applied)."""
        return self.streams["val"]

    # the settings that decide which text is held out: a checkpoint records them, so that analyze and mitigate
    # evaluate a model on the held-out split of the corpus it was trained on
    SPLIT_SETTINGS = ("source", "val_fraction", "seed", "text_field", "code_packages", "code_val_packages",
                      "code_min_file_bytes", "code_max_file_bytes", "code_max_bytes")

    def split_settings(self) -> dict:
        """The data.* settings that give this corpus and its held-out split (TextDataModule(**them) rebuilds it)."""
        h = self.hparams
        return {k: (list(h[k]) if isinstance(h[k], tuple) else h[k]) for k in self.SPLIT_SETTINGS if k in h}

    # ---- caches -------------------------------------------------------------------------------------
    @cached_property
    def split_key(self) -> str:
        """Fingerprint of the documents on each side of the split (what the BPE and the caches depend on)."""
        h = self.hparams
        if self._code_settings is not None:
            return fingerprint(code_identity(self._code_settings))  # val_fraction and seed are in its settings
        return fingerprint(source_identity(h.source, h.text_field, h.cache_dir), h.val_fraction, h.seed)

    @cached_property
    def stream_key(self) -> str:
        """Fingerprint of the token streams: the split's documents and the tokenizer's ids."""
        return fingerprint(self.split_key, self.tokenizer.fingerprint, PACKING_VERSION)

    def cache_path(self, split: str) -> str:
        return os.path.join(self.hparams.cache_dir, f"tokens-{self.stream_key}-{split}.npy")

    @property
    def documents(self) -> dict[str, list[str]]:
        """The source's documents, split by document into ``train`` and ``val`` (loaded on first use)."""
        if self._documents is None and self._code_settings is not None:
            corpus = load_code_corpus(self._code_settings)  # split by package, not by document
            self._documents, self._manifest = corpus.documents, corpus.manifest
        if self._documents is None:
            h = self.hparams
            # datasets' Arrow copy of local files lives with our caches; hub data stays in the HF cache
            local = os.path.exists(os.path.expanduser(h.source))
            if local:
                check_cache_dir(h.cache_dir)  # a failed write of that Arrow copy is no fault of data.source
            docs = load_documents(h.source, h.text_field, cache_dir=h.cache_dir,
                                  hf_cache_dir=os.path.join(h.cache_dir, HF_CACHE_SUBDIR) if local else None)
            train, val = split_documents(len(docs), h.val_fraction, h.seed)
            self._documents = {"train": [docs[i] for i in train], "val": [docs[i] for i in val]}
        return self._documents

    def build_streams(self) -> dict[str, np.ndarray]:
        """Open the token caches, first (re)building any that are missing, stale or damaged."""
        dtype = token_dtype(self.tokenizer.vocab_size)

        def tokenize(split: str) -> np.ndarray:  # only runs for a cache that is not there (or not valid)
            with phase(f"data: tokenizing the {split} split into {self.cache_path(split)}"):
                return encode_documents(self.tokenizer, self.documents[split], dtype, desc=f"tokenizing {split}")

        # each split's cache is keyed by its split too, so that a train cache swapped with the val one is caught;
        # the ids are checked against the tokenizer's vocabulary (an out-of-range id would fail deep in training)
        streams = {split: load_or_build(self.cache_path(split), fingerprint(self.stream_key, split),
                                        lambda: tokenize(split), self.tokenizer.vocab_size)
                   for split in SPLITS}
        if self._code_settings is not None:
            self._manifest = self._load_or_write_manifest(streams)
        self._documents = None  # the text is in the caches now; free it
        return streams

    def manifest_path(self) -> str:
        return os.path.join(self.hparams.cache_dir, f"tokens-{self.stream_key}-corpus.json")

    def _load_or_write_manifest(self, streams: dict[str, np.ndarray]) -> dict:
        """The manifest next to the token caches: read back when it vouches for them, else (re)written."""
        path = self.manifest_path()
        try:
            with open(path, encoding="utf-8") as f:
                saved = json.load(f)
            if isinstance(saved, dict) and saved.get("fingerprint") == self.stream_key:
                return saved
        except (OSError, ValueError):
            pass
        if self._manifest is None:
            self.documents  # the caches were there but not their manifest: read the corpus again for it
        manifest = {**self._manifest, "tokenizer": self.tokenizer.name, "fingerprint": self.stream_key,
                    "tokens": {split: int(len(streams[split])) for split in SPLITS}}
        atomic_write_json(path, manifest, indent=1)
        return manifest

    @property
    def corpus_manifest(self) -> dict | None:
        """``source code``: what the corpus holds on this machine (distributions with versions, files, bytes, a
        content hash per side, what was skipped, tokens per split); record it with results. None otherwise."""
        if self._code_settings is None:
            return None
        self.streams  # builds or opens the caches, and with them the manifest
        return self._manifest

    @property
    def streams(self) -> dict[str, np.ndarray]:
        if self._streams is None:
            self._streams = self.build_streams()
        return self._streams

    # ---- Lightning hooks ----------------------------------------------------------------------------
    def prepare_data(self) -> None:
        """Build the tokenizer and the token caches (once per node; later runs find them)."""
        self.build_streams()

    def setup(self, stage: str | None = None) -> None:
        """Open the token caches as memory maps (building them if ``prepare_data`` was skipped); on fit, record
        the code corpus' manifest with the run."""
        self.streams
        if stage == "fit" and self._code_settings is not None and self.trainer is not None:
            self._record_manifest()

    def _record_manifest(self) -> None:
        """The manifest as ``corpus/*`` hyperparameters of every logger and as a file in the run directory."""
        trainer = self.trainer
        if not trainer.is_global_zero or not trainer.loggers:
            return
        for logger in trainer.loggers:
            logger.log_hyperparams({"corpus": manifest_summary(self._manifest)})
        log_dir = trainer.loggers[0].log_dir  # the logger's: trainer.log_dir would broadcast from rank 0 alone
        if log_dir:
            atomic_write_json(os.path.join(log_dir, MANIFEST_FILE), self._manifest, indent=1)

    def train_dataloader(self) -> DataLoader:
        h = self.hparams
        tokens = self.train_tokens()
        if len(tokens) < h.seq_len + 1:
            raise DataError(f"data.seq_len={h.seq_len} is larger than the training split ({len(tokens)} tokens): "
                            f"use a smaller seq_len or a larger corpus")
        if h.state_passing:
            world = self.trainer.world_size if self.trainer else 1
            return self.train_loader(TextLanes(tokens, h.seq_len, world * h.batch_size,
                                               emit_seq_idx=h.reset_at_document_boundaries, eos_id=self.eos_id))
        if h.sampling == "random_windows":
            return self.train_loader(WindowTextDataset(tokens, h.seq_len, emit_seq_idx=h.reset_at_document_boundaries,
                                                       eos_id=self.eos_id))
        dataset = self.dataset(tokens)
        if len(dataset) < h.batch_size:
            raise DataError(f"data.batch_size={h.batch_size} is larger than the {len(dataset)} training samples of "
                            f"seq_len={h.seq_len}: use a smaller batch_size or seq_len, or a larger corpus")
        return self.train_loader(dataset)

    def train_loader(self, dataset) -> DataLoader:
        """Batches of ``dataset`` in the resumable seeded order (subclasses that wrap the dataset use this too),
        or, with ``state_passing``, lane by lane (``dataset`` must then be the :class:`TextLanes` of the stream),
        or, with ``sampling random_windows``, at random offsets (``dataset`` must be a :class:`WindowTextDataset`)."""
        h, trainer = self.hparams, self.trainer
        state = self._sampler.state_dict() if self._sampler is not None else self._sampler_state
        replicas, rank = (trainer.world_size, trainer.global_rank) if trainer else (1, 0)
        if h.sampling == "random_windows":
            if not isinstance(dataset, WindowTextDataset):
                raise DataError(f"data.sampling random_windows trains on windows of the text stream, but "
                                f"{type(self).__name__} trains on {type(dataset).__name__} samples: set data.sampling "
                                f"blocks")
            per_epoch = h.windows_per_epoch or len(dataset.tokens) // h.seq_len
            if per_epoch < replicas * h.batch_size:
                raise DataError(f"data.windows_per_epoch={per_epoch} is less than one batch of data.batch_size="
                                f"{h.batch_size} on each of {replicas} process(es): raise it")
            self._sampler = RandomWindowSampler(len(dataset), per_epoch, seed=h.seed, num_replicas=replicas, rank=rank)
        elif not h.state_passing:
            self._sampler = ResumableSampler(len(dataset), seed=h.seed, num_replicas=replicas, rank=rank)
        elif isinstance(dataset, TextLanes):
            self._sampler = LaneSampler(h.batch_size, dataset.chunks, num_replicas=replicas, rank=rank)
        else:
            raise DataError(f"data.state_passing needs the training batches to be lanes of the text stream, but "
                            f"{type(self).__name__} trains on {type(dataset).__name__} samples: set data.state_passing "
                            f"false")
        if state is not None:
            self._sampler.load_state_dict(state)
        return DataLoader(dataset, batch_size=h.batch_size, sampler=self._sampler, drop_last=True,
                          **self.loader_options())

    def val_dataloader(self) -> DataLoader:
        h = self.hparams
        tokens = self.val_tokens()[:h.val_max_tokens]  # [:None] keeps all
        if len(tokens) < h.seq_len + 1:
            raise DataError(f"data.seq_len={h.seq_len} is larger than the validation split ({len(tokens)} tokens): "
                            f"use a smaller seq_len, a larger val_fraction or val_max_tokens, or a larger corpus")
        return DataLoader(self.dataset(tokens), batch_size=h.batch_size, shuffle=False, **self.loader_options())

    def test_dataloader(self) -> DataLoader:
        """The held-out split (there is no separate test split: the corpus is split train/val by document)."""
        return self.val_dataloader()

    def predict_dataloader(self) -> DataLoader:
        return self.val_dataloader()

    # ---- resuming: the training position is part of every checkpoint ----------------------------------
    def on_before_batch_transfer(self, batch, dataloader_idx: int):
        # Count a batch when it reaches the training step, not when the DataLoader fetches it (it runs ahead):
        # at any checkpoint, ``consumed`` is what the trainer has trained on.
        if self._sampler is not None and self.trainer is not None and self.trainer.training:
            self._sampler.advance(self.hparams.batch_size)
        return batch

    def state_dict(self) -> dict:
        state = self._sampler.state_dict() if self._sampler is not None else self._sampler_state
        if self._sampler is not None and self._epoch_cut_short():
            # Lightning records this epoch as done and resumes in its next one, but the uninterrupted run would have
            # trained on the rest of this one first: that next epoch of Lightning's is the rest of this one
            state = {**state, "epoch_offset": self._sampler.epoch_offset + 1}
        out = {"train_sampler": state} if state is not None else {}
        if self._manifest is not None:
            out["corpus_manifest"] = self._manifest  # what the run trained on, in every checkpoint
        return out

    def _epoch_cut_short(self) -> bool:
        """Whether Lightning ended its epoch (max_steps reached, or a stop) before this order's epoch ran out of
        batches: a checkpoint written then (the end-of-fit last.ckpt) is resumed in Lightning's next epoch."""
        loop = getattr(self.trainer, "fit_loop", None)
        if loop is None:
            return False
        epoch = loop.epoch_progress.current
        return (0 < epoch.started == epoch.processed  # the epoch loop is over
                and loop.epoch_loop.batch_progress.current.completed < self.trainer.num_training_batches
                and self._sampler.batches_left(self.hparams.batch_size) > 0)

    def load_state_dict(self, state_dict: dict) -> None:
        self._sampler_state = state_dict.get("train_sampler")
        if self._sampler is not None and self._sampler_state is not None:
            self._sampler.load_state_dict(self._sampler_state)
        # Lightning warns that a plain DataLoader cannot resume mid-epoch; this one can
        warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch")

    def dataset(self, tokens: np.ndarray) -> PackedTextDataset:
        h = self.hparams
        return PackedTextDataset(tokens, h.seq_len, emit_seq_idx=h.reset_at_document_boundaries,
                                 eos_id=self.eos_id)

    def loader_options(self) -> dict:
        workers = self.hparams.num_workers
        # Page-locked batches when training on a GPU: Lightning copies them with non_blocking=True, which is
        # asynchronous only from pinned memory (from pageable memory the driver may wait for the GPU's queue).
        device = getattr(getattr(self.trainer, "strategy", None), "root_device", None)  # None: no (real) trainer
        pin = device is not None and device.type == "cuda"
        return {"num_workers": workers, "persistent_workers": workers > 0, "collate_fn": collate_samples,
                "pin_memory": pin}


def check_settings(tokenizer: str | None, vocab_size: int, seq_len: int, batch_size: int, val_fraction: float,
                   val_max_tokens: int | None, num_workers: int) -> None:
    """Reject settings that cannot work, with one line naming the setting and the fix."""
    if tokenizer is not None:
        check_tokenizer_spec(tokenizer)
        if tokenizer == "bpe" and vocab_size < MIN_BPE_VOCAB:
            raise DataError(f"data.bpe_vocab_size must be >= {MIN_BPE_VOCAB} for the bpe tokenizer (got {vocab_size})")
    if seq_len < 2:
        raise DataError(f"data.seq_len must be >= 2 (got {seq_len})")
    if batch_size < 1:
        raise DataError(f"data.batch_size must be >= 1 (got {batch_size})")
    if not 0 < val_fraction < 1:
        raise DataError(f"data.val_fraction must be between 0 and 1, exclusive (got {val_fraction})")
    if val_max_tokens is not None and val_max_tokens < seq_len + 1:
        raise DataError(f"data.val_max_tokens={val_max_tokens} holds no sample of seq_len={seq_len}: "
                        f"use at least seq_len + 1, or null for the whole validation split")
    if num_workers < 0:
        raise DataError(f"data.num_workers must be >= 0 (got {num_workers})")


def check_sampling(sampling: str, windows_per_epoch: int | None, state_passing: bool) -> None:
    if sampling not in SAMPLINGS:
        raise DataError(f"data.sampling={sampling!r} is unknown: use one of {', '.join(SAMPLINGS)}")
    if windows_per_epoch is not None and (sampling != "random_windows" or windows_per_epoch < 1):
        raise DataError(f"data.windows_per_epoch={windows_per_epoch} needs data.sampling random_windows and a value "
                        f">= 1: fix it, or set it null")
    if sampling == "random_windows" and state_passing:
        raise DataError("data.sampling random_windows and data.state_passing exclude each other (lanes continue "
                        "each other, random windows do not): drop one")
