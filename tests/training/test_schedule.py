import math

import pytest

from lightning_mamba.training.schedule import lr_factor


def test_wsd_warmup_stable_decay():
    f = [lr_factor(s, 100, 10, "wsd", decay_fraction=0.1) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert all(x == 1.0 for x in f[10:90])
    assert all(a > b for a, b in zip(f[90:], f[91:]))  # strictly decreasing in the last 10%
    assert f[99] == pytest.approx(0.0)


def test_cosine_reaches_min_ratio():
    f = [lr_factor(s, 50, 5, "cosine", min_lr_ratio=0.1) for s in range(51)]
    assert f[5] == pytest.approx(1.0)
    assert f[50] == pytest.approx(0.1)
    assert f[27] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 22 / 45)))


def test_unknown_schedule():
    with pytest.raises(ValueError, match="use one of"):
        lr_factor(50, 100, 10, "linear")
