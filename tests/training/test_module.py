import dataclasses
import inspect

import pytest
import torch

from lightning_mamba.models import ConfigError, MambaConfig
from lightning_mamba.models.config import SHAPE_FIELDS, SSM_DEFAULTS, TRAIN_DEFAULTS, SSMConfig, TrainDefaults
from lightning_mamba.models.flops import train_flops_per_token
from lightning_mamba.training.module import MambaLitModule


def tiny(**kw):
    args = dict(d_model=32, n_layer=2, d_state=8, headdim=16, chunk_size=16, vocab_size=64, backend="torch")
    return MambaLitModule(**{**args, **kw})


def test_no_weight_decay_on_ssm_params_norms_and_biases():
    module = tiny(weight_decay=0.1)
    decay, no_decay = module.parameter_groups()
    names = {id(p): n for n, p in module.model.named_parameters()}
    no_decay_names = {names[id(p)].split(".")[-2] + "." + names[id(p)].split(".")[-1] for p in no_decay["params"]}
    decay_names = {names[id(p)] for p in decay["params"]}
    assert {"mixer.A_log", "mixer.dt_bias", "mixer.D", "norm.weight", "conv1d.bias", "norm_f.weight"} <= no_decay_names
    assert all(n.endswith(("in_proj.weight", "out_proj.weight", "conv1d.weight", "embedding.weight")) for n in decay_names)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    n_params = sum(1 for _ in module.model.parameters())
    assert len(decay["params"]) + len(no_decay["params"]) == n_params  # each (tied) parameter once


def test_model_step_is_next_token_cross_entropy():
    module = tiny()
    ids = torch.randint(0, 64, (2, 17))
    batch = {"input_ids": ids[:, :-1], "labels": ids[:, 1:]}
    logits, _ = module.model(batch["input_ids"])
    expected = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), batch["labels"].reshape(-1))
    torch.testing.assert_close(module.model_step(batch), expected)


@pytest.mark.parametrize("kw,fragment", [({"backend": "cuda"}, "unknown backend"), ({"schedule": "step"}, "model.schedule"),
                                         ({"headdim": 24}, "headdim=24 must divide")])
def test_bad_settings_say_what_to_change(kw, fragment):
    with pytest.raises((ConfigError, ValueError), match=fragment):
        tiny(**kw)


def test_triton_backend_without_cuda_is_a_clear_error():
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    with pytest.raises(ConfigError, match="backend 'triton' needs CUDA and mamba-ssm"):
        tiny(backend="triton")


def test_init_knobs_reach_the_mixers():
    import torch.nn.functional as F

    module = MambaLitModule(d_model=32, n_layer=2, d_state=8, headdim=16, chunk_size=16, vocab_size=64,
                            dt_min=1e-4, dt_max=2e-4, A_init_range=(1.0, 1.5), dt_limit=(0.0, 1e-3), backend="torch")
    for block in module.model.backbone.layers:
        mixer = block.mixer
        dt0 = F.softplus(mixer.dt_bias)
        assert ((dt0 > 0.9e-4) & (dt0 < 2.1e-4)).all()
        A = torch.exp(mixer.A_log)
        assert ((A >= 1.0 - 1e-6) & (A <= 1.5 + 1e-6)).all()
        assert mixer.dt_limit == (0.0, 1e-3)
    assert module.config.mixer["dt_limit"] == (0.0, 1e-3)  # recorded in the checkpoint's config too


# ---- model defaults: declared once in models/config.py --------------------------------------------------------------
def test_model_defaults_are_the_configs():
    """Each model argument's default is the config's own object (TRAIN_DEFAULTS where training departs from the
    official model, else SSM_DEFAULTS / MambaConfig): a literal (an int aside, which Python shares) fails ``is``."""
    params = inspect.signature(MambaLitModule.__init__).parameters
    train = {f.name for f in dataclasses.fields(TrainDefaults)}
    ssm = {f.name for f in dataclasses.fields(SSMConfig)}
    top = {f.name for f in dataclasses.fields(MambaConfig)}
    model_args = [n for n in params if n in train | ssm | top]
    assert set(model_args) >= train | set(SHAPE_FIELDS) | {"d_state", "chunk_size", "dt_min", "dt_max", "A_init_range"}
    for name in model_args:
        owner = TRAIN_DEFAULTS if name in train else SSM_DEFAULTS if name in ssm else MambaConfig
        want = getattr(owner, name)
        assert params[name].default == want, name
        if not isinstance(want, int):
            assert params[name].default is want, name


def test_training_defaults_only_hold_departures():
    """A TrainDefaults field equal to the official default would write that value twice."""
    official = {**dataclasses.asdict(SSM_DEFAULTS), **{f.name: f.default for f in dataclasses.fields(MambaConfig)}}
    for f in dataclasses.fields(TrainDefaults):
        assert getattr(TRAIN_DEFAULTS, f.name) != official[f.name], f.name


def test_the_default_module_builds_the_declared_model():
    config = MambaLitModule(backend="torch").config
    assert (config.d_model, config.n_layer, config.vocab_size) == (
        TRAIN_DEFAULTS.d_model, TRAIN_DEFAULTS.n_layer, TRAIN_DEFAULTS.vocab_size)
    assert config.mixer == {**dataclasses.asdict(SSM_DEFAULTS), "d_state": TRAIN_DEFAULTS.d_state}
    assert config.pad_vocab_size_multiple == MambaConfig.pad_vocab_size_multiple


def test_help_shows_the_declared_defaults(capsys):
    from lightning_mamba.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--help"])
    assert exit_.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    entry = lambda name: text[text.rindex(f"--model.{name} "):][:400]  # noqa: E731  (the last: below the usage)
    assert f"(type: int, default: {TRAIN_DEFAULTS.d_state})" in entry("d_state")
    assert f"default: {SSM_DEFAULTS.chunk_size})" in entry("chunk_size")
    assert f"default: {SSM_DEFAULTS.dt_min})" in entry("dt_min")


def test_flops_per_batch_is_tokens_times_the_estimate():
    module = tiny()
    assert module.flops_per_batch is None  # no batch seen yet
    ids = torch.randint(0, 64, (3, 40))
    module.on_train_batch_start({"input_ids": ids, "labels": ids}, 0)
    assert module.flops_per_batch == 3 * 40 * train_flops_per_token(module.config, seq_len=40)
    quadratic = tiny(quadratic_max_len=40)  # scanned in the attention form: fewer FLOPs than padded chunks
    quadratic.on_train_batch_start({"input_ids": ids, "labels": ids}, 0)
    assert quadratic.flops_per_batch == 3 * 40 * train_flops_per_token(quadratic.config, seq_len=40)
    assert quadratic.flops_per_batch != module.flops_per_batch


def test_the_training_step_asks_the_scan_for_no_final_state(monkeypatch):
    """model_step (train/val/test) drops the state, so the attention-form scan must not build one (memory)."""
    from lightning_mamba.models.kernels import backend

    calls, original = [], backend.ssd_quadratic

    def counted(*args, **kwargs):
        calls.append(kwargs["return_final_state"])
        return original(*args, **kwargs)

    monkeypatch.setattr(backend, "ssd_quadratic", counted)
    module = tiny(quadratic_max_len=40)
    ids = torch.randint(0, 64, (3, 40))
    assert torch.isfinite(module.model_step({"input_ids": ids, "labels": ids}))
    assert calls == [False, False]  # both layers, no state
