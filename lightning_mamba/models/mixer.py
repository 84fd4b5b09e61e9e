"""The Mamba-2 mixer, with the official parameter names, shapes, init and math (docs/mamba2.md)."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor, nn

from .config import SSM_DEFAULTS
from .kernels import backend as kernels
from .kernels.grad_slots import split_last
from .norm import RMSNormGated
from .ssd import positive_dt, ssd_sampling_states, ssd_step


class LayerState(NamedTuple):
    """What a layer carries between pieces of a sequence."""

    conv: Tensor  # (b, conv_dim, d_conv - 1): the last inputs of the convolution
    ssm: Tensor  # (b, nheads, headdim, d_state), fp32


class Mamba2(nn.Module):
    def __init__(
        self,
        d_model: int,
        d_state: int = SSM_DEFAULTS.d_state,
        d_conv: int = SSM_DEFAULTS.d_conv,
        expand: int = SSM_DEFAULTS.expand,
        headdim: int = SSM_DEFAULTS.headdim,
        ngroups: int = SSM_DEFAULTS.ngroups,
        A_init_range: tuple[float, float] = SSM_DEFAULTS.A_init_range,
        dt_min: float = SSM_DEFAULTS.dt_min,
        dt_max: float = SSM_DEFAULTS.dt_max,
        dt_init_floor: float = SSM_DEFAULTS.dt_init_floor,
        dt_limit: tuple[float, float] = SSM_DEFAULTS.dt_limit,
        bias: bool = SSM_DEFAULTS.bias,
        conv_bias: bool = SSM_DEFAULTS.conv_bias,
        chunk_size: int = SSM_DEFAULTS.chunk_size,
        rmsnorm: bool = SSM_DEFAULTS.rmsnorm,
        norm_before_gate: bool = SSM_DEFAULTS.norm_before_gate,
        quadratic_max_len: int = SSM_DEFAULTS.quadratic_max_len,
        save_chunk_states: bool = SSM_DEFAULTS.save_chunk_states,
        recompute_norm_output: bool = SSM_DEFAULTS.recompute_norm_output,
        conv_init: float | None = SSM_DEFAULTS.conv_init,
        layer_idx: int | None = None,
        backend: str = "auto",
    ):
        super().__init__()
        self.d_model, self.d_state, self.d_conv, self.headdim, self.ngroups = d_model, d_state, d_conv, headdim, ngroups
        self.d_inner = expand * d_model
        self.nheads = self.d_inner // headdim
        self.conv_dim = self.d_inner + 2 * ngroups * d_state
        self.dt_limit = tuple(dt_limit)
        self.chunk_size = chunk_size
        self.quadratic_max_len = quadratic_max_len  # inputs this short from a zero state: the scan's attention form
        self.save_chunk_states = save_chunk_states  # the chunked kernels' backward reuses the forward's states
        self.recompute_norm_output = recompute_norm_output  # its input remade in the backward (the Block does it)
        self.layer_idx = layer_idx
        self.backend = backend
        # Eval-time interventions (mitigations/interventions.py); None = the model as trained.
        # intervention(mixer, dt, A, B) -> (dt, A, B) or (dt, A, B, log_decay_offset): rewrites the SSM parameters.
        self.intervention = None
        # state_hook(mixer, LayerState) -> LayerState: applied to the state a forward/step hands on.
        self.state_hook = None
        # forward_override(mixer, u, state, seq_idx, record): replaces forward (the sliding window, mitigations/window.py).
        self.forward_override = None
        # Analysis: with a record, also keep the SSM state every N tokens in record["states"] (pure-torch scan in
        # chunks of N; same math), so one pass samples the state along a long input (analysis/evaluator.py).
        self.states_every: int | None = None

        self.in_proj = nn.Linear(d_model, 2 * self.d_inner + 2 * ngroups * d_state + self.nheads, bias=bias)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, d_conv, groups=self.conv_dim, padding=d_conv - 1, bias=conv_bias)
        if conv_init is not None:  # official Mamba2's option; else nn.Conv1d's default init
            nn.init.uniform_(self.conv1d.weight, -conv_init, conv_init)

        dt = torch.exp(torch.rand(self.nheads) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = torch.clamp(dt, min=dt_init_floor)
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
        self.dt_bias._no_weight_decay = True
        A = torch.empty(self.nheads).uniform_(*A_init_range)
        self.A_log = nn.Parameter(torch.log(A))
        self.A_log._no_weight_decay = True
        self.D = nn.Parameter(torch.ones(self.nheads))
        self.D._no_weight_decay = True
        self.norm = RMSNormGated(self.d_inner, group_size=self.d_inner // ngroups)
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias)

    # ---- pieces shared by the parallel and the recurrent form -----------------
    def _split(self, zxbcdt: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return split_last(zxbcdt, [self.d_inner, self.conv_dim, self.nheads])

    def _ssm_params(
        self, xBC: Tensor, dt_raw: Tensor, dt_in_scan: bool = False
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        """After the conv: x, B, C, dt = softplus(dt_raw + dt_bias) (fp32; with ``dt_in_scan``, dt_raw itself: the
        scan adds dt_bias and applies the softplus and dt_limit), A = -exp(A_log) (fp32) and x_scan, the x the scan
        multiplies by dt (x itself unless an intervention shifts the decay only)."""
        groups = (self.ngroups, self.d_state)
        x, B, C = split_last(xBC, [(self.nheads, self.headdim), groups, groups])
        ct = torch.promote_types(dt_raw.dtype, torch.float32)  # fp32 (fp64 in exactness tests)
        dt = dt_raw if dt_in_scan else positive_dt(dt_raw, self.dt_bias, self.dt_limit)
        A = -torch.exp(self.A_log.to(ct))
        x_scan = x
        if self.intervention is not None:
            dt, A, B, *offset = self.intervention(self, dt, A, B)
            if offset and offset[0]:
                # log alpha += offset with the input X = x * dt kept: dt' = dt + offset / A, x' = x * dt / dt'
                dt_decay = dt + offset[0] / A
                x_scan = x.to(ct) * (dt / dt_decay)[..., None]
                dt = dt_decay
        return x, B, C, dt, A, x_scan

    def _finish(self, y: Tensor, x: Tensor, z: Tensor, add_skip: bool = True) -> Tensor:
        if add_skip:  # D skip before the gated norm (unless the scan already added it)
            y = y + x * self.D.to(x.dtype)[:, None]
        y = kernels.gated_rmsnorm(self.backend, y.flatten(-2), z, self.norm)
        return self.out_proj(y)

    # ---- forward ---------------------------------------------------------------
    def forward(
        self,
        u: Tensor,
        state: LayerState | None = None,
        seq_idx: Tensor | None = None,
        record: dict | None = None,
        return_state: bool = True,
    ) -> tuple[Tensor, LayerState | None]:
        """u (b, l, d_model) -> (out (b, l, d_model), final LayerState).

        ``state`` continues from an earlier piece; ``seq_idx`` (b, l) restarts the state (SSM and conv)
        where it changes; ``record``, if given, receives per-step ``dt`` (b, l, h) and ``A`` (h) for analysis
        (dt * A is the log decay actually used, interventions included). ``return_state=False`` (training's loss):
        the final state is None, and the scan need not build it.
        """
        if self.forward_override is not None:
            out, new_state = self.forward_override(self, u, state, seq_idx, record)
            return out, new_state if return_state else None
        z, xBC, dt_raw = self._split(self.in_proj(u))
        xBC, conv_state = kernels.conv1d_silu(
            self.backend, xBC, self.conv1d.weight, self.conv1d.bias, None if state is None else state.conv, seq_idx,
            return_state,
        )
        # the scan's kernels take dt_raw and dt_bias (mamba_ssm's dt_softplus: no softplus passes, and dt's gradient
        # written into the split's buffer) unless an intervention or a record needs dt itself
        dt_in_scan = self.intervention is None and record is None
        x, B, C, dt, A, x_scan = self._ssm_params(xBC, dt_raw, dt_in_scan)
        if record is not None:
            record["dt"], record["A"] = dt.detach(), A.detach()
        sample_states = record is not None and bool(self.states_every)
        # D * x is added inside the scan, except after an intervention rescaled x_scan or when sampling states
        skip_in_scan = x_scan is x and not sample_states
        initial = None if state is None else state.ssm
        if sample_states:
            y, ssm_state, record["states"] = ssd_sampling_states(
                x_scan, dt, A, B, C, self.states_every, self.chunk_size, initial_state=initial, seq_idx=seq_idx
            )
        else:
            y, ssm_state = kernels.ssd(
                self.backend, x_scan, dt, A, B, C, self.chunk_size, initial_state=initial, seq_idx=seq_idx,
                D=self.D if skip_in_scan else None, quadratic_max_len=self.quadratic_max_len,
                return_final_state=return_state, dt_bias=self.dt_bias if dt_in_scan else None, dt_limit=self.dt_limit,
                save_chunk_states=self.save_chunk_states,
            )
        out = self._finish(y.to(x.dtype), x, z, add_skip=not skip_in_scan)
        return out, self._hand_on(LayerState(conv_state, ssm_state)) if return_state else None

    def _hand_on(self, state: LayerState) -> LayerState:
        return state if self.state_hook is None else self.state_hook(self, state)

    def step(self, u: Tensor, state: LayerState) -> tuple[Tensor, LayerState]:
        """One token: u (b, d_model) -> (out (b, d_model), new state). Same math as forward."""
        if self.forward_override is not None:
            out, state = self.forward_override(self, u[:, None], state, None, None)
            return out[:, 0], state
        z, xBC, dt_raw = self._split(self.in_proj(u))
        xBC, conv_state = kernels.conv1d_silu_step(self.backend, xBC, state.conv, self.conv1d.weight, self.conv1d.bias)
        x, B, C, dt, A, x_scan = self._ssm_params(xBC, dt_raw)
        y, ssm_state = ssd_step(state.ssm, x_scan, dt, A, B, C)
        return self._finish(y.to(x.dtype), x, z), self._hand_on(LayerState(conv_state, ssm_state))

    def empty_state(self, batch: int, device=None, dtype=torch.float32) -> LayerState:
        return LayerState(
            torch.zeros(batch, self.conv_dim, self.d_conv - 1, device=device, dtype=dtype),
            torch.zeros(batch, self.nheads, self.headdim, self.d_state, device=device, dtype=torch.float32),
        )
