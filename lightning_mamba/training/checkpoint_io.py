"""Lightning checkpoints (.ckpt): written atomically, checked against the run before they are loaded, and read into
a model (``load_model``, which also takes a checkpoint directory).

Lightning 2.6's own ``TorchCheckpointIO`` serializes to memory, writes a temporary file in the system temp
folder, then ``shutil.move``s it over the target. When that folder is on another file system than the run
(a local /tmp, runs on a network file system: the usual cluster setup) the move is a copy straight into
``last.ckpt``, and a crash, kill or full disk during the copy leaves a truncated file where the previous
checkpoint was; nothing is fsync'ed either. :class:`AtomicCheckpointIO` writes the temporary file next to
the target, fsyncs it and renames it (``atomic.atomic_write``): the previous checkpoint stays whole
until the new one is complete and durable.
"""

from __future__ import annotations

import inspect
import os
from typing import Any

import torch
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.plugins import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_warn

from ..atomic import atomic_write, remove_stale_temporaries
from ..data.errors import DataError
from ..data.sampler import POSITION_KEYS
from ..data.tokenization import tokenizer_from_spec, trained_bpe_size
from ..models import ConfigError, MambaConfig, MambaLM
from ..models.checkpoint import (
    CONFIG,
    SAFETENSORS,
    WEIGHTS,
    load_pretrained,
    load_tokenizer_spec,
    load_weights,
    read_config,
    read_meta,
    torch_load,
)
from ..models.config import SHAPE_FIELDS, SPEED_ONLY_SETTINGS, SSM_DEFAULTS, SSM_SHAPE_FIELDS, TRAIN_DEFAULTS

# the model settings that change a weight's shape (CLI names: model.<name>), as models/config.py lists them
SHAPE_SETTINGS, SSM_SHAPE_SETTINGS = SHAPE_FIELDS, SSM_SHAPE_FIELDS


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose local saves go to a temporary file beside the target, fsync'ed, then renamed
    over it; remote paths (s3://, ...) keep Lightning's behaviour."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None or "file" not in get_filesystem(path).protocol:
            return super().save_checkpoint(checkpoint, path, storage_options)
        remove_stale_temporaries(str(path))
        atomic_write(str(path), lambda f: torch.save(checkpoint, f))

    def load_checkpoint(self, path, *args: Any, weights_only: bool | None = None, **kwargs: Any) -> dict[str, Any]:
        # tensors and plain values only, whatever the caller or torch's default (False before 2.6): no code runs
        return super().load_checkpoint(path, *args, weights_only=True, **kwargs)


# ---- does a checkpoint fit this run? ------------------------------------------------------------------
def _shape_settings(mamba_config: dict) -> dict:
    ssm = mamba_config.get("ssm_cfg") or {}
    return {**{k: mamba_config.get(k) for k in SHAPE_SETTINGS}, **{k: ssm.get(k) for k in SSM_SHAPE_SETTINGS}}


def check_tokenizer(checkpoint: dict, datamodule: Any, path: str) -> None:
    """The run's tokenizer must be the one the checkpoint was trained with (same ids for the same text)."""
    spec = (checkpoint.get("lightning_mamba") or {}).get("tokenizer")
    mine = getattr(datamodule, "tokenizer", None) if datamodule is not None else None
    if spec is None or mine is None:
        return
    theirs = tokenizer_from_spec(spec)
    if theirs.fingerprint != mine.fingerprint:
        if (theirs.name, theirs.vocab_size) == (mine.name, mine.vocab_size):  # e.g. two bpe-8192 of other corpora
            raise DataError(f"checkpoint {path} was trained with another {theirs.name} tokenizer than data.tokenizer "
                            f"gives here (same name and vocabulary {mine.vocab_size}, other ids: a BPE trained on other "
                            f"text): set data.source (and data.val_fraction, data.seed) to what the checkpoint's run "
                            f"used")
        raise DataError(f"checkpoint {path} was trained with the tokenizer {theirs.name} (vocabulary "
                        f"{theirs.vocab_size}), but data.tokenizer gives {mine.name} (vocabulary {mine.vocab_size}): "
                        f"set data.tokenizer (and data.bpe_vocab_size, data.source) to what the checkpoint's run used")


def check_tokenizer_kind(spec: dict | None, tokenizer: str | None, what: str, bpe_vocab_size: int | None = None) -> None:
    """Before anything is built: a byte-level checkpoint with a BPE run or the other way round, and a BPE trained
    here at another vocabulary than the checkpoint's (``bpe_vocab_size``: the run's data.bpe_vocab_size), can be told
    from the settings alone (check_tokenizer compares the ids once the run's tokenizer exists, after a BPE has been
    trained and the corpus tokenized: minutes on a large corpus, for a run that cannot start)."""
    kind = spec.get("kind") if isinstance(spec, dict) else None
    if kind is None or tokenizer is None:
        return
    if (kind == "byte") != (str(tokenizer) == "byte"):
        theirs = "the byte tokenizer" if kind == "byte" else f"the tokenizer {spec.get('name', 'tokenizer.json')}"
        fix = ("set --data.tokenizer byte" if kind == "byte" else
               "set data.tokenizer (and data.bpe_vocab_size, data.source) to what the checkpoint's run used")
        raise DataError(f"{what} was trained with {theirs}, but data.tokenizer is {tokenizer}: {fix}")
    trained = trained_bpe_size(str(spec.get("name", "")))  # a BPE this project trained (None: another tokenizer)
    if str(tokenizer) == "bpe" and trained is not None and bpe_vocab_size is not None and trained != int(bpe_vocab_size):
        raise DataError(f"{what} was trained with a BPE of vocabulary {trained}, but data.bpe_vocab_size is "
                        f"{bpe_vocab_size}: set --data.bpe_vocab_size {trained} (and data.source to the corpus "
                        f"it was trained on)")


def _first_mismatch(state: dict, mine: dict) -> str | None:
    for key, want in mine.items():
        got = state.get(key)
        if got is None or got.shape != want.shape:
            return f"{key} is {'absent' if got is None else tuple(got.shape)} there, {tuple(want.shape)} here"
    extra = sorted(state.keys() - mine.keys())
    return f"{extra[0]} is {tuple(state[extra[0]].shape)} there, absent here" if extra else None


def check_model_shape(checkpoint: dict, module: torch.nn.Module, path: str) -> None:
    """Every weight of ``module`` must be in the checkpoint with its shape, and nothing else."""
    mismatch = _first_mismatch(checkpoint.get("state_dict", {}), module.state_dict())
    if mismatch is None:
        return
    theirs = (checkpoint.get("lightning_mamba") or {}).get("mamba_config")
    settings = ""
    if theirs is not None and hasattr(module, "config"):
        a, b = _shape_settings(theirs), _shape_settings(module.config.to_dict())
        settings = ", ".join(f"model.{k}={a[k]} there, {b[k]} here" for k in a if a[k] != b[k])
    detail = f"{settings} ({mismatch})" if settings else mismatch
    raise ConfigError(f"checkpoint {path} was saved for a different model shape: {detail}: use the model "
                      f"settings it was trained with, or start without --ckpt_path")


def check_intact(checkpoint: dict, path: str) -> None:
    """The pieces of a checkpoint that this project writes (and its data module's training position) must be what it
    writes: a hand-edited or damaged field is one line that names it, not a traceback from the code that reads it."""
    problem = _damage(checkpoint)
    if problem:
        raise ConfigError(f"checkpoint {path} is damaged: {problem}: use another one (e.g. a step=*.ckpt beside "
                          f"it)")


def _damage(ckpt: dict) -> str | None:
    """The first field of ``ckpt`` not of the type it is written with, and its value; None if there is none."""
    meta = ckpt.get("lightning_mamba")
    objects = {key: ckpt.get(key) for key in ("hyper_parameters", "lightning_mamba", "lr_schedule")}
    objects["lightning_mamba.mamba_config"] = meta.get("mamba_config") if isinstance(meta, dict) else None
    counts = {"tokens_trained": ckpt.get("tokens_trained")}
    if isinstance(ckpt.get("lr_schedule"), dict):
        counts["lr_schedule.total_steps"] = ckpt["lr_schedule"].get("total_steps")
    for name, state in ckpt.items():  # the data module's state, under its class name: the training position
        if isinstance(state, dict) and "train_sampler" in state:
            sampler = objects[f"{name}.train_sampler"] = state["train_sampler"]
            if isinstance(sampler, dict):
                counts.update({f"{name}.train_sampler.{k}": sampler.get(k) for k in POSITION_KEYS})
    for field, value in objects.items():
        if value is not None and not isinstance(value, dict):
            return f"{field} is {value!r:.40}, not a dict"
    for field, value in counts.items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            return f"{field} is {value!r:.40}, not a whole number >= 0"
    spec = meta.get("tokenizer") if isinstance(meta, dict) else None
    if spec is not None:
        try:
            tokenizer_from_spec(spec)
        except DataError as e:
            return f"lightning_mamba.tokenizer: {e}"
    return None


# ---- fit/validate/test --ckpt_path, before LightningCLI reads it ---------------------------------------
LIGHTNING_CKPT_ALIASES = ("last", "best", "hpc", "registry")


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def check_resume(path: str, given: dict, kept: tuple[str, ...] = (), tokenizer: str | None = None,
                 bpe_vocab_size: int | None = None) -> int | None:
    """``--ckpt_path`` must be a readable checkpoint of a model with the shape the run's settings give; returns the
    step it was saved at (None for Lightning's aliases, which Lightning resolves).

    LightningCLI replaces the model settings by those saved in the checkpoint: without this check a
    different shape given on the command line or in a config would be dropped silently. Other model
    settings (lr, schedule, backend, ...) are still taken from the checkpoint, with a warning naming them,
    except those in ``kept`` (the caller keeps the given value)."""
    if path.split(":")[0] in LIGHTNING_CKPT_ALIASES or "://" in path:
        return None  # resolved by Lightning itself
    if os.path.isdir(path):  # e.g. an exported directory: its weights start a run through --model.pretrained
        raise ConfigError(f"checkpoint {path} is a directory: --ckpt_path takes a .ckpt written by a run "
                          f"(e.g. runs/<name>/version_<n>/checkpoints/last.ckpt); to start from the weights of a "
                          f"checkpoint directory, give it as --model.pretrained {path}")
    if not os.path.isfile(path):
        raise ConfigError(f"checkpoint {path} does not exist: give a .ckpt written by a run "
                          f"(e.g. runs/<name>/version_<n>/checkpoints/last.ckpt)")
    try:
        checkpoint = torch_load(path)
    except ConfigError:
        raise
    except Exception as e:  # torch's own messages talk about weights_only and zip files: not the point here
        raise ConfigError(f"checkpoint {path} cannot be read ({type(e).__name__}): it is truncated, damaged or not a "
                          f"PyTorch checkpoint; resume from another one (e.g. a step=*.ckpt beside it)") from e
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise ConfigError(f"checkpoint {path} is not a Lightning checkpoint (no state_dict): give a .ckpt written "
                          f"by lightning-mamba fit")
    check_intact(checkpoint, path)
    # ``tokenizer``: the run's data.tokenizer; byte against BPE is told here, before a BPE is trained for nothing
    check_tokenizer_kind((checkpoint.get("lightning_mamba") or {}).get("tokenizer"), tokenizer, f"checkpoint {path}",
                         bpe_vocab_size)
    saved = checkpoint.get("hyper_parameters") or {}
    # (not model.pretrained: a resume takes the checkpoint's weights, so the file a fine-tune started from is a record)
    shape = [k for k in (*SHAPE_SETTINGS, *SSM_SHAPE_SETTINGS) if k != "vocab_size"]
    differ = [k for k in given if k in saved and k != "vocab_size" and _plain(given[k]) != _plain(saved[k])]
    if any(k in shape for k in differ):
        detail = ", ".join(f"model.{k}={saved[k]} there, {given[k]} here" for k in differ if k in shape)
        raise ConfigError(f"checkpoint {path} was saved for a different model shape: {detail}: use the model "
                          f"settings it was trained with (its run's config.yaml), or start without --ckpt_path")
    replaced = [k for k in differ if k not in kept]
    if replaced:
        rank_zero_warn("resuming from " + path + ": the checkpoint's model settings replace those given here: "
                       + ", ".join(f"model.{k}={saved[k]} (not {given[k]})" for k in replaced))
    return int(checkpoint.get("global_step") or 0)


# ---- one entry point for the commands and --model.pretrained: a .ckpt or a checkpoint directory ------------------------------------------------------
def model_config(
    d_model: int = TRAIN_DEFAULTS.d_model,
    n_layer: int = TRAIN_DEFAULTS.n_layer,
    d_state: int = TRAIN_DEFAULTS.d_state,
    headdim: int = SSM_DEFAULTS.headdim,
    expand: int = SSM_DEFAULTS.expand,
    d_conv: int = SSM_DEFAULTS.d_conv,
    ngroups: int = SSM_DEFAULTS.ngroups,
    chunk_size: int = SSM_DEFAULTS.chunk_size,
    quadratic_max_len: int = SSM_DEFAULTS.quadratic_max_len,
    save_chunk_states: bool = SSM_DEFAULTS.save_chunk_states,
    recompute_norm_output: bool = SSM_DEFAULTS.recompute_norm_output,
    dt_min: float = SSM_DEFAULTS.dt_min,
    dt_max: float = SSM_DEFAULTS.dt_max,
    A_init_range: tuple[float, float] = SSM_DEFAULTS.A_init_range,
    dt_limit: tuple[float, float] = SSM_DEFAULTS.dt_limit,
    vocab_size: int = TRAIN_DEFAULTS.vocab_size,
    pad_vocab_size_multiple: int = MambaConfig.pad_vocab_size_multiple,
    tie_embeddings: bool = MambaConfig.tie_embeddings,
    **_other: Any,
) -> MambaConfig:
    """The MambaConfig of the flat model settings (``MambaLitModule``'s arguments, its checkpoints'
    hyper_parameters), with its defaults for those left out; the other settings (lr, ...) are ignored."""
    return MambaConfig(
        d_model=d_model,
        n_layer=n_layer,
        vocab_size=vocab_size,
        ssm_cfg={"layer": "Mamba2", "d_state": d_state, "d_conv": d_conv, "expand": expand, "headdim": headdim,
                 "ngroups": ngroups, "chunk_size": chunk_size, "quadratic_max_len": quadratic_max_len,
                 "save_chunk_states": save_chunk_states, "recompute_norm_output": recompute_norm_output,
                 "dt_min": dt_min, "dt_max": dt_max, "A_init_range": tuple(A_init_range), "dt_limit": tuple(dt_limit)},
        pad_vocab_size_multiple=pad_vocab_size_multiple,
        tie_embeddings=tie_embeddings,
    )


def _model_from_hparams(hparams: dict | None, backend: str, path: str) -> MambaLM:
    """Checkpoints without our metadata: rebuild from the LightningModule's hyper_parameters."""
    if not hparams:
        raise ConfigError(f"{path} records neither lightning_mamba.mamba_config nor hyper_parameters: "
                          "cannot rebuild the model")
    return MambaLM(model_config(**{k: v for k, v in hparams.items() if isinstance(k, str)}), backend=backend)


def load_model(path: str, backend: str = "auto", dtype: torch.dtype = torch.float32) -> tuple[MambaLM, dict]:
    """A Lightning .ckpt of this project or a checkpoint directory -> (model, meta).

    meta: ``mamba_config`` and, where recorded, ``seq_len``, ``tokenizer`` (a spec dict), ``trained_steps`` and
    ``trained_tokens`` (training_done), and ``passkey`` (trained_passkey; an export keeps it)."""
    if os.path.isfile(path) and os.path.basename(path) in (CONFIG, WEIGHTS, SAFETENSORS):
        path = os.path.dirname(path) or "."
    if os.path.isdir(path):
        model = load_pretrained(path, backend, dtype)
        meta = read_meta(path)
        meta.pop("tokenizer", None)
        spec = load_tokenizer_spec(path)
        if spec is not None:
            meta["tokenizer"] = spec
    elif os.path.isfile(path):
        ckpt = read_lightning_checkpoint(path)
        meta = {**(ckpt.get("lightning_mamba") or {}), **training_done(ckpt), **trained_passkey(ckpt)}
        if "mamba_config" in meta:
            model = MambaLM(MambaConfig.from_dict(meta["mamba_config"]), backend=backend)
        else:
            model = _model_from_hparams(ckpt.get("hyper_parameters"), backend, path)
        # The LightningModule holds the MambaLM as self.model; other entries are metrics' buffers.
        state = {k[len("model."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
        load_weights(model.to(dtype), state, path)
    else:
        raise ConfigError(f"{path} does not exist")
    meta.setdefault("mamba_config", model.config.to_dict())
    return model, meta


def read_lightning_checkpoint(path: str) -> dict:
    """A Lightning .ckpt as a dict (with its state_dict), or one line saying why not. Tensors and plain values only:
    a .ckpt from elsewhere must not run code."""
    try:
        ckpt = torch_load(path)
    except ConfigError:
        raise
    except Exception as e:
        raise ConfigError(f"{path} cannot be read as a checkpoint ({type(e).__name__}: {str(e).splitlines()[0]})") from e
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise ConfigError(f"{path} is not a Lightning checkpoint (no state_dict): pass a .ckpt or a directory "
                          "with config.json")
    check_intact(ckpt, path)
    return ckpt


# ---- --model.pretrained, before the classes are built: the run takes the checkpoint's shape and training length -----
# MambaLitModule's model settings (its arguments, a checkpoint's hyper_parameters) that a pretrained model fixes: the
# MambaConfig ones (model_config's arguments) but vocab_size, which the CLI links from the tokenizer.
PRETRAINED_SETTINGS = tuple(k for k, p in inspect.signature(model_config).parameters.items()
                            if p.kind == p.POSITIONAL_OR_KEYWORD and k != "vocab_size")


def flat_settings(config: MambaConfig) -> dict:
    """The flat model settings (``model.<name>``, as MambaLitModule takes them) that give ``config``."""
    mixer = config.mixer
    return {k: mixer[k] if k in mixer else getattr(config, k) for k in PRETRAINED_SETTINGS}


def pretrained_meta(path: str) -> dict:
    """What a ``--model.pretrained`` checkpoint records, without building the model: load_model's meta (``mamba_config``
    and, where known, ``seq_len``, ``tokenizer``, ``data``) and, for a .ckpt, ``trained_steps`` and ``trained_tokens``
    (its run's global_step and tokens_trained)."""
    if os.path.isfile(path) and os.path.basename(path) in (CONFIG, WEIGHTS, SAFETENSORS):
        path = os.path.dirname(path) or "."
    if os.path.isdir(path):
        meta = read_meta(path)
        meta["mamba_config"] = read_config(path)[0].to_dict()
        spec = load_tokenizer_spec(path)
        if spec is not None:  # a tokenizer.json that is JSON but no tokenizer: refused now, not in the run's setup
            tokenizer_from_spec(spec)
        return meta
    if not os.path.isfile(path):
        raise ConfigError(f"model.pretrained={path} does not exist: give a run's .ckpt (runs/<name>/version_<n>/"
                          f"checkpoints/last.ckpt) or a directory with config.json")
    ckpt = read_lightning_checkpoint(path)
    meta = {**(ckpt.get("lightning_mamba") or {}), **training_done(ckpt)}
    if "mamba_config" not in meta:
        hparams = {k: v for k, v in (ckpt.get("hyper_parameters") or {}).items() if isinstance(k, str)}
        meta["mamba_config"] = model_config(**hparams).to_dict()
    return meta


def training_done(ckpt: dict) -> dict:
    """A .ckpt's training so far (its run's global_step and tokens_trained, beside the model's metadata) as
    ``trained_steps`` / ``trained_tokens``: what --model.pretrained's line reports, and an export keeps."""
    done = {"trained_steps": ckpt.get("global_step"), "trained_tokens": ckpt.get("tokens_trained")}
    return {k: v for k, v in done.items() if v is not None}


def trained_passkey(ckpt: dict) -> dict:
    """The passkey prompt a .ckpt's run trained on (its data module's data.passkey_template and data.passkey_digits,
    which Lightning keeps in datamodule_hyper_parameters) as ``passkey``: what ``lightning-mamba passkey`` scores the
    model with by default. {} for a run without passkey training data."""
    data = ckpt.get("datamodule_hyper_parameters") or {}
    if "passkey_template" not in data:
        return {}
    return {"passkey": {"template": data["passkey_template"], "digits": data.get("passkey_digits", 5)}}


def _count(n: int) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return str(n)


def describe_pretrained(path: str, meta: dict) -> str:
    """The one line ``--model.pretrained`` prints: what was loaded (shape, training done, training length)."""
    config = MambaConfig.from_dict(meta["mamba_config"])
    steps, tokens = meta.get("trained_steps"), meta.get("trained_tokens")
    trained = ", ".join(x for x in (f"{steps} steps" if steps is not None else "",
                                    f"{_count(tokens)} tokens" if tokens is not None else "") if x)
    return (f"pretrained: loaded {path}: n_layer {config.n_layer} x d_model {config.d_model}, d_state "
            f"{config.mixer['d_state']}, headdim {config.mixer['headdim']}, vocabulary {config.vocab_size}; trained "
            f"{trained or 'for an unrecorded number of steps'} at seq_len "
            f"{meta['seq_len'] if meta.get('seq_len') is not None else 'unknown (not recorded)'}")


def settle_pretrained(path: str, model: dict, data: dict, typed: set[str], state_passing: bool,
                      meta: dict | None = None) -> tuple[dict, dict, list[str]]:
    """What ``--model.pretrained path`` changes in the run's settings before anything is built.

    ``model``/``data``: the run's model and data settings; ``typed``: the setting names (``model.d_state``,
    ``data.seq_len``) the user typed. Returns (model updates, data updates, lines to print):

    * the model is the checkpoint's: a typed model setting that differs is refused; the others are set to the
      checkpoint's, so that the run's config.yaml and hyper_parameters record the model actually trained;
    * the training length: untyped, ``data.seq_len`` becomes the one the checkpoint was trained at; typed and
      different, a line says so, and the state-passing recipe (which post-trains at the model's length) refuses it.
    """
    meta = pretrained_meta(path) if meta is None else meta
    theirs = flat_settings(MambaConfig.from_dict(meta["mamba_config"]))
    differ = [k for k in PRETRAINED_SETTINGS if k in model and _plain(model[k]) != _plain(theirs[k])]
    # the scan's speed-only settings, typed, are the run's own: same weights, same results
    faster = [k for k in differ if f"model.{k}" in typed and k in SPEED_ONLY_SETTINGS]
    differ = [k for k in differ if k not in faster]
    wrong = [k for k in differ if f"model.{k}" in typed]
    if wrong:
        detail = ", ".join(f"model.{k}={_plain(theirs[k])} there, {_plain(model[k])} typed" for k in wrong)
        raise ConfigError(f"model.pretrained={path} fixes the model's shape: {detail}: drop "
                          f"{' '.join('--model.' + k for k in wrong)} (or start without --model.pretrained)")
    model_updates = {k: theirs[k] for k in differ}
    check_tokenizer_kind(meta.get("tokenizer"), data.get("tokenizer"), f"model.pretrained={path}",
                         data.get("bpe_vocab_size"))
    lines = [describe_pretrained(path, meta)]
    lines += [f"model.{k}={_plain(model[k])} as typed (the checkpoint's: {_plain(theirs[k])}; the scan's speed only)"
              for k in faster]
    data_updates = {}
    trained_len, seq_len = meta.get("seq_len"), data.get("seq_len")
    if trained_len is not None and seq_len is not None and seq_len != trained_len:
        if "data.seq_len" not in typed:
            data_updates["seq_len"] = trained_len
            lines.append(f"data.seq_len={trained_len}: the length {path} was trained at (not {seq_len} as configured; "
                         f"type --data.seq_len N to train at another)")
        elif state_passing:
            raise ConfigError(f"model.pretrained={path} was trained at seq_len {trained_len}, but --data.seq_len "
                              f"{seq_len} was typed: state-passing post-training runs at the model's training length: "
                              f"type --data.seq_len {trained_len} (or leave it out)")
        else:
            lines.append(f"data.seq_len={seq_len} as typed: {path} was trained at seq_len {trained_len}")
    return model_updates, data_updates, lines
