"""The torch and Triton backends are the same model (GPU only; run on the GPU machine)."""

import pytest
import torch

from lightning_mamba.models import MambaConfig, MambaLM
from lightning_mamba.models.kernels.backend import _triton_scan

pytestmark = pytest.mark.gpu


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


@pytest.fixture(scope="module")
def models():
    if _triton_scan()[0] is None:
        pytest.skip(f"mamba_ssm unavailable: {_triton_scan()[1]}")
    torch.manual_seed(0)
    cfg = MambaConfig(d_model=128, n_layer=2, vocab_size=500, ssm_cfg={"d_state": 32, "headdim": 32, "chunk_size": 64, "ngroups": 2})
    ref = MambaLM(cfg, backend="torch").cuda()
    tri = MambaLM(cfg, backend="triton").cuda()
    tri.load_state_dict(ref.state_dict())
    return ref, tri


def run(model, ids, seq_idx=None, state=None, dtype=None):
    with torch.autocast("cuda", dtype=dtype, enabled=dtype is not None):
        logits, final = model(ids, seq_idx=seq_idx, state=state)
    return logits, final


@pytest.mark.parametrize("with_seq_idx", [False, True])
def test_logits_states_and_grads_match_fp32(models, with_seq_idx):
    ref, tri = models
    torch.backends.cuda.matmul.allow_tf32 = False
    ids = torch.randint(0, 500, (2, 300), device="cuda")  # not a multiple of the chunk size
    seq_idx = None
    if with_seq_idx:
        seq_idx = torch.zeros(2, 300, dtype=torch.int32, device="cuda")
        seq_idx[:, 100:] = 1
        seq_idx[1, 230:] = 2
    out = {}
    for name, m in (("ref", ref), ("tri", tri)):
        m.zero_grad()
        logits, final = run(m, ids, seq_idx)
        (logits.float().pow(2).mean() + sum(s.ssm.pow(2).mean() for s in final)).backward()
        out[name] = (logits, final, {n: p.grad.clone() for n, p in m.named_parameters()})
    (lr, fr, gr), (lt, ft, gt) = out["ref"], out["tri"]
    assert rel_err(lt, lr) < 1e-3
    for a, b in zip(ft, fr):
        assert rel_err(a.ssm, b.ssm) < 1e-3 and rel_err(a.conv, b.conv) < 1e-3  # conv inputs inherit the SSD's ~1e-4 differences
    for n in gr:
        assert rel_err(gt[n], gr[n]) < 2e-3, n


def test_dt_limit_in_the_kernels_matches_torch():
    """The chunked kernels apply dt_bias, the softplus and a dt_limit that clamps some steps themselves (the
    mixer hands them the raw dt): logits and gradients as the torch backend's, dt_bias's included."""
    if _triton_scan()[0] is None:
        pytest.skip(f"mamba_ssm unavailable: {_triton_scan()[1]}")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.manual_seed(1)
    cfg = MambaConfig(d_model=128, n_layer=2, vocab_size=500,
                      ssm_cfg={"d_state": 32, "headdim": 32, "chunk_size": 64, "dt_limit": (0.004, 0.03)})
    ref = MambaLM(cfg, backend="torch").cuda()
    tri = MambaLM(cfg, backend="triton").cuda()
    tri.load_state_dict(ref.state_dict())
    ids = torch.randint(0, 500, (2, 200), device="cuda")
    out = {}
    for name, m in (("ref", ref), ("tri", tri)):
        logits, _ = run(m, ids)
        logits.float().pow(2).mean().backward()
        out[name] = logits, {n: p.grad for n, p in m.named_parameters()}
    assert rel_err(out["tri"][0], out["ref"][0]) < 1e-3
    for n, g in out["ref"][1].items():
        assert rel_err(out["tri"][1][n], g) < 2e-3, n


def test_initial_state_pieces_match(models):
    ref, tri = models
    ids = torch.randint(0, 500, (2, 256), device="cuda")
    whole, _ = run(ref, ids)
    l1, s1 = run(tri, ids[:, :100])
    l2, _ = run(tri, ids[:, 100:], state=s1)
    assert rel_err(torch.cat([l1, l2], 1), whole) < 1e-3


def test_quadratic_scan_matches_the_triton_kernel(models):
    """quadratic_max_len replaces the Triton scan on CUDA for short inputs: same logits under bf16 autocast."""
    ref, tri = models
    ssm_cfg = {**tri.config.ssm_cfg, "quadratic_max_len": 64}
    quadratic = MambaLM(MambaConfig(**{**tri.config.to_dict(), "ssm_cfg": ssm_cfg}), backend="triton").cuda()
    quadratic.load_state_dict(tri.state_dict())
    ids = torch.randint(0, 500, (8, 48), device="cuda")
    seq_idx = torch.zeros(8, 48, dtype=torch.int32, device="cuda")
    seq_idx[:, 20:] = 1
    for docs in (None, seq_idx):
        lt, _ = run(tri, ids, docs, dtype=torch.bfloat16)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            lq, none = quadratic(ids, seq_idx=docs, return_state=False)
        assert none is None and rel_err(lq, lt) < 3e-2


def test_bf16_autocast_matches(models):
    ref, tri = models
    ids = torch.randint(0, 500, (4, 512), device="cuda")
    lr, _ = run(ref, ids, dtype=torch.bfloat16)
    lt, _ = run(tri, ids, dtype=torch.bfloat16)
    l32, _ = run(ref, ids)
    assert rel_err(lt, l32) < 3e-2 and rel_err(lt, lr) < 3e-2


def test_export_loads_in_official_mamba_ssm(tmp_path):
    """`save_pretrained` output loads with mamba_ssm's own MambaLMHeadModel.from_pretrained: same logits."""
    if _triton_scan()[0] is None:
        pytest.skip(f"mamba_ssm unavailable: {_triton_scan()[1]}")
    pytest.importorskip("transformers")  # mamba_ssm's config loader uses transformers' hub helpers
    from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel

    from lightning_mamba.models.checkpoint import save_pretrained

    torch.manual_seed(0)
    cfg = MambaConfig(d_model=128, n_layer=2, vocab_size=500, ssm_cfg={"layer": "Mamba2", "d_state": 32, "headdim": 32,
                                                                          "chunk_size": 64})
    ours = MambaLM(cfg, backend="triton").cuda().eval()
    save_pretrained(ours, str(tmp_path))
    official = MambaLMHeadModel.from_pretrained(str(tmp_path), device="cuda", dtype=torch.float32).eval()
    for block in official.backbone.layers:  # the fused default path needs causal-conv1d, which is not installed
        block.mixer.use_mem_eff_path = False
    ids = torch.randint(0, 500, (2, 200), device="cuda")
    with torch.no_grad():
        ours_logits, _ = ours(ids)
        official_logits = official(ids).logits
    assert official_logits.shape == ours_logits.shape
    assert rel_err(official_logits, ours_logits) < 1e-3


@pytest.mark.parametrize("setting", [None, "0"])
def test_mamba_ssms_autotuning_is_kept_on_disk_unless_the_user_said_no(setting):
    """Imported through the backend switch, mamba_ssm's autotuned kernels cache their choices (Triton reads
    TRITON_CACHE_AUTOTUNING as each decorator runs); a user's TRITON_CACHE_AUTOTUNING=0 stays. A fresh process: the
    test session may have imported mamba_ssm already."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_CACHE_AUTOTUNING"}
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)  # installed or not
    if setting is not None:
        env["TRITON_CACHE_AUTOTUNING"] = setting
    code = ("from lightning_mamba.models.kernels.backend import _triton_scan\n"
            "assert _triton_scan()[0] is not None, _triton_scan()[1]\n"
            "from mamba_ssm.ops.triton.ssd_chunk_state import _chunk_state_fwd_kernel as k\n"
            "print(k.cache_results)")
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split()[-1] == ("True" if setting is None else "False")
