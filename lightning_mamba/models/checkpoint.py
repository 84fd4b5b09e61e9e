"""Moving weights in and out of checkpoint directories: the official layout and HF transformers' Mamba2 layout.
(Lightning .ckpt files are read by ``training.checkpoint_io.load_model``.)

A checkpoint directory in the official layout (what ``mamba_ssm``'s ``MambaLMHeadModel.from_pretrained`` reads):
``config.json`` (the official ``MambaConfig`` fields) + ``pytorch_model.bin`` (``torch.save`` of the state_dict,
``lm_head.weight`` included even when tied). This project adds ``lightning_mamba.json`` (tokenizer spec, seq_len)
and, for a tokenizers-library tokenizer, ``tokenizer.json``.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import re
import sys
from typing import Any

import torch
from torch import Tensor

from ..atomic import atomic_write, atomic_write_json
from .config import (
    MIXER_DEFAULTS,
    NO_DT_LIMIT,
    PROJECT_MIXER_KEYS,
    SHAPE_FIELDS,
    SSM_SHAPE_FIELDS,
    ConfigError,
    MambaConfig,
)
from .lm import MambaLM

CONFIG, WEIGHTS, SAFETENSORS, META, TOKENIZER = (
    "config.json", "pytorch_model.bin", "model.safetensors", "lightning_mamba.json", "tokenizer.json")
# The fields of the official MambaConfig (mamba_ssm/models/config_mamba.py): from_pretrained does
# MambaConfig(**config_json), so config.json must hold these and nothing else.
OFFICIAL_FIELDS = ("d_model", "d_intermediate", "n_layer", "vocab_size", "ssm_cfg", "attn_layer_idx", "attn_cfg",
                   "rms_norm", "residual_in_fp32", "fused_add_norm", "pad_vocab_size_multiple", "tie_embeddings")
# HF transformers' Mamba2Config names of the mixer settings -> ours (ssm_cfg).
HF_SSM_NAMES = {"state_size": "d_state", "conv_kernel": "d_conv", "expand": "expand", "head_dim": "headdim",
                "n_groups": "ngroups", "chunk_size": "chunk_size", "use_bias": "bias", "use_conv_bias": "conv_bias",
                "time_step_min": "dt_min", "time_step_max": "dt_max", "time_step_floor": "dt_init_floor",
                "time_step_limit": "dt_limit"}
# HF transformers' Mamba2Config defaults, for fields a config.json leaves out: for the mixer settings they are the
# official ones (models/config.py) except n_groups.
HF_DEFAULTS: dict[str, Any] = {
    **{hf: MIXER_DEFAULTS[ours] for hf, ours in HF_SSM_NAMES.items()}, "n_groups": 8,
    "hidden_size": 4096, "num_hidden_layers": 64, "vocab_size": 32768, "num_heads": 128, "residual_in_fp32": True,
    "tie_word_embeddings": False, "layer_norm_epsilon": 1e-5, "hidden_act": "silu",
}
HF_RENAMES = {"backbone.embeddings.weight": "backbone.embedding.weight"}


# ---- writing ----------------------------------------------------------------------------------------
# Strict JSON has no Infinity: a non-default infinite setting (dt_limit=(0.01, inf)) is written as the largest
# float, which clamps nothing either, and read back as inf (``_from_json``).
FLOAT_MAX = sys.float_info.max


def _to_json(x: Any) -> Any:
    """Strict-JSON-able: +-inf -> +-FLOAT_MAX, NaN -> None, tuples -> lists."""
    if isinstance(x, dict):
        return {k: _to_json(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_to_json(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None if math.isnan(x) else math.copysign(FLOAT_MAX, x)
    return x


def _same(a: Any, b: Any) -> bool:
    """Equal settings, a JSON list and a tuple alike."""
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def official_config(config: MambaConfig) -> dict[str, Any]:
    """config.json as the official MambaConfig would dump it: ``layer`` explicit (its default is Mamba1), and like
    the official configs ``ssm_cfg`` names only what differs from the mixer's defaults (``MIXER_DEFAULTS``, the
    official ``Mamba2`` ones) - so the default ``dt_limit=(0.0, inf)`` is left out - and never this project's own settings
    (``PROJECT_MIXER_KEYS``: official Mamba2 refuses them). Strict JSON (``_to_json``)."""
    d = config.to_dict()
    d = {k: d[k] for k in OFFICIAL_FIELDS}
    ssm = {k: v for k, v in d["ssm_cfg"].items() if k != "layer" and k not in PROJECT_MIXER_KEYS
           and not (k in MIXER_DEFAULTS and _same(v, MIXER_DEFAULTS[k]))}
    d["ssm_cfg"] = {"layer": "Mamba2", **ssm}
    return _to_json(d)


def save_pretrained(model: MambaLM, directory: str, tokenizer_spec: dict | None = None,
                    extra: dict | None = None) -> list[str]:
    """Write ``model`` in the official layout (+ tokenizer, lightning_mamba.json); returns the paths written.
    Every JSON file is strict JSON (no NaN/Infinity), readable by any parser."""
    os.makedirs(directory, exist_ok=True)
    paths = [os.path.join(directory, name) for name in (CONFIG, WEIGHTS)]
    atomic_write_json(paths[0], official_config(model.config), indent=2, allow_nan=False)
    # Tied weights stay one shared tensor under two keys, as the official torch.save(state_dict()) has them (one
    # copy to the CPU per storage: moving each key apart would store a CUDA model's tied embedding twice).
    state, moved = {}, {}
    for k, v in model.state_dict().items():
        key = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape), tuple(v.stride()), v.dtype)
        if key not in moved:
            moved[key] = v.detach().cpu().contiguous()
        state[k] = moved[key]
    atomic_write(paths[1], lambda f: torch.save(state, f))
    spec = tokenizer_spec
    if spec is not None and spec.get("kind") == "json" and "json" in spec:
        # The tokenizer lives in tokenizer.json (where HF tools look for it); the spec points at it.
        text = spec["json"] if isinstance(spec["json"], str) else json.dumps(spec["json"], allow_nan=False)
        paths.append(os.path.join(directory, TOKENIZER))
        atomic_write(paths[-1], lambda f: f.write(text.encode()))
        spec = {**{k: v for k, v in spec.items() if k != "json"}, "file": TOKENIZER}
    paths.append(os.path.join(directory, META))
    atomic_write_json(paths[-1], _to_json({"tokenizer": spec, **(extra or {})}), indent=2, allow_nan=False)
    return paths


# ---- reading ----------------------------------------------------------------------------------------
def read_json(path: str) -> dict[str, Any]:
    """A checkpoint directory's JSON file: every one (config.json, lightning_mamba.json, an index) holds an object."""
    try:
        with open(path) as f:
            raw = json.load(f)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON ({e})") from e
    if not isinstance(raw, dict):  # valid JSON, but e.g. a list: .get() would fail with a traceback
        raise ConfigError(f"{path}: expected a JSON object, got {type(raw).__name__} {raw!r:.40}: re-export the "
                          f"checkpoint directory, or restore the file")
    return raw


def _hf_floats(x: Any) -> Any:
    """transformers >= 5 writes non-finite floats as {"__float__": "Infinity"} (older versions: bare Infinity)."""
    if isinstance(x, dict):
        return float(x["__float__"]) if set(x) == {"__float__"} else {k: _hf_floats(v) for k, v in x.items()}
    return [_hf_floats(v) for v in x] if isinstance(x, list) else x


def _config_from_hf(raw: dict[str, Any], path: str) -> MambaConfig:
    """HF transformers' Mamba2Config -> ours. HF pads nothing: its vocab_size is the embedding's row count."""
    c = {**HF_DEFAULTS, **_hf_floats(raw)}
    if c["hidden_size"] * c["expand"] != c["num_heads"] * c["head_dim"]:
        raise ConfigError(f"{path}: hidden_size * expand ({c['hidden_size'] * c['expand']}) must equal "
                          f"num_heads * head_dim ({c['num_heads'] * c['head_dim']})")
    if c["hidden_act"] != "silu" or abs(c["layer_norm_epsilon"] - 1e-5) > 1e-12:
        raise ConfigError(f"{path}: hidden_act={c['hidden_act']!r}, layer_norm_epsilon={c['layer_norm_epsilon']} "
                          "are not supported (this implementation uses silu and RMSNorm eps 1e-5)")
    ssm_cfg = {"layer": "Mamba2", **{ours: c[hf] for hf, ours in HF_SSM_NAMES.items()}}
    ssm_cfg["expand"] = int(ssm_cfg["expand"])
    ssm_cfg["dt_limit"] = tuple(ssm_cfg["dt_limit"])
    if ssm_cfg["dt_limit"] == NO_DT_LIMIT:
        del ssm_cfg["dt_limit"]  # the default: config.json stays free of Infinity
    return MambaConfig(d_model=c["hidden_size"], n_layer=c["num_hidden_layers"], vocab_size=c["vocab_size"],
                       ssm_cfg=ssm_cfg, residual_in_fp32=c["residual_in_fp32"], pad_vocab_size_multiple=1,
                       tie_embeddings=c["tie_word_embeddings"])


def read_config(directory: str) -> tuple[MambaConfig, dict[str, str]]:
    """The model config of a checkpoint directory (official or HF layout) and the key renames its weights need."""
    if not os.path.isdir(directory):
        raise ConfigError(f"{directory}: no such checkpoint directory")
    path = os.path.join(directory, CONFIG)
    if not os.path.isfile(path):
        raise ConfigError(f"{path} is missing: a checkpoint directory holds config.json + pytorch_model.bin "
                          "(or model.safetensors)")
    raw = read_json(path)
    model_type = raw.get("model_type")
    if model_type == "mamba2":
        return _config_from_hf(raw, path), HF_RENAMES
    if model_type is not None:
        raise ConfigError(f"{path}: model_type {model_type!r} is not supported (Mamba-2 checkpoints only)")
    ssm_cfg = raw.get("ssm_cfg") or {}
    if not isinstance(ssm_cfg, dict):
        raise ConfigError(f"{path}: ssm_cfg must be an object of the mixer's settings (got {ssm_cfg!r:.40}), e.g. "
                          f'{{"layer": "Mamba2", "d_state": 128}}')
    layer = ssm_cfg.get("layer", "Mamba1")  # the official default
    if layer != "Mamba2":
        raise ConfigError(f"{path}: ssm_cfg.layer is {layer!r}: this is not a Mamba-2 checkpoint "
                          "(only Mamba-2 layers are implemented)")
    try:
        return MambaConfig.from_dict({**raw, "ssm_cfg": _from_json(ssm_cfg)}), {}
    except ConfigError as e:  # name the file the setting is in
        raise ConfigError(f"{path}: {e}") from e


def _from_json(ssm_cfg: dict[str, Any]) -> dict[str, Any]:
    """ssm_cfg as written (``official_config``): pairs (dt_limit, A_init_range) back to tuples, +-FLOAT_MAX to inf."""
    def value(v: Any) -> Any:
        return math.copysign(math.inf, v) if isinstance(v, float) and abs(v) == FLOAT_MAX else v

    return {k: tuple(value(x) for x in v) if isinstance(MIXER_DEFAULTS.get(k), tuple) and isinstance(v, list)
            else value(v) for k, v in ssm_cfg.items()}


def torch_load(path: str) -> Any:
    """``torch.load`` that builds tensors and plain values only: a pickle may call any function while it loads, so a
    file asking for anything else is refused with one line (:class:`ConfigError`). Other failures are raised as is."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "Weights only load failed" not in str(e):
            raise
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        what = found.group(1) if found else "a Python object"
        raise ConfigError(f"{path} asks to build {what} while loading, which a checkpoint of this project never does: "
                          "refused, as loading it could run code; use a checkpoint written by lightning-mamba") from e


def _load_file(path: str) -> dict[str, Tensor]:
    if path.endswith(".safetensors"):
        try:
            from safetensors.torch import load_file
        except ImportError as e:
            raise ConfigError(f"{path} needs the safetensors package: pip install safetensors") from e
        return load_file(path)
    try:
        return torch_load(path)
    except ConfigError:
        raise
    except Exception as e:  # a truncated or foreign file
        raise ConfigError(f"{path} cannot be read as a state_dict ({type(e).__name__}: {str(e).splitlines()[0]})") from e


def read_weights(directory: str) -> dict[str, Tensor]:
    """pytorch_model.bin (the official file), else model.safetensors, else a sharded index of either."""
    for name in (WEIGHTS, SAFETENSORS):
        if os.path.isfile(os.path.join(directory, name)):
            return _load_file(os.path.join(directory, name))
    for name in (WEIGHTS, SAFETENSORS):
        index = os.path.join(directory, f"{name}.index.json")
        if os.path.isfile(index):
            weight_map = read_json(index).get("weight_map")
            if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
                raise ConfigError(f"{index}: expected a weight_map object (weight name -> shard file), got "
                                  f"{weight_map!r:.40}: restore the file, or download the checkpoint again")
            state: dict[str, Tensor] = {}
            for shard in sorted(set(weight_map.values())):
                state.update(_load_file(os.path.join(directory, shard)))
            return state
    raise ConfigError(f"{directory}: no weights found (expected {WEIGHTS} or {SAFETENSORS})")


def load_weights(model: MambaLM, state: dict[str, Tensor], source: str) -> MambaLM:
    """Strict load: every key present with its shape, nothing extra (a tied ``lm_head.weight`` may be absent)."""
    expected = model.state_dict()
    state = dict(state)
    if model.config.tie_embeddings and "backbone.embedding.weight" in state:
        embedding, head = state["backbone.embedding.weight"], state.get("lm_head.weight")
        # official checkpoints save the tied head too, equal to the embedding; a different one is an untied model
        # whose config says tied, and taking the embedding for it would change every logit without a word
        same = head is None or head.shape == embedding.shape and torch.allclose(
            head, embedding.to(head.dtype), rtol=0, atol=0, equal_nan=True)  # (a diverged model's NaNs are equal)
        if not same:
            raise ConfigError(f"{source}: the config ties the embeddings (tie_embeddings / tie_word_embeddings: true) "
                              "but lm_head.weight differs from backbone.embedding.weight: set it to false in "
                              "config.json if the model was trained with its own output head")
        state["lm_head.weight"] = embedding  # one tensor
    hint = (f"check that its config ({', '.join(SHAPE_FIELDS)}, ssm_cfg: {', '.join(SSM_SHAPE_FIELDS)}) is the one "
            f"it was trained with")
    for key, want in expected.items():
        got = state.get(key)
        if got is None or got.shape != want.shape:
            found = "missing from the checkpoint" if got is None else f"{tuple(got.shape)} in the checkpoint"
            raise ConfigError(f"{source}: this checkpoint was saved for a different model shape: {key} is {found} "
                              f"but {tuple(want.shape)} in the model; {hint}")
    for key, got in state.items():
        if key not in expected:
            raise ConfigError(f"{source}: this checkpoint was saved for a different model shape: unexpected key "
                              f"{key} {tuple(got.shape)} (absent from the model); {hint}")
    model.load_state_dict(state, strict=True)  # copy_ casts to the model's dtype
    return model


def load_pretrained(directory: str, backend: str = "auto", dtype: torch.dtype = torch.float32) -> MambaLM:
    """A MambaLM from an official-layout or HF-transformers-layout directory, cast to ``dtype``."""
    config, renames = read_config(directory)
    state = {renames.get(k, k): v for k, v in read_weights(directory).items()}
    return load_weights(MambaLM(config, backend=backend).to(dtype), state, directory)


def read_meta(directory: str) -> dict[str, Any]:
    """lightning_mamba.json of a checkpoint directory ({} when it has none), its training length checked: the
    commands and --model.pretrained compute with it (a hand-edited "seq_len": "2K" was a traceback there)."""
    path = os.path.join(directory, META)
    meta = dict(read_json(path)) if os.path.isfile(path) else {}
    seq_len = meta.get("seq_len")
    if seq_len is not None and (type(seq_len) is not int or seq_len < 1):
        raise ConfigError(f"{path}: seq_len must be the training length in tokens, a whole number >= 1, or null when "
                          f"unknown (got {seq_len!r:.40}): fix it, or re-export the checkpoint directory")
    return meta


def load_tokenizer_spec(directory: str) -> dict | None:
    """The tokenizer spec lightning_mamba.json records, else tokenizer.json (e.g. NeoX's next to an official download)."""
    meta_path, tok_path = os.path.join(directory, META), os.path.join(directory, TOKENIZER)
    spec = read_json(meta_path).get("tokenizer") if os.path.isfile(meta_path) else None
    if spec is not None and not isinstance(spec, dict):
        raise ConfigError(f"{meta_path}: tokenizer must be an object (got {spec!r:.40}): re-export the checkpoint "
                          f"directory")
    if spec and spec.get("kind") == "json" and "json" not in spec:
        file = os.path.join(directory, str(spec.get("file", TOKENIZER)))
        if not os.path.isfile(file):
            raise ConfigError(f"{meta_path} names the tokenizer file {file}, which is missing")
        spec = {**{k: v for k, v in spec.items() if k != "file"}, "json": _tokenizer_text(file)}
    if spec:
        return spec
    if os.path.isfile(tok_path):
        return {"kind": "json", "json": _tokenizer_text(tok_path)}
    return None


def _tokenizer_text(path: str) -> str:
    """A tokenizer.json's text, checked to be a JSON object: a damaged file is one line here, not a traceback from
    the tokenizers library when it is used (what else it must hold, that library checks)."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
        if not isinstance(json.loads(text), dict):
            raise ValueError("not a JSON object")
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise ConfigError(f"{path} cannot be read as a tokenizer ({str(e).splitlines()[0]}): re-export the "
                          f"checkpoint directory, or put the model's own tokenizer.json in its place") from e
    return text
