"""The official layout: state_dict keys and shapes, parameter count, N_S, clear config errors; defaults declared
once; the FLOPs estimate."""

import dataclasses
import inspect
import math

import pytest
import torch

from lightning_mamba.models import ConfigError, Mamba2, MambaConfig, MambaLM
from lightning_mamba.models.config import SHAPE_FIELDS, SSM_DEFAULTS, SSM_SHAPE_FIELDS, SSMConfig
from lightning_mamba.models.flops import matmul_params, train_flops_per_token


def official_shapes(d_model, n_layer, vocab, d_state=128, d_conv=4, expand=2, headdim=64, ngroups=1, pad=8):
    """Keys and shapes of mamba_ssm's MambaLMHeadModel, derived from docs/mamba2.md."""
    d_inner = expand * d_model
    nheads = d_inner // headdim
    conv_dim = d_inner + 2 * ngroups * d_state
    V = math.ceil(vocab / pad) * pad
    shapes = {"backbone.embedding.weight": (V, d_model), "backbone.norm_f.weight": (d_model,), "lm_head.weight": (V, d_model)}
    for i in range(n_layer):
        p = f"backbone.layers.{i}."
        shapes |= {
            p + "norm.weight": (d_model,),
            p + "mixer.dt_bias": (nheads,),
            p + "mixer.A_log": (nheads,),
            p + "mixer.D": (nheads,),
            p + "mixer.in_proj.weight": (2 * d_inner + 2 * ngroups * d_state + nheads, d_model),
            p + "mixer.conv1d.weight": (conv_dim, 1, d_conv),
            p + "mixer.conv1d.bias": (conv_dim,),
            p + "mixer.norm.weight": (d_inner,),
            p + "mixer.out_proj.weight": (d_model, d_inner),
        }
    return shapes


@pytest.mark.parametrize(
    "d_model,n_layer,vocab,ssm,pad",
    [(64, 2, 1000, {"d_state": 16, "headdim": 32}, 8), (96, 3, 257, {"d_state": 8, "headdim": 16, "ngroups": 2, "d_conv": 3}, 8)],
)
def test_state_dict_matches_official_layout(d_model, n_layer, vocab, ssm, pad):
    cfg = MambaConfig(d_model=d_model, n_layer=n_layer, vocab_size=vocab, ssm_cfg={"layer": "Mamba2", **ssm}, pad_vocab_size_multiple=pad)
    sd = MambaLM(cfg).state_dict()
    expected = official_shapes(d_model, n_layer, vocab, pad=pad, **ssm)
    assert {k: tuple(v.shape) for k, v in sd.items()} == expected


def test_official_130m_config():
    cfg = MambaConfig(d_model=768, n_layer=24, vocab_size=50277, pad_vocab_size_multiple=16)
    with torch.device("meta"):
        model = MambaLM(cfg)
    sd = model.state_dict()
    assert len(sd) == 219
    assert {k: tuple(v.shape) for k, v in sd.items()} == official_shapes(768, 24, 50277, pad=16)
    assert sum(p.numel() for p in model.parameters()) == 128_989_632  # 128.99M, embeddings tied
    assert cfg.padded_vocab_size == 50288
    assert round(cfg.state_size() / 1e6, 1) == 4.8 and cfg.state_size(ssm_only=True) == 24 * 1536 * 128


@pytest.mark.parametrize("n_layer,d_model,n_s", [(6, 512, 0.8), (12, 512, 1.6), (12, 768, 2.4), (48, 1024, 12.9), (48, 1536, 19.3)])
def test_state_size_reproduces_paper_table2(n_layer, d_model, n_s):
    # the paper truncates to one decimal (780M: 19.35M is printed as 19.3)
    assert abs(MambaConfig(d_model=d_model, n_layer=n_layer).state_size() / 1e6 - n_s) < 0.06


def test_init_follows_official():
    torch.manual_seed(0)
    cfg = MambaConfig(d_model=64, n_layer=4, vocab_size=100, ssm_cfg={"d_state": 16, "headdim": 16})
    m = MambaLM(cfg).backbone.layers[0].mixer
    A = torch.exp(m.A_log)
    assert A.min() >= 1 and A.max() <= 16
    dt = torch.nn.functional.softplus(m.dt_bias)
    assert dt.min() >= 1e-4 - 1e-7 and dt.max() <= 0.1 + 1e-6
    assert torch.all(m.D == 1) and torch.all(m.norm.weight == 1)
    bound = 1 / math.sqrt(m.d_inner) / math.sqrt(4)  # kaiming_uniform(a=sqrt 5) bound = 1/sqrt(fan_in), / sqrt(n_layer)
    assert m.out_proj.weight.abs().max() <= bound + 1e-7


@pytest.mark.parametrize(
    "kwargs,fragment",
    [
        ({"d_model": 100, "ssm_cfg": {"headdim": 64}}, "headdim=64 must divide d_inner"),
        ({"d_model": 64, "ssm_cfg": {"headdim": 16, "ngroups": 3}}, "ngroups=3 must divide"),
        ({"d_intermediate": 128}, "d_intermediate must be 0"),
        ({"ssm_cfg": {"layer": "Mamba1"}}, "Mamba2 layers only"),
        ({"ssm_cfg": {"d_state": 0}}, "d_state must be >= 1"),
        ({"ssm_cfg": {"quadratic_max_len": -1}}, "quadratic_max_len must be >= 0"),
        ({"ssm_cfg": {"save_chunk_states": "yes"}}, "save_chunk_states must be true or false"),
        ({"ssm_cfg": {"recompute_norm_output": 1}}, "recompute_norm_output must be true or false"),
        # what a hand-edited config.json may hold: one line, not a TypeError from a comparison or a layer
        ({"d_model": "x"}, r"d_model must be a whole number \(got 'x'\)"),
        ({"n_layer": 2.5}, r"n_layer must be a whole number \(got 2.5\)"),
        ({"ssm_cfg": {"d_state": "16"}}, r"d_state must be a whole number \(got '16'\)"),
        ({"ssm_cfg": {"dt_limit": ["a", 1.0]}}, r"dt_limit must be numbers \(got \['a', 1.0\]\)"),
    ],
)
def test_bad_config_says_what_to_change(kwargs, fragment):
    with pytest.raises(ConfigError, match=fragment):
        MambaConfig(**kwargs)


def test_config_json_round_trip(tmp_path):
    from lightning_mamba.atomic import atomic_write_json
    from lightning_mamba.models.checkpoint import official_config, read_config

    cfg = MambaConfig(d_model=64, n_layer=2, vocab_size=300, ssm_cfg={"layer": "Mamba2", "d_state": 16})
    atomic_write_json(str(tmp_path / "config.json"), official_config(cfg), allow_nan=False)
    back, _ = read_config(str(tmp_path))
    assert back.mixer == cfg.mixer and (back.d_model, back.n_layer, back.vocab_size) == (64, 2, 300)


@pytest.mark.parametrize("ssm_cfg,fragment", [
    ({"dt_min": 0.1, "dt_max": 0.01}, "0 < dt_min <= dt_max"),
    ({"dt_min": 0.0}, "0 < dt_min <= dt_max"),
    ({"A_init_range": (4.0, 2.0)}, "0 < low <= high"),
    ({"A_init_range": (0.0, 2.0)}, "0 < low <= high"),
    ({"dt_limit": (0.01, 0.001)}, "0 <= low < high"),
])
def test_init_ranges_are_checked(ssm_cfg, fragment):
    with pytest.raises(ConfigError, match=fragment):
        MambaConfig(d_model=32, n_layer=1, vocab_size=16, ssm_cfg={"layer": "Mamba2", "headdim": 16, **ssm_cfg})


# ---- every model default declared once (models/config.py) ----------------------------------------------------------
def test_mixer_takes_its_defaults_from_the_config():
    """Mamba2's signature holds SSM_DEFAULTS' own objects, not copies: a literal (an int aside, which Python
    shares) fails ``is``, so the defaults cannot drift apart."""
    params = inspect.signature(Mamba2.__init__).parameters
    settings = {f.name for f in dataclasses.fields(SSMConfig)}
    assert settings == set(params) - {"self", "d_model", "layer_idx", "backend"}  # every mixer setting declared
    for name in settings:
        want = getattr(SSM_DEFAULTS, name)
        assert params[name].default == want, name
        if not isinstance(want, int):
            assert params[name].default is want, name


def test_an_empty_ssm_cfg_builds_the_default_mixer():
    cfg = MambaConfig(d_model=64, n_layer=1, vocab_size=16, ssm_cfg={"layer": "Mamba2", "headdim": 16})
    mixer = MambaLM(cfg).backbone.layers[0].mixer
    assert cfg.mixer == {**dataclasses.asdict(SSM_DEFAULTS), "headdim": 16}
    assert (mixer.d_state, mixer.d_conv, mixer.ngroups, mixer.chunk_size, mixer.dt_limit) == (
        SSM_DEFAULTS.d_state, SSM_DEFAULTS.d_conv, SSM_DEFAULTS.ngroups, SSM_DEFAULTS.chunk_size, SSM_DEFAULTS.dt_limit)


def test_shape_fields_are_config_fields():
    assert set(SHAPE_FIELDS) <= {f.name for f in dataclasses.fields(MambaConfig)}
    assert set(SSM_SHAPE_FIELDS) <= {f.name for f in dataclasses.fields(SSMConfig)}


# a valid other value of every mixer setting outside SSM_SHAPE_FIELDS (rmsnorm, norm_before_gate: fixed by validate)
OTHER_VALUES = {"A_init_range": (2.0, 3.0), "dt_min": 0.01, "dt_max": 0.05, "dt_init_floor": 1e-3,
                "dt_limit": (0.0, 1.0), "chunk_size": 8, "quadratic_max_len": 64, "save_chunk_states": True,
                "recompute_norm_output": True, "conv_init": 0.05}


def test_settings_outside_the_shape_lists_change_no_weight():
    """SHAPE_FIELDS/SSM_SHAPE_FIELDS (checkpoint_io's shape check, load_weights' hint) must name every setting that
    changes a state_dict key or shape; a new mixer setting must be sorted into one of the two."""
    fixed = {"rmsnorm", "norm_before_gate"}
    assert set(OTHER_VALUES) == {f.name for f in dataclasses.fields(SSMConfig)} - set(SSM_SHAPE_FIELDS) - fixed

    def shapes(**ssm):
        cfg = MambaConfig(d_model=32, n_layer=1, vocab_size=16, ssm_cfg={"layer": "Mamba2", "headdim": 16, **ssm})
        return {k: tuple(v.shape) for k, v in MambaLM(cfg).state_dict().items()}

    base = shapes()
    for name, value in OTHER_VALUES.items():
        assert shapes(**{name: value}) == base, name
    for name, value in {"d_state": 8, "headdim": 8, "expand": 3, "d_conv": 3, "ngroups": 2, "bias": True,
                        "conv_bias": False}.items():
        assert shapes(**{name: value}) != base, name


# ---- FLOPs estimate -----------------------------------------------------------------------------------------------
def test_train_flops_per_token_matches_a_hand_count():
    # d_model 4, expand 2 -> d_inner 8, headdim 2 -> 4 heads, d_state 2, 1 group, chunk 4, vocab 5 -> padded 8
    cfg = MambaConfig(d_model=4, n_layer=1, vocab_size=5, ssm_cfg={"layer": "Mamba2", "d_state": 2, "headdim": 2,
                                                                  "chunk_size": 4})
    in_proj = 4 * (2 * 8 + 2 * 2 + 4)  # z, x, B, C, dt
    out_proj = 8 * 4
    lm_head = 8 * 4
    assert matmul_params(cfg) == in_proj + out_proj + lm_head == 160
    ssd = 4 * (4 * (2 + 2) + 6 * 2 * 2)  # per head: Q (N + P) + 6 P N
    assert train_flops_per_token(cfg) == 6 * 160 + 3 * ssd == 1440
    assert train_flops_per_token(cfg, seq_len=3) == 1440  # quadratic_max_len 0: always chunked
    quad = MambaConfig(d_model=4, n_layer=1, vocab_size=5, ssm_cfg={"layer": "Mamba2", "d_state": 2, "headdim": 2,
                                                                   "chunk_size": 4, "quadratic_max_len": 3})
    assert train_flops_per_token(quad, seq_len=3) == 6 * 160 + 3 * 4 * 3 * (2 + 2)  # attention form: l (N + P)
    assert train_flops_per_token(quad, seq_len=4) == train_flops_per_token(quad) == 1440  # longer: chunked


@pytest.mark.parametrize("ssm", [{"d_state": 16, "headdim": 16}, {"d_state": 8, "headdim": 8, "ngroups": 2, "expand": 3}])
def test_matmul_params_are_the_built_models(ssm):
    cfg = MambaConfig(d_model=48, n_layer=2, vocab_size=100, ssm_cfg={"layer": "Mamba2", **ssm})
    model = MambaLM(cfg)
    proj = sum(p.numel() for n, p in model.named_parameters() if n.endswith("proj.weight"))
    assert matmul_params(cfg) == proj + model.lm_head.weight.numel()


def test_rms_norm_false_is_refused_not_built_as_rmsnorm():
    # official MambaConfig(rms_norm=False) builds LayerNorm blocks (weight and bias); building RMSNorm instead gave a
    # model that its own config.json describes wrongly (official from_pretrained then fails on the missing biases)
    with pytest.raises(ConfigError, match="rms_norm must be true"):
        MambaConfig(d_model=64, n_layer=1, vocab_size=16, rms_norm=False)


@pytest.mark.parametrize("ssm_cfg,fragment", [({"D_has_hdim": True}, "D_has_hdim"), ({"d_ssm": 64}, "d_ssm=64")])
def test_official_mixer_settings_that_change_the_weights_are_refused(ssm_cfg, fragment):
    # official Mamba2 gives D one value per channel with D_has_hdim, and with d_ssm < d_inner a gated MLP beside the
    # SSM: other weights than ours. These were dropped, so the model did not match its own config.json.
    with pytest.raises(ConfigError, match=fragment):
        MambaConfig(d_model=64, n_layer=1, vocab_size=16, ssm_cfg={"layer": "Mamba2", "headdim": 16, **ssm_cfg})


def test_official_mixer_settings_spelled_out_at_their_defaults_are_accepted():
    cfg = MambaConfig(d_model=64, n_layer=1, vocab_size=16,
                      ssm_cfg={"layer": "Mamba2", "headdim": 16, "D_has_hdim": False, "d_ssm": 128})
    assert MambaLM(cfg).backbone.layers[0].mixer.D.shape == (8,)
    cfg = MambaConfig(d_model=64, n_layer=1, vocab_size=16, ssm_cfg={"layer": "Mamba2", "headdim": 16, "d_ssm": None})
    assert MambaLM(cfg).backbone.layers[0].mixer.d_inner == 128


def test_conv_init_sets_the_conv_weights_range_as_official_mamba2():
    # official Mamba2(conv_init=c) draws the conv weights from U(-c, c); it was dropped (nn.Conv1d's bound 1/sqrt(d_conv))
    ssm = {"layer": "Mamba2", "headdim": 16, "d_state": 16}
    torch.manual_seed(0)
    conv = MambaLM(MambaConfig(d_model=64, n_layer=1, vocab_size=16, ssm_cfg={**ssm, "conv_init": 0.01})).backbone.layers[0].mixer.conv1d
    assert conv.weight.abs().max() <= 0.01 and conv.weight.abs().max() > 0.009
    default = MambaLM(MambaConfig(d_model=64, n_layer=1, vocab_size=16, ssm_cfg={**ssm, "conv_init": None}))
    assert default.backbone.layers[0].mixer.conv1d.weight.abs().max() > 0.1
    with pytest.raises(ConfigError, match="conv_init must be a positive number"):
        MambaConfig(d_model=64, n_layer=1, vocab_size=16, ssm_cfg={**ssm, "conv_init": "x"})
