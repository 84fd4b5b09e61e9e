"""Mamba-2: config, pure-PyTorch SSD, the mixer, the LM and the kernel switch."""

from .config import ConfigError, MambaConfig
from .interventions import apply_interventions
from .lm import MambaLM, State
from .mixer import LayerState, Mamba2

__all__ = ["apply_interventions", "ConfigError", "LayerState", "Mamba2", "MambaConfig", "MambaLM", "State"]
