"""The LM: pieces equal the whole, the recurrent step equals the parallel forward, document resets."""

import torch

from lightning_mamba.models import MambaConfig, MambaLM


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
