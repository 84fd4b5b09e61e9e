"""The LM: pieces equal the whole, the recurrent step equals the parallel forward, document resets."""

import pytest
import torch

from lightning_mamba.models import MambaConfig, MambaLM
from lightning_mamba.models.kernels import backend


def tiny(**ssm):
    cfg = {"layer": "Mamba2", "d_state": 8, "headdim": 8, "chunk_size": 8, **ssm}
    torch.manual_seed(0)
    return MambaLM(MambaConfig(d_model=16, n_layer=2, vocab_size=50, ssm_cfg=cfg), backend="torch").double()


def test_pieces_with_carried_state_equal_whole():
    model = tiny(ngroups=2)
    ids = torch.randint(0, 50, (2, 29))
    logits, state = model(ids)
    l1, s1 = model(ids[:, :11])
    l2, s2 = model(ids[:, 11:], state=s1)
    torch.testing.assert_close(torch.cat([l1, l2], 1), logits, rtol=1e-10, atol=1e-10)
    for a, b in zip(s2, state):
        torch.testing.assert_close(a.ssm, b.ssm, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(a.conv, b.conv, rtol=1e-10, atol=1e-10)


def test_step_equals_forward():
    model = tiny()
    ids = torch.randint(0, 50, (3, 13))
    logits, final = model(ids)
    state = model.empty_state(3, dtype=torch.float64)
    steps = []
    for t in range(13):
        lt, state = model.step(ids[:, t], state)
        steps.append(lt)
    torch.testing.assert_close(torch.stack(steps, 1), logits, rtol=1e-10, atol=1e-10)
    for a, b in zip(state, final):
        torch.testing.assert_close(a.ssm, b.ssm, rtol=1e-10, atol=1e-10)


def test_seq_idx_equals_documents_run_separately():
    model = tiny()
    ids = torch.randint(0, 50, (1, 30))
    seq_idx = torch.tensor([[0] * 7 + [1] * 14 + [2] * 9], dtype=torch.int32)
    logits, _ = model(ids, seq_idx=seq_idx)
    for a, e in [(0, 7), (7, 21), (21, 30)]:
        torch.testing.assert_close(logits[:, a:e], model(ids[:, a:e])[0], rtol=1e-10, atol=1e-10)


def test_seq_idx_with_pieces():
    model = tiny()
    ids = torch.randint(0, 50, (1, 30))
    seq_idx = torch.tensor([[0] * 7 + [1] * 23], dtype=torch.int32)
    whole, _ = model(ids, seq_idx=seq_idx)
    l1, s1 = model(ids[:, :15], seq_idx=seq_idx[:, :15])
    l2, _ = model(ids[:, 15:], state=s1, seq_idx=seq_idx[:, 15:])
    torch.testing.assert_close(torch.cat([l1, l2], 1), whole, rtol=1e-10, atol=1e-10)


def test_record_gives_dt_per_layer():
    model = tiny()
    rec = []
    model(torch.randint(0, 50, (2, 10)), record=rec)
    assert len(rec) == 2 and rec[0]["dt"].shape == (2, 10, 4) and rec[0]["A"].shape == (4,)
    assert torch.all(rec[0]["dt"] > 0) and torch.all(rec[0]["A"] < 0)


def test_backward_runs_and_is_finite():
    model = tiny().float()
    ids = torch.randint(0, 50, (2, 20))
    logits, _ = model(ids)
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids.flatten()).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert model.backbone.layers[0].mixer.A_log.grad is not None


# ---- quadratic_max_len: short inputs from a zero state take the scan's attention form -----------------------------
def loss_and_grads(model, ids, seq_idx=None):
    model.zero_grad()
    logits, _ = model(ids, seq_idx=seq_idx)
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids.roll(-1, 1).flatten())
    loss.backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("ngroups", [1, 2])
def test_quadratic_scan_gives_the_chunked_logits_and_gradients(ngroups):
    ids = torch.randint(0, 50, (2, 21))  # not a multiple of the chunk (8)
    seq_idx = torch.tensor([[0] * 9 + [1] * 12, [4] * 3 + [5] * 17 + [6]], dtype=torch.int32)
    for docs in (None, seq_idx):
        want, want_grads = loss_and_grads(tiny(ngroups=ngroups), ids, docs)
        got, got_grads = loss_and_grads(tiny(ngroups=ngroups, quadratic_max_len=32), ids, docs)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
        for name in want_grads:
            torch.testing.assert_close(got_grads[name], want_grads[name], rtol=1e-9, atol=1e-12, msg=name)


@pytest.fixture
def quadratic_calls(monkeypatch):
    """The kernel switch's calls of ssd_quadratic, as (length, whether the final state was asked for): a counting
    wrapper around it, nothing else changed."""
    calls = []
    original = backend.ssd_quadratic

    def counted(*args, **kwargs):
        calls.append((args[0].size(1), kwargs["return_final_state"]))
        return original(*args, **kwargs)

    monkeypatch.setattr(backend, "ssd_quadratic", counted)
    return calls


def test_quadratic_max_len_decides_the_scan(quadratic_calls):
    model = tiny(quadratic_max_len=16)
    ids = torch.randint(0, 50, (2, 24))
    model(ids[:, :16])  # at the limit: every layer
    assert quadratic_calls == [(16, True)] * 2
    model(ids)  # longer: chunked
    _, state = model(ids[:, :10])
    model(ids[:, 10:14], state=state)  # short, but from a carried state: chunked (the state enters there)
    assert quadratic_calls == [(16, True)] * 2 + [(10, True)] * 2
    tiny()(ids[:, :4])  # the default, 0: never
    assert len(quadratic_calls) == 4
    model.loss(ids[:, :8], ids[:, 1:9], return_state=False)  # training's loss: the scan builds no final state
    assert quadratic_calls[4:] == [(8, False)] * 2


@pytest.mark.parametrize("quadratic_max_len", [0, 32])
def test_return_state_false_gives_no_state_and_the_same_logits(quadratic_max_len):
    model = tiny(quadratic_max_len=quadratic_max_len)
    ids = torch.randint(0, 50, (2, 19))
    labels = ids.roll(-1, 1)
    logits, state = model(ids)
    assert len(state) == 2 and state[0].ssm.shape == (2, 4, 8, 8)
    logits_only, none = model(ids, return_state=False)
    assert none is None
    torch.testing.assert_close(logits_only, logits, rtol=0, atol=0)
    loss, none = model.loss(ids, labels, return_state=False)
    assert none is None
    torch.testing.assert_close(loss, model.loss(ids, labels)[0], rtol=0, atol=0)
    out, none = model.mixers[0](torch.randn(2, 19, 16, dtype=torch.float64), return_state=False)
    assert none is None and out.shape == (2, 19, 16)

def test_return_state_false_builds_no_conv_state(monkeypatch):
    """Training's loss takes no conv state out of the convolution (the torch path here; the kernels' own flag is
    tested beside them): conv.carried_inputs, which builds it, is not called."""
    from lightning_mamba.models import conv

    calls, carried = [], conv.carried_inputs
    monkeypatch.setattr(conv, "carried_inputs", lambda *a: calls.append(1) or carried(*a))
    model = tiny()
    ids = torch.randint(0, 50, (2, 19))
    model.loss(ids, ids.roll(-1, 1), return_state=False)
    assert calls == []
    model.loss(ids, ids.roll(-1, 1))
    assert len(calls) == len(model.mixers)  # (the check itself: a loss that returns the state builds it)


def test_a_built_model_can_take_another_scan_but_not_another_shape(quadratic_calls):
    from lightning_mamba.models.config import ConfigError

    model = tiny()
    ids = torch.randint(0, 50, (2, 21))
    want, _ = model(ids)
    model.set_scan_settings(chunk_size=4, quadratic_max_len=32)
    assert model.config.mixer["chunk_size"] == 4 and model.config.mixer["quadratic_max_len"] == 32
    assert all((m.chunk_size, m.quadratic_max_len) == (4, 32) for m in model.mixers)
    got, _ = model(ids)
    assert len(quadratic_calls) == 2  # both layers now take the attention form
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    with pytest.raises(ConfigError, match="d_state change the model, not only its scan's speed"):
        model.set_scan_settings(d_state=4)
    with pytest.raises(ConfigError, match="quadratic_max_len must be >= 0"):
        model.set_scan_settings(quadratic_max_len=-1)
    assert model.config.mixer["quadratic_max_len"] == 32  # a refused change leaves the model as it was
