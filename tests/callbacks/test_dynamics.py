"""DecayDynamicsCallback's measurements: A, dt and alpha_T per head, checked against hand-set parameters."""

import math

import numpy as np
import pytest
import torch

from lightning_mamba.callbacks.dynamics import decay_dynamics, mixers, summarize
from tests.tiny import tiny_lm


def set_heads(lm, A: list[float], dt: list[float]) -> None:
    for m in mixers(lm):
        m.A_log.data = torch.log(torch.tensor(A, dtype=m.A_log.dtype))
        m.dt_bias.data = torch.log(torch.expm1(torch.tensor(dt, dtype=m.dt_bias.dtype)))  # softplus^-1


def test_alpha_T_from_the_parameters():
    lm = tiny_lm()  # 2 layers, 4 heads each
    heads = mixers(lm)[0].A_log.numel()
    A = [1e-4, 1e-2, 1.0, 8.0][:heads]
    dt = [0.01] * heads
    set_heads(lm, A, dt)
    T = 64
    dyn = decay_dynamics(lm, T)
    want = [math.exp(-a * d * T) for a, d in zip(A, dt)]
    assert np.allclose(dyn["alpha_T_bias"][1], want, rtol=1e-6)
    assert np.allclose(dyn["A"][0], [-a for a in A], rtol=1e-6)
    s = summarize(dyn, 0.99)
    # alpha_T above 0.99: A = 1e-4 (0.99994) and 1e-2 (0.9936); not A = 1 (0.527) nor 8 (0.006); 2 layers
    assert s["dynamics/heads_alpha_T_bias_gt_0.99"] == 2 * 2 and s["dynamics/heads"] == 2 * heads
    assert s["dynamics/A_median"] == pytest.approx(-np.median(A))
    assert "dynamics/alpha_T_median" not in s  # no probe rows: the parameter view only


def test_the_probe_measures_the_dt_the_model_uses():
    lm = tiny_lm().train()  # as during training: the probe runs in eval mode and hands the mode back
    heads = mixers(lm)[0].A_log.numel()
    set_heads(lm, [0.5] * heads, [0.02] * heads)
    rows = torch.randint(0, 64, (2, 32), generator=torch.Generator().manual_seed(0))
    dyn = decay_dynamics(lm, 32, rows)
    assert not np.allclose(dyn["dt_mean"][0], dyn["dt_bias_softplus"][0])  # the input moves dt
    for m in mixers(lm):  # zero the input's share of dt: then dt = softplus(dt_bias) at every token
        m.in_proj.weight.data[-heads:] = 0
        if m.in_proj.bias is not None:
            m.in_proj.bias.data[-heads:] = 0
    dyn = decay_dynamics(lm, 32, rows)
    assert np.allclose(dyn["dt_mean"], dyn["dt_bias_softplus"], rtol=1e-6)
    assert np.allclose(dyn["alpha_T"], dyn["alpha_T_bias"], rtol=1e-6)
    assert dyn["probe_tokens"] == 64 and lm.training
