"""Callbacks that log what training does and what the model forgets."""

from .throughput import TokenThroughputMonitor

__all__ = ["TokenThroughputMonitor"]
