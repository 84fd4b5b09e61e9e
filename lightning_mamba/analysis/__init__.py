"""Observation: does the model learn to forget? Loss vs position far past T_train, the paper's criterion,
state and retention statistics, and their figures (used by the callbacks and `lightning-mamba analyze`)."""

from .criterion import ForgettingVerdict, default_bucket, forgetting_verdict, judge_forgetting
from .evaluator import bucket_curve, eval_rows, iter_pieces, token_losses, window_mean
from .fits import fit_exponential, fit_linear
from .mitigation import evaluate_with, search_dt_scale, search_rri, search_window
from .passkey import PasskeyGrid, evaluate_passkey, greedy_generate, score_samples, t_recall
from .state_stats import StateStats, head_state_stats, newline_probe, state_statistics

__all__ = [
    "ForgettingVerdict", "PasskeyGrid", "StateStats", "evaluate_passkey", "evaluate_with", "fit_exponential", "fit_linear", "search_dt_scale", "search_rri", "search_window", "greedy_generate", "score_samples",
    "t_recall", "bucket_curve", "default_bucket", "eval_rows", "forgetting_verdict",
    "head_state_stats", "iter_pieces", "judge_forgetting", "newline_probe", "state_statistics", "token_losses",
    "window_mean",
]
