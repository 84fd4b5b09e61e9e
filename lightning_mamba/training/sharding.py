"""FSDP (Lightning's FSDPStrategy: torch's FullyShardedDataParallel around the LightningModule): what the module
and the observers need to see through the sharding."""

from __future__ import annotations

import torch
from torch import nn

from ..models.lm import MambaLM
from ..models.mixer import Mamba2

# Segments the wrappers add to parameter names: FSDP units and activation checkpointing (one each per Block).
WRAPPER_PREFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")


def unwrapped_name(name: str) -> str:
    """A parameter's name as in the plain model: without the FSDP / activation-checkpointing segments."""
    for prefix in WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def fsdp_root(trainer) -> nn.Module | None:
    """The root FSDP module that wraps the trainer's LightningModule, or None when the parameters are not sharded."""
    if trainer is None or not torch.distributed.is_available():
        return None
    from torch.distributed.fsdp import FullyShardedDataParallel

    model = getattr(getattr(trainer, "strategy", None), "model", None)
    return model if isinstance(model, FullyShardedDataParallel) else None


def unsharded_copy(model: MambaLM) -> MambaLM:
    """A plain MambaLM (no FSDP units) holding copies of ``model``'s parameters and buffers, on their device.

    Call it inside ``FullyShardedDataParallel.summon_full_params``: there the parameters are whole. The copy runs
    without FSDP, i.e. on one rank alone (FSDP's own forward gathers the shards: every rank would have to run it)."""
    backend = next(m for m in model.modules() if isinstance(m, Mamba2)).backend
    with torch.device("meta"):  # no memory and no random init: every tensor is replaced below
        copy = MambaLM(model.config, backend=backend)
    wanted = copy.state_dict().keys()  # leaves out what FSDP itself registers (e.g. flat parameters)
    clones: dict[int, torch.Tensor] = {}  # one clone per tensor: the tied embedding / LM head stays one
    named = [*model.named_parameters(remove_duplicate=False), *model.named_buffers()]
    state = {unwrapped_name(n): t for n, t in named if unwrapped_name(n) in wanted}
    copy.load_state_dict({n: clones.setdefault(id(t), t.detach().clone()) for n, t in state.items()}, assign=True)
    return copy
