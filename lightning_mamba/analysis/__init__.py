"""Measurement only: does the model learn to forget? Loss vs position far past T_train, the paper's criterion,
state and retention statistics, passkey scoring, fits and figures (used by callbacks, study and commands)."""

from .criterion import ForgettingVerdict, default_bucket, judge_forgetting
from .evaluator import bucket_curve, eval_rows, iter_pieces, token_losses, window_mean
from .fits import fit_exponential, fit_linear
from .forgetting import ForgettingReport, forgetting_report, measure_forgetting
from .passkey import PasskeyGrid, evaluate_passkey, greedy_generate, score_samples, t_recall
from .state_stats import StateStats, head_state_stats, newline_probe, state_statistics

__all__ = [
    "ForgettingReport", "ForgettingVerdict", "PasskeyGrid", "StateStats", "bucket_curve", "default_bucket", "eval_rows",
    "evaluate_passkey", "fit_exponential", "fit_linear", "forgetting_report", "greedy_generate",
    "head_state_stats", "iter_pieces", "judge_forgetting", "measure_forgetting", "newline_probe", "score_samples",
    "state_statistics", "t_recall", "token_losses", "window_mean",
]
