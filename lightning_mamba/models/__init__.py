"""Mamba-2 as pure nn.Module code: config, SSD, conv, norms, the mixer, the LM, its loss (no Lightning)."""

from .config import ConfigError, MambaConfig
from .lm import MambaLM, State
from .mixer import LayerState, Mamba2

__all__ = ["ConfigError", "LayerState", "Mamba2", "MambaConfig", "MambaLM", "State"]
