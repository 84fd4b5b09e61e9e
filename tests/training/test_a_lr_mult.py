"""model.a_lr_mult: A_log and dt_bias train at lr x mult in a group of their own (no weight decay), the rest at lr."""

import math

import pytest
import torch

from lightning_mamba.cli import main
from lightning_mamba.models import ConfigError
from lightning_mamba.training.module import MambaLitModule

LR = 1e-3


def module(**kw) -> MambaLitModule:
    return MambaLitModule(d_model=32, n_layer=2, d_state=16, headdim=16, chunk_size=16, vocab_size=64,
                          backend="torch", lr=LR, **kw)


def lr_and_decay_by_name(m: MambaLitModule) -> dict[str, tuple[float, float]]:
    """What the optimizer configure_optimizers builds gives each named parameter: (lr, weight decay)."""
    optimizer = torch.optim.AdamW(m.parameter_groups(), lr=m.hparams.lr)
    of = {id(p): (g["lr"], g["weight_decay"]) for g in optimizer.param_groups for p in g["params"]}
    return {n: of[id(p)] for n, p in m.model.named_parameters()}


def test_a_log_and_dt_bias_get_lr_times_mult():
    m = module(a_lr_mult=10.0, weight_decay=0.1)
    got = lr_and_decay_by_name(m)
    rates = {n for n in got if n.endswith((".A_log", ".dt_bias"))}
    assert len(rates) == 2 * 2  # per layer
    assert all(got[n] == (pytest.approx(10 * LR), 0.0) for n in rates)
    others = {n: v for n, v in got.items() if n not in rates}
    assert all(lr == LR for lr, _ in others.values())
    assert {n for n, (_, wd) in others.items() if wd == 0.0} >= {n for n in others if n.endswith((".D", "norm.weight"))}
    assert any(wd == 0.1 for _, wd in others.values())  # weight decay stays on the matrices
    assert m.hparams.a_lr_mult == 10.0  # saved: config.yaml and the checkpoint carry it
    assert len(m.parameter_groups()) == 3


def test_mult_one_keeps_the_two_groups_of_before():
    m = module()
    assert m.hparams.a_lr_mult == 1.0 and len(m.parameter_groups()) == 2
    assert all(lr == LR for lr, _ in lr_and_decay_by_name(m).values())


@pytest.mark.parametrize("mult", [0.0, -1.0, math.nan])
def test_non_positive_mult_is_refused(mult):
    with pytest.raises(ConfigError) as e:
        module(a_lr_mult=mult)
    assert "model.a_lr_mult must be > 0" in str(e.value) and "\n" not in str(e.value)


def test_the_cli_refuses_it_in_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["fit", "--model.a_lr_mult", "0", "--data.tokenizer", "byte", "--data.cache_dir", str(tmp_path),
              "--trainer.default_root_dir", str(tmp_path)])
    message = str(e.value.code)
    assert message.startswith("error: model.a_lr_mult must be > 0") and "\n" not in message
