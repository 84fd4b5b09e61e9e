"""A torch stand-in for the causal_conv1d library (its CUDA kernels cannot run on CPU), written from its documented
semantics (causal_conv1d_interface.py's docstrings and reference functions, 1.7.0) and the argument checks of its
C++ entry points (csrc/causal_conv1d.cpp), so a CPU test catches an adapter that passes the wrong layout, dtype or
combination: tests/test_benchmarks_conv.py and tests/models/kernels/test_conv_cc1d.py use it."""

import types

import torch
import torch.nn.functional as F


def stand_in_library(version: str = "1.7.0"):
    """causal_conv1d_fn, causal_conv1d_update and cpp_functions' forward and backward entry points in plain torch: x (b, d, l), weight (d, k), out (b, d, l);
    initial_states (b, d, k-1) are the inputs before x (zeros if None), and the final states the last k-1 inputs;
    seq_idx (b, l) drops taps from an earlier document, gives the initial states the id at position 0 and zeroes the
    output where it is negative (padding), not with return_final_states; update shifts conv_state (b, d, k-1) in
    place by one token x (b, d). Records each call's keyword arguments in ``calls``."""
    calls = []

    def fn(x, weight, bias=None, seq_idx=None, initial_states=None, return_final_states=False, final_states_out=None,
           activation=None, entry="causal_conv1d_fn"):
        calls.append(dict(fn=entry, x=x, seq_idx=seq_idx, initial_states=initial_states,
                          return_final_states=return_final_states))
        return conv(x, weight, bias, seq_idx, initial_states, return_final_states, activation)

    def conv(x, weight, bias, seq_idx, initial_states, return_final_states, activation):
        b, d, length = x.shape
        k = weight.shape[-1]
        channel_last = x.stride(1) == 1 and x.stride(2) > 1
        assert weight.shape == (d, k) and 2 <= k <= 4
        assert bias is None or (bias.dtype == weight.dtype and bias.shape == (d,))
        if seq_idx is not None or initial_states is not None or return_final_states:
            assert channel_last, "seq_idx and states only with the channel-last layout"
        if channel_last:
            assert d % 8 == 0 and x.stride(0) % 8 == 0 and x.stride(2) % 8 == 0, "channel-last strides"
        if seq_idx is not None:
            assert not return_final_states, "the library refuses return_final_states with seq_idx"
            assert seq_idx.dtype == torch.int32 and seq_idx.is_contiguous() and seq_idx.shape == (b, length)
        if initial_states is not None:
            assert initial_states.dtype == x.dtype and initial_states.shape == (b, d, k - 1)
            assert initial_states.stride(1) == 1, "initial_states must be channel-last"
        before = initial_states if initial_states is not None else x.new_zeros(b, d, k - 1)
        full = torch.cat([before, x], dim=-1)  # (b, d, k-1+l)
        out = x.new_zeros(b, d, length) + (0 if bias is None else bias[None, :, None])
        for j in range(k):  # tap j reads input t - (k-1-j)
            tap = full[..., j:j + length] * weight[None, :, j:j + 1]
            if seq_idx is not None:
                lag = k - 1 - j
                first = seq_idx[:, :1] if initial_states is not None else torch.full_like(seq_idx[:, :1], -1)
                prev = torch.cat([first.expand(b, lag), seq_idx], dim=1)[:, :length]
                tap = tap * (prev == seq_idx)[:, None, :]
            out = out + tap
        out = F.silu(out) if activation == "silu" else out
        if seq_idx is not None:
            out = out.masked_fill((seq_idx < 0)[:, None, :], 0.0)
        out = torch.empty_like(x).copy_(out)  # in x's layout, as the library allocates it
        if not return_final_states:
            return out
        final = full[..., -(k - 1):].transpose(1, 2).contiguous().transpose(1, 2)  # channel-last, as the library's
        return out, final

    def update(x, conv_state, weight, bias=None, activation=None, cache_seqlens=None, conv_state_indices=None):
        calls.append(dict(fn="causal_conv1d_update", x=x, conv_state=conv_state))
        assert conv_state.dtype == x.dtype, "the library checks the state's dtype"
        assert bias is None or bias.dtype == weight.dtype
        window = torch.cat([conv_state, x[..., None]], dim=-1)  # (b, d, k)
        conv_state.copy_(window[..., 1:])
        out = (window * weight).sum(-1) + (0 if bias is None else bias)
        return (F.silu(out) if activation == "silu" else out).to(x.dtype)

    def fwd_function(x, weight, bias, seq_idx, initial_states, final_states_out, silu_activation):
        """cpp_functions.causal_conv1d_fwd_function: out in x's layout (final_states_out, if given, filled)."""
        got = fn(x, weight, bias, seq_idx, initial_states, final_states_out is not None,
                 activation="silu" if silu_activation else None, entry="causal_conv1d_fwd_function")
        if final_states_out is None:
            return got
        final_states_out.copy_(got[1])
        return got[0]

    def bwd_function(x, weight, bias, dout, seq_idx, initial_states, dfinal_states, dx, return_dinitial_states,
                     silu_activation):
        """cpp_functions.causal_conv1d_bwd_function: (dx, dweight, dbias, dinitial_states), dx written into the
        given one (its checks: x's shape and dtype, channel-last when x is) or allocated in x's layout."""
        calls.append(dict(fn="causal_conv1d_bwd_function", x=x, dout=dout, dx=dx, seq_idx=seq_idx))
        assert dout.shape == x.shape and dfinal_states is None and not return_dinitial_states
        if dx is not None:
            assert dx.shape == x.shape and dx.dtype == x.dtype
            assert dx.stride(1) == 1 if x.stride(1) == 1 else dx.stride(2) == 1, "dx in x's layout"
        leaves = [t.detach().requires_grad_() for t in (x, weight)] + ([] if bias is None else [bias.detach().requires_grad_()])
        with torch.enable_grad():
            out = conv(leaves[0], leaves[1], leaves[2] if bias is not None else None, seq_idx, initial_states, False,
                       "silu" if silu_activation else None)
            grads = torch.autograd.grad(out, leaves, dout)
        dx = torch.empty_like(x) if dx is None else dx
        dx.copy_(grads[0])
        return dx, grads[1], None if bias is None else grads[2], None

    cpp = types.SimpleNamespace(causal_conv1d_fwd_function=fwd_function, causal_conv1d_bwd_function=bwd_function)
    return types.SimpleNamespace(causal_conv1d_fn=fn, causal_conv1d_update=update, __version__=version, calls=calls,
                                 cpp_functions=cpp)
