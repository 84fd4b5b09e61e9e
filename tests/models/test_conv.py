import torch

from lightning_mamba.models.conv import causal_conv1d


def reference_conv(u, weight, bias):
    """Plain causal depthwise conv: zero left padding, nn.functional.conv1d."""
    k = weight.size(-1)
    x = torch.nn.functional.pad(u.transpose(1, 2), (k - 1, 0))
    return torch.nn.functional.conv1d(x, weight, bias, groups=u.size(-1)).transpose(1, 2)


def test_conv_matches_padded_conv_and_pieces():
    torch.manual_seed(0)
    u, w, b = torch.randn(2, 11, 6, dtype=torch.float64), torch.randn(6, 1, 4, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    out, state = causal_conv1d(u, w, b)
    torch.testing.assert_close(out, reference_conv(u, w, b))
    o1, s1 = causal_conv1d(u[:, :2], w, b)  # piece shorter than the kernel
    o2, s2 = causal_conv1d(u[:, 2:], w, b, conv_state=s1)
    torch.testing.assert_close(torch.cat([o1, o2], 1), out)
    torch.testing.assert_close(s2, state)
    torch.testing.assert_close(state, u[:, -3:].transpose(1, 2))
    out_only, none = causal_conv1d(u, w, b, return_state=False)  # training: no state built
    assert none is None and torch.equal(out_only, out)


def test_conv_seq_idx_equals_separate_documents():
    torch.manual_seed(1)
    u, w, b = torch.randn(1, 12, 3, dtype=torch.float64), torch.randn(3, 1, 4, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    seq_idx = torch.tensor([[0] * 5 + [1] + [2] * 6])
    out, state = causal_conv1d(u, w, b, seq_idx=seq_idx)
    for a, e in [(0, 5), (5, 6), (6, 12)]:
        torch.testing.assert_close(out[:, a:e], reference_conv(u[:, a:e], w, b))
    # the carried state holds only the last document's inputs
    torch.testing.assert_close(state, u[:, -3:].transpose(1, 2))
    seq_idx2 = torch.tensor([[0] * 10 + [1] * 2])
    _, state2 = causal_conv1d(u, w, b, seq_idx=seq_idx2)
    assert torch.all(state2[:, :, 0] == 0) and torch.equal(state2[:, :, 1:], u[:, -2:].transpose(1, 2))
