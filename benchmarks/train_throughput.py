"""Training throughput: our LightningModule through a real Trainer vs bare PyTorch loops, in one process.

    python benchmarks/train_throughput.py --config small            # GPU: vs mamba_ssm's MambaLMHeadModel
    python benchmarks/train_throughput.py --config cpu-small --device cpu   # CPU: vs our bare model and HF Mamba2
    python benchmarks/train_throughput.py --config 130m --contenders lightning_graph,lightning,ours,mamba_ssm

Every contender trains the same config, batch and precision on random tokens (speed does not depend
on the text). Prints tokens/s, peak memory, MFU and each ratio against the named baseline.
"""

from __future__ import annotations

import argparse
import time

import torch

CONFIGS = {  # name: (d_model, n_layer, d_state, vocab, batch, seq_len, headdim)
    "130m": (768, 24, 128, 50277, 16, 2048, 64),
    "small": (512, 8, 128, 8192, 32, 2048, 64),
    "cpu-small": (128, 4, 64, 8192, 4, 1024, 32),
}
PEAK_BF16_TFLOPS = {"H200": 989.4, "H100": 989.4, "A100": 312.0}


def model_flops_per_token(d_model, n_layer, d_state, vocab, headdim):
    """The project's estimate (models/flops.py, also MambaLitModule.flops_per_batch) for the model every contender
    trains: the mixer's other settings at their defaults, the vocabulary padded as ours pads it."""
    from lightning_mamba.models import MambaConfig
    from lightning_mamba.models.flops import train_flops_per_token

    config = MambaConfig(d_model=d_model, n_layer=n_layer, vocab_size=vocab,
                         ssm_cfg={"layer": "Mamba2", "d_state": d_state, "headdim": headdim})
    return train_flops_per_token(config)


def bare_loop(model, batch, seq_len, vocab, steps, warmup, device, dtype, loss_fn):
    """Seconds per step of a plain AdamW loop; ``loss_fn(model, input_ids, labels)`` runs under autocast."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device == "cuda")
    ids = torch.randint(0, vocab, (batch, seq_len + 1), device=device)
    for i in range(warmup + steps):
        if i == warmup:
            _sync(device)
            t0 = time.perf_counter()
        train_step(model, opt, ids, device, dtype, loss_fn)
    _sync(device)
    return (time.perf_counter() - t0) / steps


def train_step(model, opt, ids, device, dtype, loss_fn) -> None:
    """One bare-loop step: loss under autocast, backward, clip to 1.0, AdamW, zero the gradients."""
    with torch.autocast(device, dtype=dtype, enabled=dtype is not None):
        loss = loss_fn(model, ids[:, :-1], ids[:, 1:])
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)


def lightning_run(args, cfg, device, precision, cuda_graph=False):
    import lightning as L

    from lightning_mamba.training.module import MambaLitModule

    d_model, n_layer, d_state, vocab, batch, seq_len, headdim = cfg
    module = MambaLitModule(d_model=d_model, n_layer=n_layer, d_state=d_state, headdim=headdim, vocab_size=vocab,
                            backend="auto", warmup_steps=1, schedule="constant", lr=1e-4, cuda_graph=cuda_graph)

    class Random(torch.utils.data.Dataset):
        def __len__(self):
            return 10**6

        def __getitem__(self, i):
            ids = torch.randint(0, vocab, (seq_len + 1,))
            return {"input_ids": ids[:-1], "labels": ids[1:]}

    class Timer(L.Callback):
        """From the first timed batch's start to the last one's end (its optimizer step done): the training loop,
        as the bare loops are timed, without the end of fit (epoch-end hooks, data loader shutdown)."""

        def on_train_batch_start(self, trainer, *_):
            if trainer.global_step == args.warmup:
                _sync(device)
                self.t0 = time.perf_counter()

        def on_train_batch_end(self, trainer, *_):
            if trainer.global_step == args.warmup + args.steps:
                _sync(device)
                self.dt = (time.perf_counter() - self.t0) / args.steps

        def on_train_end(self, trainer, *_):
            _sync(device)
            self.end_of_fit = time.perf_counter() - self.t0 - self.dt * args.steps

    timer = Timer()
    loader = torch.utils.data.DataLoader(Random(), batch_size=batch, num_workers=args.loader_workers,
                                         pin_memory=device == "cuda" and args.loader_workers > 0)
    trainer = L.Trainer(accelerator=device, devices=1, precision=precision, max_steps=args.warmup + args.steps,
                        gradient_clip_val=1.0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[timer], num_sanity_val_steps=0, limit_val_batches=0)
    trainer.fit(module, loader)
    print(f"# lightning: {timer.end_of_fit * 1e3:.0f} ms from the last step's end to on_train_end (not timed)")
    return timer.dt


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", choices=sorted(CONFIGS), default="small")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int)
    p.add_argument("--seq_len", type=int)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--contenders", default=None, help="comma list of: lightning, "
                   "lightning_graph (the same with model.cuda_graph), ours, mamba_ssm, hf")
    p.add_argument("--loader_workers", type=int, default=2, help="the Lightning run's DataLoader workers (0: in the "
                   "main process, no pinned-memory thread)")
    args = p.parse_args()

    cfg = list(CONFIGS[args.config])
    cfg[4] = args.batch or cfg[4]
    cfg[5] = args.seq_len or cfg[5]
    d_model, n_layer, d_state, vocab, batch, seq_len, headdim = cfg
    device = args.device
    gpu = device == "cuda"
    dtype = torch.bfloat16 if gpu else None
    contenders = (args.contenders or ("lightning_graph,lightning,mamba_ssm" if gpu else "lightning,ours,hf")).split(",")
    baseline = "mamba_ssm" if gpu else "hf"
    tokens = batch * seq_len
    flops = model_flops_per_token(d_model, n_layer, d_state, vocab, headdim) * tokens
    name = torch.cuda.get_device_name() if gpu else "CPU"
    peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
    print(f"# config {args.config}: d_model {d_model}, n_layer {n_layer}, d_state {d_state}, vocab {vocab}, "
          f"batch {batch} x {seq_len}, {'bf16-mixed' if gpu else 'fp32'}, device {name}, torch {torch.__version__}")

    results = {}
    for c in contenders:
        if gpu:
            torch.cuda.reset_peak_memory_stats()
        try:
            if c in ("lightning", "lightning_graph"):
                dt = lightning_run(args, cfg, device, "bf16-mixed" if gpu else "32-true", c == "lightning_graph")
            else:
                model, loss_fn = build_bare(c, cfg, device)
                dt = bare_loop(model, batch, seq_len, vocab, args.steps, args.warmup, device, dtype, loss_fn)
                del model
        except ImportError as e:
            print(f"{c:>10}: skipped ({e})")
            continue
        mem = torch.cuda.max_memory_allocated() / 2**30 if gpu else float("nan")
        mfu = flops / dt / 1e12 / peak if peak else float("nan")
        results[c] = dt
        print(f"{c:>10}: {tokens / dt:12,.0f} tokens/s  {dt * 1e3:8.1f} ms/step  peak {mem:6.1f} GiB  MFU {mfu:6.1%}")
        if gpu:
            torch.cuda.empty_cache()
    if baseline in results:
        for c, dt in results.items():
            print(f"ratio {c}/{baseline}: {results[baseline] / dt:.3f}")
    if "lightning" in results and "ours" in results:
        print(f"ratio lightning/ours: {results['ours'] / results['lightning']:.3f}")


def logits_loss(logits_of):
    """The loss of a model that returns logits: cross-entropy on their fp32 upcast (what mamba_ssm's and HF's
    training scripts do)."""
    def loss_fn(model, ids, labels):
        logits = logits_of(model, ids)
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), labels.flatten())

    return loss_fn


def build_bare(kind, cfg, device):
    """(model, loss_fn) of a bare-loop contender: ``ours`` (our MambaLM and its own training loss,
    MambaLM.loss), ``mamba_ssm`` (MambaLMHeadModel) or ``hf``
    (transformers' Mamba2ForCausalLM)."""
    d_model, n_layer, d_state, vocab, batch, seq_len, headdim = cfg
    torch.manual_seed(0)
    if kind == "ours":
        from lightning_mamba.models import MambaConfig, MambaLM

        mc = MambaConfig(d_model=d_model, n_layer=n_layer, vocab_size=vocab,
                         ssm_cfg={"layer": "Mamba2", "d_state": d_state, "headdim": headdim})
        return MambaLM(mc).to(device), lambda m, x, y: m.loss(x, y)[0]
    if kind == "mamba_ssm":
        from lightning_mamba.models.kernels.backend import _triton_scan

        _triton_scan()  # installs the placeholder for the Mamba-1 extension if needed
        from mamba_ssm.models.config_mamba import MambaConfig as OfficialConfig
        from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel

        oc = OfficialConfig(d_model=d_model, n_layer=n_layer, vocab_size=vocab, fused_add_norm=False,
                            ssm_cfg={"layer": "Mamba2", "d_state": d_state, "headdim": headdim, "use_mem_eff_path": False})
        return MambaLMHeadModel(oc, device=device), logits_loss(lambda m, x: m(x).logits)
    if kind == "hf":
        from transformers import Mamba2Config, Mamba2ForCausalLM

        hc = Mamba2Config(hidden_size=d_model, num_hidden_layers=n_layer, state_size=d_state, head_dim=headdim,
                          num_heads=2 * d_model // headdim, expand=2, n_groups=1, vocab_size=vocab, chunk_size=256)
        return Mamba2ForCausalLM(hc).to(device), logits_loss(lambda m, x: m(x).logits)
    raise ValueError(f"unknown contender {kind!r}")


if __name__ == "__main__":
    main()
