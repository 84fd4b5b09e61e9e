"""Model config with the fields of the official ``config.json`` (mamba_ssm ``MambaConfig``)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from ..errors import UserError

NO_DT_LIMIT = (0.0, float("inf"))  # dt_limit that clamps nothing


@dataclass(frozen=True)
class SSMConfig:
    """The Mamba2 mixer's settings (``ssm_cfg``) with the official mamba_ssm ``Mamba2`` defaults: the one place
    they are written. ``Mamba2`` and ``MambaLitModule`` take their defaults from :data:`SSM_DEFAULTS`, and an
    official config.json's ``ssm_cfg`` only holds what differs from these, so they must stay the official ones."""

    d_state: int = 128
    d_conv: int = 4
    conv_init: float | None = None  # the conv weights' init: U(-conv_init, conv_init), or nn.Conv1d's default when None
    expand: int = 2
    headdim: int = 64
    ngroups: int = 1
    A_init_range: tuple[float, float] = (1.0, 16.0)
    dt_min: float = 0.001
    dt_max: float = 0.1
    dt_init_floor: float = 1e-4
    dt_limit: tuple[float, float] = NO_DT_LIMIT
    bias: bool = False
    conv_bias: bool = True
    chunk_size: int = 256
    rmsnorm: bool = True
    norm_before_gate: bool = False
    # This project's own (not an official key, so never written to config.json): inputs of at most this many tokens
    # from a zero state take the SSD's attention form (ssd.ssd_quadratic) instead of the chunked scan; 0 = never.
    quadratic_max_len: int = 0
    # This project's own too: the chunked scan's backward reuses the forward's per-chunk states (b x chunks x heads x
    # headdim x d_state values a layer, kept until the backward) instead of recomputing them, on mamba_ssm's kernels.
    save_chunk_states: bool = False
    # This project's own too: the mixer keeps no copy of its input (in_proj's, the residual add + RMSNorm's output)
    # for the backward, which makes it again from the fp32 residual the norm keeps (on the Triton path, our norm).
    recompute_norm_output: bool = False


SSM_DEFAULTS = SSMConfig()
MIXER_DEFAULTS: dict[str, Any] = asdict(SSM_DEFAULTS)


@dataclass(frozen=True)
class TrainDefaults:
    """Where the model ``lightning-mamba fit`` builds when nothing is given (``MambaLitModule``'s defaults) departs
    from the official one: a small model that trains on a CPU, with the d_state of ``make train`` (STATE=64)."""

    d_model: int = 256
    n_layer: int = 4
    d_state: int = 64
    vocab_size: int = 8192


TRAIN_DEFAULTS = TrainDefaults()

# The settings that fix the weights' shapes, keys and sharing: MambaConfig fields, then ssm_cfg (SSMConfig) fields.
SHAPE_FIELDS = ("d_model", "n_layer", "vocab_size", "pad_vocab_size_multiple", "tie_embeddings")
SSM_SHAPE_FIELDS = ("d_state", "headdim", "expand", "d_conv", "ngroups", "bias", "conv_bias")

# Settings of the scan that change its speed and memory, never its results: a resumed run may change them.
SPEED_ONLY_SETTINGS = ("chunk_size", "quadratic_max_len", "save_chunk_states", "recompute_norm_output")

# This project's mixer settings that the official Mamba2 does not take: left out of an official config.json.
PROJECT_MIXER_KEYS = ("quadratic_max_len", "save_chunk_states", "recompute_norm_output")

# Official keys accepted and ignored: fused kernels and parallelism (use_mem_eff_path, sequence_parallel), Mamba2Simple's
# (learnable_init_states, activation); d_ssm and D_has_hdim change the weights away from their defaults, so
# MambaConfig.validate refuses other values.
IGNORED_MIXER_KEYS = {"layer", "use_mem_eff_path", "D_has_hdim", "d_ssm", "sequence_parallel", "learnable_init_states", "activation"}


class ConfigError(UserError, ValueError):
    """A model setting that cannot work; the message says what to change."""


@dataclass
class MambaConfig:
    d_model: int = 768
    d_intermediate: int = 0
    n_layer: int = 24
    vocab_size: int = 50277
    ssm_cfg: dict = field(default_factory=lambda: {"layer": "Mamba2"})
    attn_layer_idx: list = field(default_factory=list)
    attn_cfg: dict = field(default_factory=dict)
    rms_norm: bool = True
    residual_in_fp32: bool = True
    fused_add_norm: bool = True
    pad_vocab_size_multiple: int = 8
    tie_embeddings: bool = True

    def __post_init__(self) -> None:
        self.validate()

    # ---- derived sizes -------------------------------------------------
    @property
    def mixer(self) -> dict[str, Any]:
        """Mixer kwargs: official defaults overridden by ``ssm_cfg``."""
        cfg = dict(MIXER_DEFAULTS)
        cfg.update({k: v for k, v in self.ssm_cfg.items() if k not in IGNORED_MIXER_KEYS})
        return cfg

    @property
    def d_inner(self) -> int:
        return self.mixer["expand"] * self.d_model

    @property
    def nheads(self) -> int:
        return self.d_inner // self.mixer["headdim"]

    @property
    def padded_vocab_size(self) -> int:
        m = self.pad_vocab_size_multiple
        return self.vocab_size + (-self.vocab_size) % m

    def state_size(self, ssm_only: bool = False) -> int:
        """The paper's N_S for the whole model: L * (H*P*N + conv_dim*(d_conv-1)).

        ``ssm_only=True`` leaves the convolution state out (L*H*P*N)."""
        m = self.mixer
        ssm = self.d_inner * m["d_state"]
        conv = (self.d_inner + 2 * m["ngroups"] * m["d_state"]) * (m["d_conv"] - 1)
        return self.n_layer * (ssm if ssm_only else ssm + conv)

    # ---- checks ----------------------------------------------------------
    def validate(self) -> None:
        if not isinstance(self.ssm_cfg, dict):
            raise ConfigError(f"ssm_cfg must be an object of the mixer's settings (got {self.ssm_cfg!r:.40})")
        unknown = sorted(set(self.ssm_cfg) - set(MIXER_DEFAULTS) - IGNORED_MIXER_KEYS, key=str)
        if unknown:  # Mamba2(**mixer) would fail on them with a TypeError
            raise ConfigError(f"ssm_cfg has settings the Mamba2 mixer does not take: {', '.join(map(str, unknown))}: "
                              f"remove them (or fix their names; the mixer's: {', '.join(MIXER_DEFAULTS)})")
        m = self.mixer
        layer = self.ssm_cfg.get("layer", "Mamba2")
        if layer != "Mamba2":
            raise ConfigError(f"ssm_cfg.layer={layer!r} is not supported: this project implements Mamba2 layers only")
        if self.d_intermediate:
            raise ConfigError("d_intermediate must be 0 (MLP blocks are not implemented; pure Mamba-2 stacks only)")
        if self.attn_layer_idx:
            raise ConfigError("attn_layer_idx must be empty (hybrid attention layers are not implemented)")
        if self.rms_norm is not True:
            raise ConfigError(f"rms_norm must be true (got {self.rms_norm!r}): with rms_norm=false the official model "
                              "uses LayerNorm blocks, which are not implemented (RMSNorm only)")
        sizes = {name: getattr(self, name) for name in ("d_model", "n_layer", "vocab_size", "pad_vocab_size_multiple")}
        sizes.update({name: m[name] for name in ("d_state", "d_conv", "expand", "headdim", "ngroups", "chunk_size",
                                                  "quadratic_max_len")})
        for name, value in sizes.items():  # (a config.json may hold anything)
            if not _is_int(value):
                raise ConfigError(f"{name} must be a whole number (got {value!r})")
            if value < 1 and name != "quadratic_max_len":
                raise ConfigError(f"{name} must be >= 1 (got {value})")
        for name in ("dt_min", "dt_max", "A_init_range", "dt_limit"):
            values = m[name] if isinstance(m[name], (list, tuple)) else [m[name]]
            if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
                raise ConfigError(f"{name} must be numbers (got {m[name]!r})")
        conv_init = m["conv_init"]
        if conv_init is not None and not (isinstance(conv_init, (int, float)) and not isinstance(conv_init, bool)
                                          and conv_init > 0):
            raise ConfigError(f"conv_init must be a positive number or null (got {conv_init!r}): the conv weights' "
                              "init is U(-conv_init, conv_init), or nn.Conv1d's default when null")
        for name in ("save_chunk_states", "recompute_norm_output"):
            if not isinstance(m[name], bool):
                raise ConfigError(f"{name} must be true or false (got {m[name]!r})")
        if m["quadratic_max_len"] < 0:
            raise ConfigError(f"quadratic_max_len must be >= 0 (got {m['quadratic_max_len']}): 0 turns the "
                              "attention form of the scan off")
        if self.d_inner % m["headdim"]:
            raise ConfigError(
                f"headdim={m['headdim']} must divide d_inner = expand*d_model = {self.d_inner}: pick a headdim such as "
                f"{_divisor_hint(self.d_inner)}"
            )
        # official Mamba2 settings that are otherwise ignored (IGNORED_MIXER_KEYS) but change the weights away from
        # their defaults: refused there, so a model never differs from what its config.json says
        d_ssm = self.ssm_cfg.get("d_ssm")
        if d_ssm is not None and d_ssm != self.d_inner:
            raise ConfigError(f"ssm_cfg.d_ssm={d_ssm!r} is not supported: the SSM runs on all d_inner = expand*d_model "
                              f"= {self.d_inner} channels (official Mamba2 puts a gated MLP on the rest, not "
                              "implemented); leave d_ssm out")
        if self.ssm_cfg.get("D_has_hdim", False) is not False:
            raise ConfigError(f"ssm_cfg.D_has_hdim={self.ssm_cfg['D_has_hdim']!r} is not supported: D has one value "
                              "per head (the official default, false)")
        if self.nheads % m["ngroups"]:
            raise ConfigError(f"ngroups={m['ngroups']} must divide the number of heads ({self.nheads})")
        if not 0 < m["dt_min"] <= m["dt_max"]:
            raise ConfigError(f"dt_min={m['dt_min']} and dt_max={m['dt_max']} must satisfy 0 < dt_min <= dt_max")
        lo, hi = m["A_init_range"]
        if not 0 < lo <= hi:
            raise ConfigError(f"A_init_range={list(m['A_init_range'])} must be [low, high] with 0 < low <= high")
        if not 0 <= m["dt_limit"][0] < m["dt_limit"][1]:
            raise ConfigError(f"dt_limit={list(m['dt_limit'])} must be [low, high] with 0 <= low < high")
        if not m["rmsnorm"] or m["norm_before_gate"]:
            raise ConfigError("only rmsnorm=True, norm_before_gate=False (the official Mamba-2 setting) is implemented")

    # ---- io --------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MambaConfig:
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in d.items() if k in known})

    # config.json is written and read in one place: models/checkpoint.py (official_config, read_config)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _divisor_hint(n: int) -> str:
    divs = [d for d in (16, 32, 64, 128) if n % d == 0]
    return " or ".join(map(str, divs)) if divs else "a divisor of it"
