import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lightning_mamba.analysis import bucket_curve, eval_rows, token_losses, window_mean


@pytest.mark.parametrize("piece_len,length", [(1, 20), (7, 96), (16, 96), (50, 96), (95, 96), (200, 96)])
def test_piecewise_losses_equal_one_forward(lm, piece_len, length):
    tokens = torch.randint(0, 64, (2, length))
    with torch.no_grad():
        logits, _ = lm(tokens[:, :-1])
    full = F.cross_entropy(logits.transpose(1, 2), tokens[:, 1:], reduction="none")
    got = token_losses(lm, tokens, piece_len=piece_len)
    assert got.shape == (2, length - 1) and got.dtype == torch.float32
    torch.testing.assert_close(got, full, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(token_losses(lm, tokens, piece_len=piece_len, batch_size=1), full, atol=2e-5, rtol=1e-5)


def test_bf16_option_runs_close_to_fp32(lm):
    tokens = torch.randint(0, 64, (1, 40))
    fp32 = token_losses(lm, tokens, piece_len=16)
    bf16 = token_losses(lm, tokens, piece_len=16, dtype="bfloat16")
    assert torch.isfinite(bf16).all() and (bf16 - fp32).abs().mean() < 0.1
    with pytest.raises(ValueError, match="dtype"):
        token_losses(lm, tokens, dtype="int8")


@pytest.mark.parametrize("chunk_size", [4, 64])
def test_the_evaluations_own_chunk_gives_the_same_losses_and_is_given_back(lm, chunk_size):
    tokens = torch.randint(0, 64, (2, 97))
    seen = []
    hooks = [m.register_forward_pre_hook(lambda m, args: seen.append(m.chunk_size)) for m in lm.mixers]
    try:
        own = token_losses(lm, tokens, piece_len=32, chunk_size=chunk_size)
    finally:
        for h in hooks:
            h.remove()
    assert set(seen) == {chunk_size} and len(seen) == len(lm.mixers) * 3  # every piece (96 / 32) of every layer
    assert {m.chunk_size for m in lm.mixers} == {16}  # the model's again
    torch.testing.assert_close(own, token_losses(lm, tokens, piece_len=32), atol=2e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="chunk_size must be a whole number >= 1"):
        token_losses(lm, tokens, chunk_size=0)


def test_auto_picks_the_chunk_by_the_states_size_on_a_gpu_and_keeps_the_models_on_a_cpu(lm):
    from lightning_mamba.analysis.evaluator import evaluation_chunk
    from tests.tiny import tiny_lm

    cuda, cpu = torch.device("cuda"), torch.device("cpu")  # no GPU needed: the rule only reads the device's type
    assert evaluation_chunk(lm, "auto", cuda) == 128 and evaluation_chunk(lm, "auto", cpu) is None  # d_state 16
    assert evaluation_chunk(tiny_lm(n_layer=1, d_state=512), "auto", cuda) == 256
    assert evaluation_chunk(lm, None, cuda) is None and evaluation_chunk(lm, 32, cpu) == 32
    for bad in ("big", 1.5, -1):
        with pytest.raises(ValueError, match="chunk_size must be a whole number >= 1, 'auto', or None"):
            evaluation_chunk(lm, bad, cpu)


def test_tf32_is_float32_with_tf32_matmuls_for_the_run_only(lm):
    tokens = torch.randint(0, 64, (1, 40))
    seen = []
    hook = lm.mixers[0].register_forward_pre_hook(lambda m, args: seen.append(torch.get_float32_matmul_precision()))
    before = torch.get_float32_matmul_precision()
    try:
        tf32 = token_losses(lm, tokens, piece_len=16, dtype="tf32")
    finally:
        hook.remove()
    assert set(seen) == {"high"} and torch.get_float32_matmul_precision() == before == "highest"
    assert torch.equal(tf32, token_losses(lm, tokens, piece_len=16))  # a CPU's matmuls take no TF32


def test_bucket_curve_averages_rows_then_buckets():
    losses = torch.tensor([[1.0, 2, 3, 4, 5], [3.0, 4, 5, 6, 7]])  # row mean: 2,3,4,5,6
    pos, curve = bucket_curve(losses, 2)
    assert pos.tolist() == [2, 4, 5]  # each bucket at its last position; the short last bucket kept
    np.testing.assert_allclose(curve, [2.5, 4.5, 6.0])
    assert window_mean(losses, 2, 4) == pytest.approx(4.5)  # positions 3, 4
    assert window_mean(losses, 2, 6) is None


def test_eval_rows_windows_and_repetition():
    stream = np.arange(10)
    rows, info = eval_rows(stream, 4, 2)
    assert rows.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]] and info["repeated"] == 1 and not info["note"]
    rows, info = eval_rows(stream, 4, 5)
    assert rows.shape == (2, 4) and "only 2 of 5" in info["note"]
    assert "give more held-out text or evaluate a shorter length" in info["note"] and "\n" not in info["note"]
    rows, info = eval_rows(np.array([5, 6, 7]), 9, 1, eos_id=0)  # too short: repeated, EOS between copies
    assert rows.tolist() == [[5, 6, 7, 0, 5, 6, 7, 0, 5]] and info["repeated"] == 3 and "repeated" in info["note"]
    rows, _ = eval_rows(np.array([5, 6, 0]), 5, 1, eos_id=0)  # already ends with EOS: no doubled EOS
    assert rows.tolist() == [[5, 6, 0, 5, 6]]
