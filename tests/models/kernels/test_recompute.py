"""models/kernels/recompute.py and the model's recompute_norm_output: autograd keeps no copy of in_proj's input, and
the backward that needs it gets it made again, with the same gradients.

The first test is plain torch (runs everywhere); the whole-model one runs on the Triton path, on CUDA or on the CPU
under Triton's interpreter (triton_env.mamba_kernels), and skips elsewhere (CI)."""

import contextlib
import weakref

import pytest
import torch
from torch import nn

from lightning_mamba.models.config import MambaConfig
from lightning_mamba.models.kernels import backend
from lightning_mamba.models.kernels.recompute import saved_as_recomputed
from lightning_mamba.models.lm import MambaLM

from .triton_env import DEVICE, needs_triton


def test_a_linear_keeps_no_copy_of_its_input_and_its_backward_gets_it_remade():
    """A Linear on a 3-D tensor saves a 2-D view of it (which keeps it alive); inside saved_as_recomputed it keeps
    nothing of it, and its backward gets make()'s tensor: the same gradients, make() run once."""
    torch.manual_seed(0)
    lin = nn.Linear(8, 6)
    src = torch.randn(2, 5, 8)
    grads, alive, made = {}, {}, []
    for recompute in (False, True):
        x = src.clone().requires_grad_()
        t = x * 2
        remade = (src * 2).contiguous()
        ctx = saved_as_recomputed(t, lambda: made.append(1) or remade.clone()) if recompute else contextlib.nullcontext()
        with ctx:
            out = lin(t).tanh()
        kept = weakref.ref(t)
        del t
        alive[recompute] = kept() is not None
        out.square().sum().backward()
        grads[recompute] = (x.grad, lin.weight.grad.clone(), lin.bias.grad.clone())
        lin.zero_grad()
    assert alive == {False: True, True: False}
    assert made == [1]
    for a, b in zip(grads[False], grads[True]):
        assert torch.equal(a, b)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 37, 300])
def test_rmsnorm_out_remakes_the_add_norms_output_bit_for_bit(dtype, rows):
    """norm_triton.rmsnorm_out from the residual add_rmsnorm returned gives its first output's bits (the recompute
    rests on it), for one row, a part tile and several tiles, and a width that is no power of two."""
    from lightning_mamba.models.kernels import norm_triton

    torch.manual_seed(0)
    h = torch.randn(rows, 96, device=DEVICE).to(dtype)
    residual = torch.randn(rows, 96, device=DEVICE)
    weight = torch.empty(96, device=DEVICE).uniform_(0.5, 1.5)
    out, res_out = norm_triton.add_rmsnorm(h, residual, weight, 1e-5, True)
    remade = norm_triton.rmsnorm_out(res_out, weight, 1e-5, dtype)
    assert remade.dtype == out.dtype == dtype and remade.shape == out.shape
    assert torch.equal(remade, out)


def test_the_models_norm_outputs_are_remade_with_the_same_bits(mamba_kernels, monkeypatch):
    """A 2-layer LM on the Triton path (our norms, the chunked scan, the fused loss) with and without its
    recompute_norm_output (set on the built model, as a resume or fine-tune does) in fp32: the same loss, bit for
    bit, and the same gradients (bit for bit under the interpreter; on CUDA to rounding, since mamba_ssm's scan
    backward and causal-conv1d's weight gradient sum with atomic adds in no fixed order), and the norm output made
    again once a layer."""
    from lightning_mamba.models.kernels import norm_triton

    if DEVICE == "cpu":
        monkeypatch.setattr(backend, "uses_triton", lambda name, x: name != "torch")  # the Triton path on the CPU
    made = []
    monkeypatch.setattr(norm_triton, "rmsnorm_out", lambda *a, _fn=norm_triton.rmsnorm_out: made.append(1) or _fn(*a))
    torch.manual_seed(0)
    config = MambaConfig(d_model=32, n_layer=2, vocab_size=64,
                         ssm_cfg={"layer": "Mamba2", "d_state": 16, "headdim": 16, "chunk_size": 16})
    model = MambaLM(config).to(DEVICE)
    for layer in model.backbone.layers:  # (ones at init: a recompute without the weight would pass)
        torch.nn.init.uniform_(layer.norm.weight, 0.5, 1.5)
    ids = torch.randint(0, 64, (2, 40), device=DEVICE)
    results = {}
    for on in (False, True):
        model.set_scan_settings(recompute_norm_output=on)
        loss, _ = model.loss(ids[:, :-1], ids[:, 1:], return_state=False)
        loss.backward()
        results[on] = (loss.detach(), {k: p.grad.clone() for k, p in model.named_parameters()})
        model.zero_grad()
    assert len(made) == config.n_layer
    assert torch.equal(results[False][0], results[True][0])
    for k, g in results[False][1].items():
        if DEVICE == "cpu":
            assert torch.equal(g, results[True][1][k]), k
        else:
            torch.testing.assert_close(g, results[True][1][k], rtol=1e-4, atol=1e-6, msg=k)
    assert model.config.ssm_cfg["recompute_norm_output"] is True
