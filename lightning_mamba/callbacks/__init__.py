"""Callbacks that log what training does and what the model forgets."""

from .dynamics import DecayDynamicsCallback
from .length_generalization import LengthGeneralizationCallback
from .passkey import PasskeyEvalCallback
from .state_stats import StateStatsCallback
from .throughput import TokenThroughputMonitor

__all__ = ["DecayDynamicsCallback", "LengthGeneralizationCallback", "PasskeyEvalCallback", "StateStatsCallback",
           "TokenThroughputMonitor"]
