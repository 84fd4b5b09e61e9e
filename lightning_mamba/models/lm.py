"""Mamba-2 language model with the official ``MambaLMHeadModel`` layout and state_dict keys."""

from __future__ import annotations

import math
from dataclasses import replace

import torch
from torch import Tensor, nn

from .config import SPEED_ONLY_SETTINGS, ConfigError, MambaConfig
from .kernels import backend as kernels
from .loss import linear_cross_entropy
from .mixer import LayerState, Mamba2
from .norm import RMSNorm

State = list[LayerState]  # one LayerState per layer


class Block(nn.Module):
    """residual += h; h = mixer(norm(residual)). The residual stream is kept in fp32."""

    def __init__(self, config: MambaConfig, layer_idx: int, backend: str):
        super().__init__()
        self.residual_in_fp32 = config.residual_in_fp32
        self.norm = RMSNorm(config.d_model)
        self.mixer = Mamba2(config.d_model, layer_idx=layer_idx, backend=backend, **config.mixer)

    def _add_norm(self, h: Tensor, residual: Tensor | None) -> tuple[Tensor, Tensor]:
        return kernels.add_rmsnorm(self.mixer.backend, h, residual, self.norm, self.residual_in_fp32)

    def forward(self, h, residual, state=None, seq_idx=None, record=None, return_state=True):
        h, residual = self._add_norm(h, residual)
        with kernels.norm_output_kept(self.mixer.backend, h, residual, self.norm, self.mixer.recompute_norm_output):
            h, state = self.mixer(h, state, seq_idx, record, return_state)
        return h, residual, state

    def step(self, h, residual, state):
        h, residual = self._add_norm(h, residual)
        h, state = self.mixer.step(h, state)
        return h, residual, state


class Backbone(nn.Module):
    def __init__(self, config: MambaConfig, backend: str):
        super().__init__()
        self.embedding = nn.Embedding(config.padded_vocab_size, config.d_model)
        self.layers = nn.ModuleList(Block(config, i, backend) for i in range(config.n_layer))
        self.norm_f = RMSNorm(config.d_model)


class MambaLM(nn.Module):
    """``forward(input_ids, state, seq_idx)`` -> (logits, final state); ``step`` decodes one token."""

    def __init__(self, config: MambaConfig, backend: str = "auto"):
        super().__init__()
        self.config = config
        self.backbone = Backbone(config, backend)
        self.lm_head = nn.Linear(config.d_model, config.padded_vocab_size, bias=False)
        self.apply(self._init_weights)
        if config.tie_embeddings:
            self.lm_head.weight = self.backbone.embedding.weight

    def _init_weights(self, module: nn.Module) -> None:
        # The official _init_weights: zero linear biases, N(0, 0.02) embeddings, and out_proj
        # re-initialised then scaled by 1/sqrt(n_layer) (one residual branch per layer).
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, Mamba2):
            nn.init.kaiming_uniform_(module.out_proj.weight, a=math.sqrt(5))
            with torch.no_grad():
                module.out_proj.weight /= math.sqrt(self.config.n_layer)

    @property
    def mixers(self) -> list[Mamba2]:
        return [layer.mixer for layer in self.backbone.layers]

    def set_backend(self, backend: str) -> None:
        for m in self.mixers:
            m.backend = backend

    def set_scan_settings(self, **settings) -> None:
        """Change the scan's speed-only settings (``SPEED_ONLY_SETTINGS``: chunk_size, quadratic_max_len,
        save_chunk_states, recompute_norm_output) of a built model, its config included: same weights, same results
        (a fine-tune can take a faster scan)."""
        unknown = sorted(set(settings) - set(SPEED_ONLY_SETTINGS))
        if unknown:
            raise ConfigError(f"{', '.join(unknown)} change the model, not only its scan's speed: only "
                              f"{', '.join(SPEED_ONLY_SETTINGS)} can be changed on a built model")
        config = replace(self.config, ssm_cfg={**self.config.ssm_cfg, **settings})  # validates them
        for m in self.mixers:
            for key, value in settings.items():
                setattr(m, key, value)
        self.config = config

    def empty_state(self, batch: int, device=None, dtype=torch.float32) -> State:
        return [m.empty_state(batch, device, dtype) for m in self.mixers]

    def forward(
        self,
        input_ids: Tensor,
        state: State | None = None,
        seq_idx: Tensor | None = None,
        record: list[dict] | None = None,
        return_state: bool = True,
    ) -> tuple[Tensor, State | None]:
        """input_ids (b, l) -> logits (b, l, padded_vocab) and the state after the last token.

        ``record``: a list that receives one dict per layer (per-step dt, A) for analysis. ``return_state=False``:
        the state is None and no layer builds it (training and validation, which drop it)."""
        h, new_state = self.hidden_states(input_ids, state, seq_idx, record, return_state)
        return self.lm_head(h), new_state

    def hidden_states(
        self,
        input_ids: Tensor,
        state: State | None = None,
        seq_idx: Tensor | None = None,
        record: list[dict] | None = None,
        return_state: bool = True,
    ) -> tuple[Tensor, State | None]:
        """As :meth:`forward`, but the final-norm hidden states (b, l, d_model) instead of the logits."""
        h = kernels.embedding(self.mixers[0].backend, input_ids, self.backbone.embedding.weight)
        residual, new_state = None, []
        for i, layer in enumerate(self.backbone.layers):
            rec = None
            if record is not None:
                rec = {}
                record.append(rec)
            h, residual, s = layer(h, residual, None if state is None else state[i], seq_idx, rec, return_state)
            new_state.append(s)
        return self._final_norm(h, residual), new_state if return_state else None

    def loss(
        self, input_ids: Tensor, labels: Tensor, state: State | None = None, seq_idx: Tensor | None = None,
        return_state: bool = True,
    ) -> tuple[Tensor, State | None]:
        """Mean next-token cross-entropy against ``labels`` (-100: no loss) and the final state (None with
        ``return_state=False``), without ever materialising the logits (models/loss.py)."""
        h, new_state = self.hidden_states(input_ids, state, seq_idx, return_state=return_state)
        fused = kernels.uses_triton(self.mixers[0].backend, h)  # the one kernel switch decides the loss's too
        return linear_cross_entropy(h, self.lm_head.weight, labels, fused=fused), new_state

    def _final_norm(self, h: Tensor, residual: Tensor) -> Tensor:
        return kernels.add_rmsnorm(self.mixers[0].backend, h, residual, self.backbone.norm_f, self.config.residual_in_fp32)[0]

    def step(self, input_ids: Tensor, state: State) -> tuple[Tensor, State]:
        """input_ids (b,) -> logits (b, padded_vocab) and the new state."""
        h, residual, new_state = self.backbone.embedding(input_ids), None, []
        for layer, s in zip(self.backbone.layers, state):
            h, residual, s = layer.step(h, residual, s)
            new_state.append(s)
        return self.lm_head(self._final_norm(h, residual)), new_state
