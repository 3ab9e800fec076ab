"""Time-decay sample weights."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from learners.weighting import time_decay_weights


def test_one_half_life_old_weighs_half_and_newer_than_now_weighs_one() -> None:
    w = time_decay_weights(np.array([1000.0, 400.0, -200.0, 1600.0]), now=1000.0, half_life_s=600)
    np.testing.assert_allclose(w, [1.0, 0.5, 0.25, 1.0])
    assert w.dtype == np.float64 and w.shape == (4,)


@given(
    ts=st.lists(st.floats(0.0, 2e9), min_size=1, max_size=50),
    now=st.floats(0.0, 2e9),
    half_life=st.floats(1e-3, 1e8),
)
def test_matches_the_naive_formula_and_stays_in_zero_one(
    ts: list[float], now: float, half_life: float
) -> None:
    w = time_decay_weights(np.array(ts), now, half_life)
    naive = [max(0.5 ** (max(now - t, 0.0) / half_life), np.finfo(float).tiny) for t in ts]
    np.testing.assert_allclose(w, naive, rtol=1e-12)
    assert np.all((w > 0) & (w <= 1))
    older_first = np.argsort(ts)
    assert np.all(np.diff(w[older_first]) >= 0)  # never more weight for older history


@pytest.mark.parametrize("half_life", [0.0, -1.0, math.inf, math.nan])
def test_non_positive_or_non_finite_half_life_is_rejected(half_life: float) -> None:
    with pytest.raises(ValueError, match="half_life_s"):
        time_decay_weights(np.zeros(3), 0.0, half_life)
