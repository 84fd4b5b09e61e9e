"""The paper's laws fitted: known parameters come back, too few points give no fit."""

import numpy as np
import pytest

from lightning_mamba.analysis.fits import PAPER_T_FORGET, PAPER_T_RECALL, fit_exponential, fit_linear

N_S = np.array([0.8, 1.1, 1.6, 2.4, 4.8, 12.9])  # the paper's state sizes (M)


def test_linear_recovers_the_papers_law():
    y = PAPER_T_FORGET["a"] * N_S + PAPER_T_FORGET["b"]
    a, b, r2 = fit_linear(N_S, y)
    assert a == pytest.approx(5.172) and b == pytest.approx(-4.469) and r2 == pytest.approx(1.0)


def test_linear_with_noise_matches_numpy_polyfit():
    rng = np.random.default_rng(0)
    y = 3.0 * N_S + 1.0 + rng.normal(0, 0.5, N_S.size)
    fit = fit_linear(N_S, y)
    a, b = np.polyfit(N_S, y, 1)
    assert fit.a == pytest.approx(a) and fit.b == pytest.approx(b) and 0.9 < fit.r2 < 1.0


def test_exponential_recovers_the_papers_law():
    y = PAPER_T_RECALL["b"] * (PAPER_T_RECALL["a"] ** N_S - 1) + PAPER_T_RECALL["c"]
    a, b, c, r2 = fit_exponential(N_S, y)
    assert a == pytest.approx(1.365, rel=1e-4) and b == pytest.approx(4.756, rel=1e-3)
    assert c == pytest.approx(-0.742, abs=1e-3) and r2 == pytest.approx(1.0)


def test_exponential_with_noise_and_a_decaying_base():
    rng = np.random.default_rng(1)
    x = np.linspace(0, 10, 12)
    y = 2.0 * (0.7 ** x - 1) + 5.0 + rng.normal(0, 0.01, x.size)
    fit = fit_exponential(x, y)
    assert fit.a == pytest.approx(0.7, rel=0.02) and fit.b == pytest.approx(2.0, rel=0.05)
    assert fit.c == pytest.approx(5.0, abs=0.05) and fit.r2 > 0.999


def test_too_few_or_degenerate_points_give_no_fit():
    assert fit_linear([1.0], [2.0]) is None
    assert fit_linear([1.0, np.nan, 3.0], [1.0, 2.0, np.inf]) is None  # one finite pair left
    assert fit_linear([2.0, 2.0], [1.0, 3.0]) is None  # all N_S equal
    assert fit_exponential([1.0, 2.0], [1.0, 4.0]) is None  # three parameters need three points
    assert np.isnan(fit_linear([1.0, 2.0, 3.0], [2.0, 2.0, 2.0]).r2)  # R^2 is undefined when all y are equal
    with pytest.raises(ValueError):
        fit_linear([1.0, 2.0], [1.0])
