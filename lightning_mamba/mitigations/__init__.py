"""Mitigations of the failure to forget: inference-time interventions (RRI, state normalization, dt scaling), the
exact sliding window by state difference, and the searches that pick their settings on held-out text."""

from .interventions import apply_interventions
from .search import evaluate_with, search_dt_scale, search_rri, search_window

__all__ = ["apply_interventions", "evaluate_with", "search_dt_scale", "search_rri", "search_window"]
