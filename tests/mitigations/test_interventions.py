"""RRI, dt scaling and state normalization: identities, what they change, and that the model is restored."""

import math

import pytest
import torch

from lightning_mamba.analysis.evaluator import iter_pieces
from lightning_mamba.mitigations.interventions import (
    apply_interventions,
    calibrate_state_norms,
    clip_state_norm,
    load_state_norms,
    parse_rri,
    save_state_norms,
    state_head_norms,
)
from lightning_mamba.models import MambaConfig, MambaLM
from lightning_mamba.models.kernels import backend as kernels
from lightning_mamba.models.ssd import positive_dt


def tiny(ngroups=1):
    torch.manual_seed(0)
    cfg = {"layer": "Mamba2", "d_state": 8, "headdim": 8, "chunk_size": 8, "ngroups": ngroups, "dt_min": 0.01, "dt_max": 0.5}
    return MambaLM(MambaConfig(d_model=16, n_layer=2, vocab_size=50, ssm_cfg=cfg), backend="torch").double().eval()


def hooks(model):
    return [(m.intervention, m.state_hook, m.forward_override) for m in model.mixers]


@pytest.fixture
def scan_inputs(monkeypatch):
    """Every call of the SSD scan, as (X = x * dt, dt * A, B) with the dt it uses (given raw with dt_bias when no
    intervention needs dt itself)."""
    calls, ssd = [], kernels.ssd

    def spy(backend, x, dt, A, B, C, *args, **kw):
        used = dt if kw.get("dt_bias") is None else positive_dt(dt, kw["dt_bias"], kw["dt_limit"])
        calls.append((x * used[..., None], used * A, B))
        return ssd(backend, x, dt, A, B, C, *args, **kw)

    monkeypatch.setattr(kernels, "ssd", spy)
    return calls


def test_neutral_settings_change_nothing():
    model = tiny()
    ids = torch.randint(0, 50, (2, 21))
    logits, state = model(ids)
    with apply_interventions(model, rri=(1.0, 1.0), dt_scale=1.0):
        l2, s2 = model(ids)
    assert torch.equal(l2, logits) and all(torch.equal(a.ssm, b.ssm) for a, b in zip(s2, state))


def test_rri_shifts_log_decay_scales_B_and_keeps_input(scan_inputs):
    m, (m_alpha, m_b) = tiny(ngroups=2).mixers[0], (0.99, 0.75)
    u = torch.randn(2, 19, 16, dtype=torch.float64)
    r0, r1 = {}, {}
    base_out = m(u, record=r0)[0]
    with apply_interventions(m, rri=(m_alpha, m_b)):
        out = m(u, record=r1)[0]
    (X0, dA0, B0), (X1, dA1, B1) = scan_inputs
    torch.testing.assert_close(dA1, dA0 + math.log(m_alpha), rtol=0, atol=1e-12)  # alpha' = m_alpha * alpha
    torch.testing.assert_close(r1["dt"] * r1["A"], r0["dt"] * r0["A"] + math.log(m_alpha), rtol=0, atol=1e-12)
    torch.testing.assert_close(X1, X0, rtol=1e-12, atol=1e-14)  # the input X = x * dt is untouched
    torch.testing.assert_close(B1, m_b * B0, rtol=0, atol=0)
    assert not torch.allclose(out, base_out)
    assert (m.intervention, m.state_hook, m.forward_override) == (None, None, None)


def test_rri_step_equals_forward():
    model, ids = tiny(), torch.randint(0, 50, (2, 9))
    with apply_interventions(model, rri=(0.95, 0.5), dt_scale=1.5):
        logits, _ = model(ids)
        state, steps = model.empty_state(2, dtype=torch.float64), []
        for t in range(ids.size(1)):
            lt, state = model.step(ids[:, t], state)
            steps.append(lt)
    torch.testing.assert_close(torch.stack(steps, 1), logits, rtol=1e-10, atol=1e-10)


def test_dt_scale_scales_decay_and_input(scan_inputs):
    m, c = tiny().mixers[0], 0.5
    u = torch.randn(1, 12, 16, dtype=torch.float64)
    m(u)
    with apply_interventions(m, dt_scale=c):
        m(u)
    (X0, dA0, B0), (X1, dA1, B1) = scan_inputs
    torch.testing.assert_close(dA1, c * dA0, rtol=1e-14, atol=0)
    torch.testing.assert_close(X1, c * X0, rtol=1e-14, atol=1e-15)
    assert torch.equal(B1, B0)


def test_clip_state_norm_only_scales_down():
    torch.manual_seed(1)
    ssm = torch.randn(3, 4, 8, 8, dtype=torch.float64) * torch.tensor([0.1, 1.0, 10.0])[:, None, None, None]
    norms = torch.linalg.vector_norm(ssm, dim=(-2, -1))
    thr = torch.tensor([1.0, 5.0, 20.0, 100.0])
    out = torch.linalg.vector_norm(clip_state_norm(ssm, thr), dim=(-2, -1))
    over = norms > thr
    assert over.any() and (~over).any()
    torch.testing.assert_close(out[over], thr.double().expand_as(norms)[over])
    assert torch.equal(clip_state_norm(ssm, thr)[~over], ssm[~over])  # under the threshold: bit for bit
    assert torch.all(out <= norms + 1e-12)


def test_state_norm_caps_handed_on_states_and_restores():
    model, ids = tiny(), torch.randint(0, 50, (2, 40))
    thr = calibrate_state_norms(model, ids, seq_len=16, stride=4)
    assert thr.shape == (2, model.mixers[0].nheads) and torch.all(thr > 0)
    by_pieces = torch.stack([state_head_norms(p.state).amax(0) for p in iter_pieces(model, ids[:, :16], 4)]).amax(0)
    torch.testing.assert_close(thr, by_pieces.float(), rtol=1e-6, atol=0)  # the one-pass states are the same
    base = model(ids)[0]
    low = thr * 0.5
    with apply_interventions(model, state_norm=low):
        for p in iter_pieces(model, ids, piece_len=5):  # float32 = autocast off; the model is float64
            assert torch.all(state_head_norms(p.state) <= low * (1 + 1e-6))  # norms are reported in fp32
    with pytest.raises(RuntimeError), apply_interventions(model, state_norm=low):
        raise RuntimeError("restored even on error")
    assert all(h == (None, None, None) for h in hooks(model))
    assert torch.equal(model(ids)[0], base)


def test_calibration_roundtrip_and_bad_settings(tmp_path):
    model = tiny()
    thr = calibrate_state_norms(model, torch.randint(0, 50, (3, 30)), seq_len=20, stride=7, batch_size=2)
    save_state_norms(tmp_path / "norms.json", thr, seq_len=20)
    assert torch.equal(load_state_norms(tmp_path / "norms.json"), thr)
    with pytest.raises(ValueError, match="shape"):
        with apply_interventions(model, state_norm=thr[:1]):
            pass
    with pytest.raises(ValueError, match="combine"):
        with apply_interventions(model, window=4, state_norm=thr):
            pass
    with pytest.raises(ValueError, match="two numbers"):
        parse_rri("0.9")
    with pytest.raises(ValueError, match="two numbers"):
        parse_rri("2,x")
    for text in ("1.5,0.5", "0.9,0", "0.9,-1", "nan,0.5"):  # RRI reduces: a factor above 1 would grow the state
        with pytest.raises(ValueError, match=r"m_alpha and m_b must be in \(0, 1\]"):
            parse_rri(text)
    assert parse_rri("0.9999,0.75") == (0.9999, 0.75)
    assert parse_rri((1, 1)) == (1.0, 1.0)
