"""Training throughput: our LightningModule through a real Trainer vs bare PyTorch loops, in one process.

    python benchmarks/train_throughput.py --config small            # GPU: vs mamba_ssm's MambaLMHeadModel
    python benchmarks/train_throughput.py --config cpu-small --device cpu   # CPU: vs our bare model and HF Mamba2
    python benchmarks/train_throughput.py --config 130m --contenders lightning_graph,lightning,ours,mamba_ssm

Contenders (docs/performance.md says more): ``lightning`` / ``lightning_graph`` (our MambaLitModule through a
Trainer, eager / with model.cuda_graph), ``lightning_graph_mambanorms`` (lightning_graph with mamba_ssm's Triton
norms in place of ours, models/kernels/norm_triton.py; CUDA only), ``lightning_graph_mambagated`` (only the gated
norm mamba_ssm's), ``lightning_graph_splitcat`` (lightning_graph with torch.split's backward, which concatenates
the pieces' gradients, in place of models/kernels/grad_slots.py's in-place writes), ``lightning_graph_savestates``
(lightning_graph with --model.save_chunk_states: the chunked scan's backward reuses the forward's states, more
memory, less time), ``lightning_graph_recompute`` and ``lightning_graph_savestates_recompute`` (those two with
--model.recompute_norm_output: in_proj's input made again in the backward from the norm's fp32 residual instead of
kept, less memory, one norm pass a layer more), ``ours`` (our MambaLM in a bare loop),
``mamba_ssm_fused`` (mamba_ssm's MambaLMHeadModel as its official configs train it: Mamba2 layers on the fused
``use_mem_eff_path`` kernel, ``fused_add_norm``; needs causal-conv1d, skipped with the reason without it),
``mamba_ssm`` (the same model unfused: ``use_mem_eff_path=False``, ``fused_add_norm=False``), ``hf`` (transformers'
Mamba2ForCausalLM).

Every contender trains the same config, batch and precision on random tokens (speed does not depend
on the text). Prints tokens/s, peak memory, MFU and each ratio against one named baseline measured in the same
process: on GPU ``mamba_ssm_fused`` when it ran, else ``mamba_ssm`` (``--baseline`` picks another). A column this
device cannot fill (peak memory off CUDA, MFU where the device's dense peak is unknown, e.g. a CPU) prints as
``-``, with a note above the rows saying why.
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import time

import torch

from lightning_mamba.callbacks.throughput import peak_flops

CONFIGS = {  # name: (d_model, n_layer, d_state, vocab, batch, seq_len, headdim)
    "130m": (768, 24, 128, 50277, 16, 2048, 64),
    "370m": (1024, 48, 128, 50277, 16, 2048, 64),  # the official 370m's shape: matmuls weigh more than at 130m
    "small": (512, 8, 128, 8192, 32, 2048, 64),
    "cpu-small": (128, 4, 64, 8192, 4, 1024, 32),
}
NORM_AB = {"lightning_graph_mambanorms": {"name": "mamba_ssm"}, "lightning_graph_mambagated": {"gated": "mamba_ssm"}}
# contender -> the model settings of lightning_graph it runs with (the speed-only ones)
SETTINGS_AB = {"lightning_graph_savestates": {"save_chunk_states": True},
               "lightning_graph_recompute": {"recompute_norm_output": True},
               "lightning_graph_savestates_recompute": {"save_chunk_states": True, "recompute_norm_output": True}}
GPU_CONTENDERS = "lightning_graph,lightning,mamba_ssm_fused,mamba_ssm"
CPU_CONTENDERS = "lightning,ours,hf"
MISSING = "-"  # a column this device cannot fill (peak memory off CUDA, MFU without a known peak)


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


def lightning_run(args, cfg, device, precision, cuda_graph=False, **model_settings):
    import lightning as L

    from lightning_mamba.training.module import MambaLitModule

    d_model, n_layer, d_state, vocab, batch, seq_len, headdim = cfg
    module = MambaLitModule(d_model=d_model, n_layer=n_layer, d_state=d_state, headdim=headdim, vocab_size=vocab,
                            backend="auto", warmup_steps=1, schedule="constant", lr=1e-4, cuda_graph=cuda_graph,
                            **model_settings)

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
    p.add_argument("--contenders", default=None, help="comma list of: lightning, lightning_graph (the same with "
                   "model.cuda_graph), lightning_graph_mambanorms (that with mamba_ssm's Triton norms), "
                   "lightning_graph_mambagated (only its gated norm), lightning_graph_splitcat (torch.split's "
                   "concatenating backward), lightning_graph_savestates (model.save_chunk_states), lightning_graph_recompute, "
                   "lightning_graph_savestates_recompute (model.recompute_norm_output), ours, "
                   "mamba_ssm_fused, mamba_ssm, hf (default: GPU "
                   f"{GPU_CONTENDERS}; CPU {CPU_CONTENDERS})")
    p.add_argument("--baseline", default=None, help="the contender every ratio is taken against (default: GPU the "
                   "first of mamba_ssm_fused, mamba_ssm that ran; CPU hf)")
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
    contenders = (args.contenders or (GPU_CONTENDERS if gpu else CPU_CONTENDERS)).split(",")
    tokens = batch * seq_len
    flops = model_flops_per_token(d_model, n_layer, d_state, vocab, headdim) * tokens
    name = torch.cuda.get_device_name() if gpu else "CPU"
    peak = peak_flops(device, dtype or torch.float32)  # dense FLOP/s; None on a CPU or an unlisted GPU
    print(f"# config {args.config}: d_model {d_model}, n_layer {n_layer}, d_state {d_state}, vocab {vocab}, "
          f"batch {batch} x {seq_len}, {'bf16-mixed' if gpu else 'fp32'}, device {name}, torch {torch.__version__}")
    print(f"# host: {_host_cpu()}; {_versions()}")
    for note in missing_notes(gpu, peak, name):
        print(f"# {MISSING} {note}")

    results = {}
    for c in contenders:
        if gpu:
            torch.cuda.reset_peak_memory_stats()
        try:
            if c in ("lightning", "lightning_graph"):
                dt = lightning_run(args, cfg, device, "bf16-mixed" if gpu else "32-true", c == "lightning_graph")
            elif c in NORM_AB:  # the same step with some of mamba_ssm's Triton norms in place of ours
                if not gpu:
                    raise Skip("the Triton norms run on CUDA")
                from lightning_mamba.models.kernels.backend import norm_kernels

                with norm_kernels(**NORM_AB[c]):
                    dt = lightning_run(args, cfg, device, "bf16-mixed", True)
            elif c == "lightning_graph_splitcat":  # the same step with the splits' gradients concatenated
                from lightning_mamba.models.kernels.grad_slots import in_place

                with in_place(False):
                    dt = lightning_run(args, cfg, device, "bf16-mixed" if gpu else "32-true", gpu)
            elif c in SETTINGS_AB:  # the same step with speed-only model settings (the scan's states kept, ...)
                dt = lightning_run(args, cfg, device, "bf16-mixed" if gpu else "32-true", gpu, **SETTINGS_AB[c])
            else:
                model, loss_fn = build_bare(c, cfg, device)
                dt = bare_loop(model, batch, seq_len, vocab, args.steps, args.warmup, device, dtype, loss_fn)
                del model
        except (ImportError, Skip) as e:
            print(f"{c:>15}: skipped ({e})")
            continue
        mem = torch.cuda.max_memory_allocated() / 2**30 if gpu else None
        mfu = flops / dt / peak if peak else None
        results[c] = dt
        print(result_line(c, tokens / dt, dt, mem, mfu))
        if gpu:  # the run's module, trainer and CUDA graphs (their memory pools) hold cycles: free them first
            gc.collect()
            torch.cuda.empty_cache()
    baseline = args.baseline or next((b for b in (("mamba_ssm_fused", "mamba_ssm") if gpu else ("hf",))
                                      if b in results), None)
    # Every ratio names its baseline, measured in this process. With the fused mamba_ssm loop as the baseline the
    # unfused one (the baseline of earlier measurements) is a second, named reference.
    for ref in [baseline] + (["mamba_ssm"] if baseline == "mamba_ssm_fused" else []):
        if ref is None:
            continue
        if ref not in results:
            print(f"# no ratios against {ref}: it did not run in this process")
            continue
        print(f"# speed against {ref}{' (baseline)' if ref == baseline else ''}, measured in this process:")
        for c, dt in results.items():
            print(f"ratio {c}/{ref}: {results[ref] / dt:.3f}")
    if baseline is None:
        print("# no baseline ran in this process (--baseline names one)")
    if "lightning" in results and "ours" in results:  # the Lightning step against our bare loop: its overhead
        print("# the Lightning step against our bare loop, measured in this process:")
        print(f"ratio lightning/ours: {results['ours'] / results['lightning']:.3f}")


def result_line(name: str, tokens_per_sec: float, seconds_per_step: float, peak_gib: float | None,
                mfu: float | None) -> str:
    """One contender's row; a value this device cannot give (None, or not finite) prints as MISSING, never nan."""
    def cell(value, fmt, width):
        ok = value is not None and math.isfinite(value)
        return format(value, fmt) if ok else MISSING.rjust(width)

    return (f"{name:>15}: {tokens_per_sec:12,.0f} tokens/s  {seconds_per_step * 1e3:8.1f} ms/step  "
            f"peak {cell(peak_gib, '6.1f', 6)} GiB  MFU {cell(mfu, '6.1%', 6)}")


def missing_notes(gpu: bool, peak: float | None, device_name: str) -> list[str]:
    """What a MISSING column means on this device (printed once, before the rows)."""
    notes = []
    if not gpu:
        notes.append("peak GiB: peak memory is measured on CUDA only")
    if not peak:
        notes.append(f"MFU: no known peak FLOP/s for {device_name} (lightning_mamba.callbacks.throughput.PEAK_FLOPS)")
    return notes


class Skip(Exception):
    """A contender that cannot run here; the message says why (printed, and the other contenders run)."""


def official_model(cfg, device, fused):
    """mamba_ssm's MambaLMHeadModel with Mamba2 layers, RMSNorm and fp32 residuals.

    ``fused``: mamba_ssm's own defaults (mamba-ssm 2.3.2: MambaConfig rms_norm, residual_in_fp32 and fused_add_norm
    True; Mamba2 use_mem_eff_path True), the path its training configs take. Each Mamba2 layer runs ``mamba_split_conv1d_scan_combined``
    (``use_mem_eff_path=True``: in_proj's output split, causal-conv1d's CUDA conv + SiLU, the Triton SSD scan, the
    gated RMSNorm and out_proj in one autograd function that recomputes instead of storing), and the blocks use
    the Triton residual-add + RMSNorm (``fused_add_norm=True``). That path needs causal-conv1d's CUDA extension;
    without it this raises Skip with the reason. Unfused: ``use_mem_eff_path=False`` (in_proj, then the conv
    through ``causal_conv1d_fn`` if causal-conv1d imports, else nn.Conv1d + SiLU, then ``mamba_chunk_scan_combined``
    and the gated RMSNorm as separate calls) and ``fused_add_norm=False``.
    """
    d_model, n_layer, d_state, vocab, batch, seq_len, headdim = cfg
    if device != "cuda":
        raise Skip("mamba_ssm's kernels need CUDA")
    from lightning_mamba.models.kernels.backend import _triton_scan

    _triton_scan()  # installs the placeholder for the Mamba-1 extension if needed
    import mamba_ssm.modules.mamba2 as official_mamba2
    import mamba_ssm.ops.triton.ssd_combined as official_ssd
    from mamba_ssm.models.config_mamba import MambaConfig as OfficialConfig
    from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel

    if fused and official_ssd.causal_conv1d_fwd_function is None:
        raise Skip(f"causal_conv1d does not import ({_causal_conv1d_missing()}); mamba_ssm's fused path "
                   "(use_mem_eff_path) needs its CUDA extension: README, 'Offline GPU nodes', says how to build it")
    oc = OfficialConfig(d_model=d_model, n_layer=n_layer, vocab_size=vocab, rms_norm=True, residual_in_fp32=True,
                        fused_add_norm=fused, ssm_cfg={"layer": "Mamba2", "d_state": d_state, "headdim": headdim,
                                                       "use_mem_eff_path": fused})
    model = MambaLMHeadModel(oc, device=device)
    mixer = model.backbone.layers[0].mixer
    assert mixer.use_mem_eff_path == fused and model.backbone.fused_add_norm == fused
    if fused:
        path = "mamba_split_conv1d_scan_combined (causal_conv1d CUDA conv) + Triton add/RMSNorm"
    else:
        conv = "causal_conv1d_fn" if official_mamba2.causal_conv1d_fn is not None else "nn.Conv1d + SiLU"
        path = f"in_proj, {conv}, mamba_chunk_scan_combined, gated RMSNorm, out_proj; add + RMSNorm apart"
    print(f"# {'mamba_ssm_fused' if fused else 'mamba_ssm'}: {path}")
    return model


def _causal_conv1d_missing():
    try:
        from causal_conv1d.cpp_functions import causal_conv1d_fwd_function  # noqa: F401
    except Exception as e:  # ImportError, or a build for another torch (undefined symbol)
        return f"{type(e).__name__}: {e}"
    return "it imports now, but did not when mamba_ssm was imported"


def _host_cpu():
    """The host CPU's model and core count: the 130m step is bound by the CPU's kernel launches on some hosts."""
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "?")
    except OSError:
        model = "?"
    return f"{model}, {os.cpu_count()} cores"


def _versions():
    from importlib.metadata import PackageNotFoundError, version

    def v(name):
        try:
            return version(name)
        except PackageNotFoundError:
            return "absent"

    return ", ".join(f"{n} {v(n)}" for n in ("lightning", "triton", "mamba_ssm", "causal_conv1d"))


def logits_loss(logits_of):
    """The loss of a model that returns logits: cross-entropy on their fp32 upcast (what mamba_ssm's and HF's
    training scripts do)."""
    def loss_fn(model, ids, labels):
        logits = logits_of(model, ids)
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), labels.flatten())

    return loss_fn


def build_bare(kind, cfg, device, ssm_extra: dict | None = None):
    """(model, loss_fn) of a bare-loop contender: ``ours`` (our MambaLM and its own training loss,
    MambaLM.loss; ``ssm_extra`` adds mixer settings such as chunk_size or quadratic_max_len), ``mamba_ssm_fused``
    / ``mamba_ssm`` (MambaLMHeadModel, fused / unfused) or ``hf`` (transformers' Mamba2ForCausalLM)."""
    d_model, n_layer, d_state, vocab, batch, seq_len, headdim = cfg
    torch.manual_seed(0)
    if kind == "ours":
        from lightning_mamba.models import MambaConfig, MambaLM

        mc = MambaConfig(d_model=d_model, n_layer=n_layer, vocab_size=vocab,
                         ssm_cfg={"layer": "Mamba2", "d_state": d_state, "headdim": headdim, **(ssm_extra or {})})
        # no final state, as the training step asks (training/module.py); mamba_ssm's forward returns none either
        return MambaLM(mc).to(device), lambda m, x, y: m.loss(x, y, return_state=False)[0]
    if ssm_extra:
        raise ValueError(f"mixer settings {sorted(ssm_extra)} apply to the 'ours' contender only, not {kind!r}")
    if kind in ("mamba_ssm", "mamba_ssm_fused"):
        return official_model(cfg, device, fused=kind == "mamba_ssm_fused"), logits_loss(lambda m, x: m(x).logits)
    if kind == "hf":
        from transformers import Mamba2Config, Mamba2ForCausalLM

        hc = Mamba2Config(hidden_size=d_model, num_hidden_layers=n_layer, state_size=d_state, head_dim=headdim,
                          num_heads=2 * d_model // headdim, expand=2, n_groups=1, vocab_size=vocab, chunk_size=256)
        return Mamba2ForCausalLM(hc).to(device), logits_loss(lambda m, x: m(x).logits)
    raise ValueError(f"unknown contender {kind!r}")


if __name__ == "__main__":
    main()
