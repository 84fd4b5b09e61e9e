"""models/kernels/embedding_triton.py: the small-vocabulary embedding backward sums the rows of grad h by token id
as torch's backward does (to fp32 rounding: exact products, the sums in another order), at shapes that leave every
block partly filled; the model takes it on the Triton path for small vocabularies only.

Runs on CUDA when available, else on CPU through Triton's interpreter when TRITON_INTERPRET=1, else skips.
"""

import pytest
import torch
import torch.nn.functional as F

from lightning_mamba.models.config import ConfigError
from lightning_mamba.models.kernels import backend, embedding_triton

from .test_grad_slots import rel_err
from .triton_env import DEVICE, needs_triton


def skewed_ids(n, vocab, gen):
    """Token ids as byte-level text has them: a few ids very frequent (many rows summed into one), most rare."""
    frequent = torch.randint(0, vocab, (8,), generator=gen)
    ids = torch.randint(0, vocab, (n,), generator=gen)
    pick = torch.rand(n, generator=gen) < 0.6
    return torch.where(pick, frequent[torch.randint(0, 8, (n,), generator=gen)], ids)


@needs_triton
@pytest.mark.parametrize("max_parts", [32, 2], ids=["slices_of_128", "at_most_two_parts"])
@pytest.mark.parametrize("shape", [(3, 250, 80, 257), (2, 64, 64, 64), (1, 5, 16, 1024)],
                         ids=["partial_blocks", "one_block", "widest_vocab"])
def test_the_backward_sums_grad_rows_by_id_as_torch(monkeypatch, shape, max_parts):
    """Against F.embedding's backward in fp64: tokens over several programs' slices (the last one partial; with at
    most two partial sums, slices of 512 tokens), a vocabulary and features that are no multiple of a block, grad
    values over a wide range of magnitudes (each enters as three bf16 pieces on CUDA: a lost piece would show as a
    ~4e-3 or ~1.5e-5 relative error; the interpreter takes one fp32 product)."""
    monkeypatch.setattr(embedding_triton, "TOKENS_PER_PROGRAM", 128)  # several slices at these small shapes
    monkeypatch.setattr(embedding_triton, "MAX_PARTS", max_parts)
    made = []
    monkeypatch.setattr(embedding_triton.torch, "empty", lambda *a, **k: made.append(a) or torch.ones(*a, **k))
    b, l, d, vocab = shape
    gen = torch.Generator().manual_seed(0)
    ids = skewed_ids(b * l, vocab, gen).view(b, l)
    grad = torch.randn(b, l, d, generator=gen) * torch.exp(torch.randn(b, l, d, generator=gen) * 3)
    weight = torch.randn(vocab, d, generator=gen, dtype=torch.float64, requires_grad=True)
    F.embedding(ids, weight).backward(grad.double())
    got = embedding_triton.embedding_backward(ids.to(DEVICE), grad.to(DEVICE), vocab)
    monkeypatch.undo()
    assert made == [(-(-b * l // (128 if max_parts == 32 else 512)), vocab, d)]  # the partial sums' buffer
    assert got.dtype == torch.float32 and got.shape == (vocab, d)
    assert rel_err(got.cpu(), weight.grad) < 1e-6
    untouched = torch.ones(vocab, dtype=torch.bool)
    untouched[ids.unique()] = False
    assert untouched.any() and not got.cpu()[untouched].any()  # ids that never occur get exact zeros


@needs_triton
def test_the_function_is_f_embedding_forward_and_backward():
    """embedding_triton.embedding: F.embedding's values, and its weight gradient in the weight's dtype."""
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 257, (4, 100), generator=gen).to(DEVICE)
    weight = torch.randn(264, 48, generator=gen).to(DEVICE).requires_grad_()
    ref = weight.detach().clone().requires_grad_()
    out = embedding_triton.embedding(ids, weight)
    want = F.embedding(ids, ref)
    assert torch.equal(out, want)
    g = torch.randn(out.shape, generator=gen).to(DEVICE)
    out.backward(g)
    want.backward(g)
    assert weight.grad.dtype == weight.dtype and rel_err(weight.grad, ref.grad) < 1e-6


def test_only_small_vocabularies_take_it():
    """The one-hot work grows with the vocabulary: at most MAX_VOCAB rows (a GPT-2-sized vocabulary keeps torch's)."""
    small, large = torch.empty(257, 8, device="meta"), torch.empty(50288, 8, device="meta")
    assert not embedding_triton.supports(large)
    assert embedding_triton.supports(small) == (embedding_triton.triton is not None)


@pytest.mark.gpu
def test_the_model_takes_it_on_the_gpu_for_a_small_vocabulary():
    """MambaLM.hidden_states on CUDA: the byte vocabulary's lookup is our Function while training, F.embedding for a
    large vocabulary and under no_grad."""
    from lightning_mamba.models import MambaConfig, MambaLM

    def lookup_grad_fn(vocab, grad=True):
        m = MambaLM(MambaConfig(d_model=64, n_layer=1, vocab_size=vocab,
                                ssm_cfg={"layer": "Mamba2", "d_state": 16, "headdim": 16})).cuda()
        seen = {}

        def keep_input(module, args):  # returns None: the layer's inputs are left as they are
            seen["h"] = args[0]

        m.backbone.layers[0].register_forward_pre_hook(keep_input)
        with torch.set_grad_enabled(grad):
            m.hidden_states(torch.randint(0, vocab, (2, 32), device="cuda"), return_state=False)
        return type(seen["h"].grad_fn).__name__ if seen["h"].grad_fn is not None else None

    assert lookup_grad_fn(257) == "_EmbeddingBackward"
    assert lookup_grad_fn(4096) == "EmbeddingBackward0"
    assert lookup_grad_fn(257, grad=False) is None
    with backend.embedding_kernels("torch"):  # the benchmark's A/B
        assert lookup_grad_fn(257) == "EmbeddingBackward0"


def test_the_embedding_kernels_switch_names_its_choices():
    with pytest.raises(ConfigError, match="unknown embedding kernels 'fast': use one of ours, torch"):
        with backend.embedding_kernels("fast"):
            pass
    assert backend._kernel_choice["embedding"] == "ours"
