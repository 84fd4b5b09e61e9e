"""The whole LM on the Triton path against the torch backend on the inputs a GPU user meets at the edges: batch 1,
rows shorter than a chunk, than the conv or of one token, lengths no multiple of the chunk, documents (seq_idx not
starting at 0) with a carried state that takes gradients and the final state returned, several groups, widths no
power of two, the attention form's short rows with documents, an untied head over a vocabulary no multiple of the
padding with ignored rows, recompute_norm_output and save_chunk_states: the same loss, final states and every
gradient (the carried state's too), in fp32.

Runs on CUDA, or on the CPU under Triton's interpreter (triton_env.mamba_kernels: the Triton path forced there);
skips elsewhere (CI). (bf16 is left to test_backend.py on the GPU: Triton 3.6's interpreter gets bf16 dots and
products wrong, so mamba_ssm's kernels give garbage there.)"""

import pytest
import torch

from lightning_mamba.models import MambaConfig, MambaLM
from lightning_mamba.models.kernels import backend
from lightning_mamba.models.mixer import LayerState

from .test_grad_slots import rel_err
from .triton_env import DEVICE

CASES = {
    # name: (batch, length, ssm_cfg, model settings, document starts, carried state (True: with gradients))
    "batch1_one_token": (1, 1, {}, {}, [], None),
    "batch1_shorter_than_conv_with_state": (1, 2, {}, {}, [], True),
    "batch1_no_chunk_multiple_docs_state_grads": (1, 37, {}, {}, [5, 21], True),
    "docs_state_no_grad": (2, 21, {}, {}, [1, 16], False),
    "two_groups_width_96": (2, 19, {"ngroups": 2, "headdim": 32, "d_state": 32}, {"d_model": 96}, [], None),
    "attention_form_docs": (2, 23, {"quadratic_max_len": 64}, {}, [4, 11], None),
    "untied_odd_vocab_ignored_row": (2, 18, {}, {"tie_embeddings": False, "vocab_size": 61}, [], None),
    "two_layers_recompute_saved_states": (2, 20, {"save_chunk_states": True, "recompute_norm_output": True},
                                          {"n_layer": 2}, [7], False),
}


@pytest.mark.parametrize("case", CASES)
def test_the_lm_on_the_triton_path_equals_torch(mamba_kernels, monkeypatch, case):
    b, length, ssm_cfg, settings, doc_starts, carried = CASES[case]
    if DEVICE == "cpu":
        monkeypatch.setattr(backend, "uses_triton", lambda name, x: name != "torch")  # the Triton path on the CPU
    torch.manual_seed(0)
    config = MambaConfig(**{"d_model": 32, "n_layer": 1, "vocab_size": 64, **settings},
                         ssm_cfg={"layer": "Mamba2", "d_state": 16, "headdim": 16, "chunk_size": 16, **ssm_cfg})
    models = {name: MambaLM(config, backend=name).to(DEVICE) for name in ("auto", "torch")}
    models["torch"].load_state_dict(models["auto"].state_dict())
    ids = torch.randint(0, config.vocab_size, (b, length + 1), device=DEVICE)
    labels = ids[:, 1:].clone()
    if case == "untied_odd_vocab_ignored_row":
        labels[1] = -100  # a row with no loss at all
    ids = ids[:, :-1]
    seq_idx = None
    if doc_starts:
        seq_idx = torch.full((b, length), 3, dtype=torch.int32, device=DEVICE)  # numbered from 3, not 0
        for start in doc_starts:
            seq_idx[:, start:] += 1
    gen = torch.Generator().manual_seed(1)
    state0 = None if carried is None else [
        LayerState(torch.randn(s.conv.shape, generator=gen).to(DEVICE) * 0.5,
                   torch.randn(s.ssm.shape, generator=gen).to(DEVICE) * 0.5)
        for s in models["torch"].empty_state(b)]
    out = {}
    for name, model in models.items():
        state = None if state0 is None else [LayerState(*(t.clone().requires_grad_(carried) for t in s)) for s in state0]
        loss, final = model.loss(ids, labels, state=state, seq_idx=seq_idx, return_state=state is not None)
        total = loss if final is None else loss + sum(s.ssm.square().mean() + s.conv.square().mean() for s in final)
        total.backward()
        grads = {k: p.grad for k, p in model.named_parameters()}
        if carried:
            grads.update({f"state{i}.{k}": getattr(s, k).grad for i, s in enumerate(state) for k in ("ssm", "conv")})
        out[name] = loss.detach(), final, grads
    (loss_t, final_t, grads_t), (loss_r, final_r, grads_r) = out["auto"], out["torch"]
    tol = 1e-4 if DEVICE == "cpu" else 2e-3  # on CUDA mamba_ssm's fp32 dots take TF32
    assert torch.isfinite(loss_r) and rel_err(loss_t.reshape(1), loss_r.reshape(1)) < tol
    if final_r is not None:
        for a, r in zip(final_t, final_r):
            assert rel_err(a.ssm, r.ssm) < tol and rel_err(a.conv, r.conv) < tol
    for k, g in grads_r.items():
        assert grads_t[k] is not None and rel_err(grads_t[k], g) < tol, (k, rel_err(grads_t[k], g))
