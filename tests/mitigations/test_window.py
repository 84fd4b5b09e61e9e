"""The sliding window by state difference equals a fresh run over the last r tokens, exactly (float64)."""

import pytest
import torch

from lightning_mamba.mitigations.interventions import apply_interventions
from lightning_mamba.mitigations.window import WindowState, windowed_forward
from lightning_mamba.models import MambaConfig, MambaLM
from lightning_mamba.models.mixer import Mamba2

TOL = dict(rtol=1e-10, atol=1e-10)
L = 20
DOCS = torch.tensor([[0] * 9 + [1] * 11, [3] * 4 + [4] * 15 + [5]])


def mixer(chunk_size, ngroups=2):
    torch.manual_seed(0)
    return Mamba2(16, d_state=8, headdim=8, ngroups=ngroups, chunk_size=chunk_size, dt_min=0.05, dt_max=0.5,
                  backend="torch").double()


def run_windowed(m, u, r, splits, seq_idx=None):
    state, outs, states = None, [], []
    for a, b in zip((0, *splits), (*splits, u.size(1))):
        o, state = windowed_forward(m, u[:, a:b], r, state, None if seq_idx is None else seq_idx[:, a:b])
        outs.append(o)
        states.append((b, state))
    return torch.cat(outs, 1), states


def fresh(m, u, r, t, seq_idx=None):
    """A fresh run (zero SSM and conv state) over tokens [t-r+1, t]: (output at t, final SSM state)."""
    s = max(0, t - r + 1)
    out, state = m(u[:, s:t + 1], None, None if seq_idx is None else seq_idx[:, s:t + 1])
    return out[:, -1], state.ssm


@pytest.mark.parametrize("chunk_size", [4, 16])
@pytest.mark.parametrize("r", [1, 2, 3, 5, 11, 40])
@pytest.mark.parametrize("docs", [False, True])
def test_window_equals_fresh_run_over_last_r_tokens(chunk_size, r, docs):
    m = mixer(chunk_size)
    torch.manual_seed(1)
    u, seq_idx = torch.randn(2, L, 16, dtype=torch.float64), DOCS if docs else None
    out, states = run_windowed(m, u, r, (7, 8, 13), seq_idx)
    for t in range(L):
        torch.testing.assert_close(out[:, t], fresh(m, u, r, t, seq_idx)[0], **TOL)
    for end, st in states:  # the windowed state after each piece = the fresh run's final state
        torch.testing.assert_close(st.ssm, fresh(m, u, r, end - 1, seq_idx)[1], **TOL)
    if r < L:  # and it is not the full run
        assert not torch.allclose(out, m(u, None, seq_idx)[0], rtol=0, atol=1e-12)


def test_window_state_at_every_position_token_by_token():
    m, r = mixer(4, ngroups=1), 6
    torch.manual_seed(2)
    u = torch.randn(1, 14, 16, dtype=torch.float64)
    _, states = run_windowed(m, u, r, tuple(range(1, 14)))
    for end, st in states:
        torch.testing.assert_close(st.ssm, fresh(m, u, r, end - 1)[1], **TOL)


def test_window_with_rri_is_the_window_of_the_mitigated_model():
    m, r = mixer(4), 5
    torch.manual_seed(3)
    u = torch.randn(2, L, 16, dtype=torch.float64)
    with apply_interventions(m, rri=(0.9, 0.75)):
        out, _ = run_windowed(m, u, r, (9,))
        for t in (0, 4, 5, 12, L - 1):
            torch.testing.assert_close(out[:, t], fresh(m, u, r, t)[0], **TOL)


def tiny_lm(n_layer=2):
    torch.manual_seed(0)
    cfg = {"layer": "Mamba2", "d_state": 8, "headdim": 8, "chunk_size": 8, "dt_min": 0.05, "dt_max": 0.5}
    return MambaLM(MambaConfig(d_model=16, n_layer=n_layer, vocab_size=50, ssm_cfg=cfg), backend="torch").double().eval()


def test_model_window_has_receptive_field_n_layer_times_r():
    """Each layer is exact; the model at t depends on n_layer*(r-1)+1 tokens (layer 2 sees layer-1 outputs that
    each saw r tokens), so it equals the windowed model on those tokens alone, not the plain model on r tokens."""
    model, r = tiny_lm(), 4
    ids = torch.randint(0, 50, (2, 30))
    span = len(model.mixers) * (r - 1) + 1
    with apply_interventions(model, window=r):
        logits, state = model(ids)
        l1, s1 = model(ids[:, :13])
        l2, _ = model(ids[:, 13:], state=s1)
        short = model(ids[:, -span:])[0]
        step_state, steps = None, []
        for t in range(8):
            lt, step_state = model(ids[:, t:t + 1], state=step_state)
            steps.append(lt)
    assert all(isinstance(s, WindowState) and s.raw.shape[1] == r + 3 for s in state)  # constant in the length
    assert torch.isfinite(logits).all()
    torch.testing.assert_close(torch.cat([l1, l2], 1), logits, **TOL)  # pieces = whole
    torch.testing.assert_close(torch.cat(steps, 1), logits[:, :8], **TOL)  # token by token
    torch.testing.assert_close(short[:, -1], logits[:, -1], **TOL)
    plain_fresh = model(ids[:, -r:])[0]
    assert not torch.allclose(plain_fresh[:, -1], logits[:, -1], atol=1e-6)
    assert all(m.forward_override is None for m in model.mixers)


def test_windowed_run_rejects_a_plain_state():
    m = mixer(4)
    u = torch.randn(1, 5, 16, dtype=torch.float64)
    _, plain = m(u)
    with pytest.raises(TypeError, match="WindowState"):
        windowed_forward(m, u, 3, plain)
