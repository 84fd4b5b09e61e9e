"""Faults of the environment and inputs the bad-input matrix cannot hold (they need a file, a folder or a write to go
wrong), each ending in one line that says what to change: no traceback, non-zero exit, nothing silently wrong.

A full disk is simulated at the lowest write call: ``atomic_write``'s ``open`` (token caches, checkpoints) or the
CSV logger's save, raising ``OSError(ENOSPC)``."""

import builtins
import errno
import glob
import json
import os

import numpy as np
import pytest
import torch

from lightning_mamba import atomic
from lightning_mamba.cli import main
from lightning_mamba.data.cache import read_sidecar, scan_tokens, sidecar_path
from lightning_mamba.data.tokenization import ByteTokenizer
from lightning_mamba.errors import DiskFullError

from .conftest import run_config
from .test_bad_inputs import one_line_error


@pytest.fixture(scope="module")
def done(tmp_path_factory, corpus, cache_dir):
    """A finished 2-step run: its folder (config, checkpoints, caches built)."""
    folder = tmp_path_factory.mktemp("done")
    main(["fit", "--config", run_config(folder, corpus, cache_dir, 2)])
    return folder


def fit_error(capsys, config: str, *args: str) -> str:
    return one_line_error(capsys, ["fit", "--config", config, *args])


def subcommand_error(capsys, subcommand: str, config: str, *args: str) -> str:
    return one_line_error(capsys, [subcommand, "--config", config, *args])


# ---- inputs ---------------------------------------------------------------------------------------------------
def test_invalid_utf8_in_jsonl_is_replaced_and_trains(tmp_path, cache_dir):
    docs = tmp_path / "docs"
    docs.mkdir()
    with open(docs / "a.jsonl", "wb") as f:
        for i in range(40):
            f.write(b'{"text": "caf\xe9 \xff\xfe document number %d and some more words here"}\n' % i)
    main(["fit", "--config", run_config(tmp_path, str(docs), str(tmp_path / "cache"), 1, seq_len=32)])
    assert torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)["global_step"] == 1


def test_tokenizer_with_a_huge_id_is_refused(tmp_path, corpus, cache_dir, capsys):
    spec = json.loads(ByteTokenizer().to_hf().to_str())
    spec["added_tokens"] = []
    spec["model"]["vocab"]["<|endoftext|>"] = 5_000_000  # a 5M-row embedding for 257 tokens
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    message = fit_error(capsys, run_config(tmp_path, corpus, cache_dir, 1), "--data.tokenizer",
                        str(tmp_path / "tokenizer.json"))
    assert "token '<|endoftext|>' has id 5000000, far beyond its 257 tokens (the model's embedding would get " \
           "5000001 rows): renumber it" in message


# ---- where a run writes ---------------------------------------------------------------------------------------
def test_logger_save_dir_that_is_not_a_folder(tmp_path, corpus, cache_dir, capsys):
    (tmp_path / "a_file").write_text("")
    message = fit_error(capsys, run_config(tmp_path, corpus, cache_dir, 1), "--trainer.logger.init_args.save_dir",
                        str(tmp_path / "a_file" / "runs"))
    assert f"the logger's save_dir {tmp_path}/a_file/runs is not a writable folder (Not a directory): set " \
           f"trainer.logger.init_args.save_dir to one" in message


def test_logger_save_dir_without_write_permission(tmp_path, corpus, cache_dir, capsys):
    if os.geteuid() == 0:
        pytest.skip("root writes into a folder whatever its mode (the not-a-folder case covers the check)")
    (tmp_path / "locked").mkdir(mode=0o555)
    message = fit_error(capsys, run_config(tmp_path, corpus, cache_dir, 1), "--trainer.logger.init_args.save_dir",
                        str(tmp_path / "locked"))
    assert "(Permission denied): set trainer.logger.init_args.save_dir" in message


def test_cache_dir_that_is_not_a_folder_is_named_not_the_source(tmp_path, corpus, capsys):
    (tmp_path / "a_file").write_text("")
    message = fit_error(capsys, run_config(tmp_path, corpus, str(tmp_path / "a_file" / "cache"), 1))
    assert message == f"error: data.cache_dir {tmp_path}/a_file/cache is not a writable folder (Not a directory): " \
                      f"set data.cache_dir to one"
    assert "data.source" not in message


def test_cache_dir_on_a_read_only_file_system(tmp_path, corpus, capsys, monkeypatch):
    """Root can write into a chmod 555 folder, so the read-only file system is simulated where a write is tried."""
    cache = tmp_path / "cache"
    cache.mkdir()
    if os.geteuid() != 0:
        os.chmod(cache, 0o555)
    else:
        temporary = atomic.tempfile.TemporaryFile

        def read_only(*args, dir=None, **kwargs):
            if dir is not None and os.path.abspath(dir).startswith(str(cache)):
                raise OSError(errno.EROFS, "Read-only file system", dir)
            return temporary(*args, dir=dir, **kwargs)

        monkeypatch.setattr(atomic.tempfile, "TemporaryFile", read_only)
    try:
        message = fit_error(capsys, run_config(tmp_path, corpus, str(cache), 1))
    finally:
        os.chmod(cache, 0o755)
    assert f"data.cache_dir {cache} is not a writable folder (" in message and "set data.cache_dir to one" in message
    assert "data.source" not in message


def test_token_cache_replaced_by_a_folder(tmp_path, corpus, capsys):
    cache = tmp_path / "cache"
    main(["fit", "--config", run_config(tmp_path / "a", corpus, str(cache), 1)])
    (train,) = glob.glob(str(cache / "tokens-*-train.npy"))
    os.remove(train)
    os.mkdir(train)
    message = fit_error(capsys, run_config(tmp_path / "b", corpus, str(cache), 1))
    assert f"{train} is a folder where the token cache goes: move it away, or set data.cache_dir" in message
    assert os.path.isdir(train)  # not ours to delete


def test_out_of_range_ids_in_a_cache_that_vouches_for_them_are_rebuilt(tmp_path, corpus):
    """A cache whose sidecar agrees with its (damaged) tokens: the id range check catches it, and it is rebuilt."""
    cache = tmp_path / "cache"
    main(["fit", "--config", run_config(tmp_path / "a", corpus, str(cache), 1)])
    (train,) = glob.glob(str(cache / "tokens-*-train.npy"))
    whole = open(train, "rb").read()
    tokens = np.load(train).copy()
    tokens[len(tokens) // 2] = 60000  # byte vocabulary: 257
    np.save(train, tokens)
    meta = read_sidecar(train)
    meta["checksum"], meta["max_id"] = scan_tokens(tokens)
    with open(sidecar_path(train), "w") as f:
        json.dump(meta, f)
    with pytest.warns(UserWarning, match="outside the vocabulary of 257"):
        main(["fit", "--config", run_config(tmp_path / "b", corpus, str(cache), 1)])
    assert open(train, "rb").read() == whole


def test_explicit_logger_version_of_an_existing_run_is_refused(tmp_path, corpus, cache_dir, capsys):
    config = run_config(tmp_path, corpus, cache_dir, 1)
    main(["fit", "--config", config, "--trainer.logger.init_args.version", "0"])
    metrics = tmp_path / "runs" / "tiny" / "version_0" / "metrics.csv"
    before = metrics.read_bytes()
    message = fit_error(capsys, config, "--trainer.logger.init_args.version", "0")
    assert f"the logger's version 0 already holds a run ({tmp_path}/runs/tiny/version_0 is not empty) and the " \
           f"CSVLogger would delete its metrics.csv: choose another trainer.logger.init_args.version" in message
    # even a resume: the CSVLogger deletes metrics.csv in a folder that is not empty
    message = fit_error(capsys, config, "--trainer.logger.init_args.version", "0", "--trainer.max_steps", "2",
                        "--ckpt_path", str(tmp_path / "ckpt" / "last.ckpt"))
    assert "the CSVLogger would delete its metrics.csv" in message
    assert metrics.read_bytes() == before
    # nor may validate log there
    message = subcommand_error(capsys, "validate", config, "--trainer.logger.init_args.version", "0")
    assert "the CSVLogger would delete its metrics.csv" in message and metrics.read_bytes() == before
    # the next free version (null) is what it says
    main(["fit", "--config", config])
    assert os.path.isfile(tmp_path / "runs" / "tiny" / "version_1" / "metrics.csv")


def test_explicit_tensorboard_version_of_an_existing_run(tmp_path, corpus, cache_dir, capsys):
    config = run_config(tmp_path, corpus, cache_dir, 1)
    tensorboard = ["--trainer.logger.class_path", "lightning.pytorch.loggers.TensorBoardLogger",
                   "--trainer.logger.init_args.version", "3"]
    main(["fit", "--config", config, *tensorboard])
    message = fit_error(capsys, config, *tensorboard)
    assert "version 3 already holds a run" in message and "or resume that run with --ckpt_path" in message
    main(["fit", "--config", config, *tensorboard, "--trainer.max_steps", "2", "--ckpt_path",
          str(tmp_path / "ckpt" / "last.ckpt")])  # a resume appends to its events
    assert len(glob.glob(str(tmp_path / "runs" / "tiny" / "version_3" / "events.*"))) == 2


# ---- a full disk ----------------------------------------------------------------------------------------------
@pytest.fixture
def full_disk(monkeypatch):
    """``full_disk(marker)``: from now on, writes through atomic_write to a file whose name holds ``marker`` fail
    with ENOSPC (as the kernel says it)."""

    class Full:
        def __init__(self, f):
            self.f = f

        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    def start(marker: str):
        def fake_open(path, *args, **kwargs):
            f = builtins.open(path, *args, **kwargs)
            return Full(f) if marker in os.path.basename(str(path)) else f

        monkeypatch.setattr(atomic, "open", fake_open, raising=False)

    return start


def test_disk_full_while_writing_a_token_cache(tmp_path, corpus, capsys, full_disk):
    full_disk(".npy")
    message = fit_error(capsys, run_config(tmp_path, corpus, str(tmp_path / "cache"), 1))
    assert message.startswith(f"error: disk full while writing {tmp_path}/cache/tokens-")
    assert message.endswith("-train.npy: free space on its disk or set data.cache_dir to a folder on another disk")
    assert os.listdir(tmp_path / "cache") in ([], ["hf_datasets"])  # no half cache, no temporary left


def test_disk_full_while_writing_a_checkpoint(tmp_path, corpus, cache_dir, capsys, full_disk, done):
    full_disk(".ckpt")
    plugins = [{"class_path": "lightning_mamba.training.checkpoint_io.AtomicCheckpointIO"}]  # configs/train.yaml's
    message = fit_error(capsys, run_config(tmp_path, corpus, cache_dir, 1, plugins=plugins))
    assert message.startswith(f"error: disk full while writing {tmp_path}/ckpt/")
    assert message.endswith(".ckpt: free space on its disk or set ModelCheckpoint's dirpath (trainer.callbacks) to a "
                            "folder on another disk")
    assert not glob.glob(str(tmp_path / "ckpt" / "*"))


def test_disk_full_while_lightning_writes_a_checkpoint(tmp_path, corpus, cache_dir, capsys, monkeypatch, done):
    """Lightning's own checkpoint writer (no AtomicCheckpointIO): the file is not known, the setting is."""
    from lightning.fabric.plugins.io import torch_io

    def save(checkpoint, path):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch_io, "_atomic_save", save)
    message = fit_error(capsys, run_config(tmp_path, corpus, cache_dir, 1))
    assert message == ("error: disk full while writing a checkpoint: free space on its disk or set ModelCheckpoint's "
                       "dirpath (trainer.callbacks) to a folder on another disk")


def test_disk_full_while_writing_the_logs(tmp_path, corpus, cache_dir, capsys, monkeypatch, done):
    from lightning.fabric.loggers import csv_logs

    def save(self):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(csv_logs._ExperimentWriter, "save", save)
    message = fit_error(capsys, run_config(tmp_path, corpus, cache_dir, 1))
    assert message == (f"error: disk full while writing the logs in {tmp_path}/runs/tiny/version_0: free space on its "
                       f"disk or set trainer.logger.init_args.save_dir to a folder on another disk")


def test_disk_full_while_writing_the_arrow_copy_names_cache_dir(tmp_path, monkeypatch):
    """datasets writes its Arrow copy of local files under data.cache_dir/hf_datasets: a full disk there is no fault
    of data.source."""
    import datasets

    from lightning_mamba.data.sources import load_local

    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.jsonl").write_text('{"text": "one"}\n')

    def load_dataset(*args, **kwargs):
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as e:
            raise datasets.exceptions.DatasetGenerationError("An error occurred while generating the dataset") from e

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    with pytest.raises(DiskFullError, match=r"disk full while writing .*hf_datasets: free space on its disk or set "
                                            r"data.cache_dir to a folder on another disk"):
        load_local(str(tmp_path / "docs"), hf_cache_dir=str(tmp_path / "cache" / "hf_datasets"))
