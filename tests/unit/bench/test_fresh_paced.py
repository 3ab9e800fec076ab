"""The paced fresh-labels bench's bookkeeping: which windows had closed, and the lag."""

from __future__ import annotations

import numpy as np
import pytest

from bench.fresh_paced import closable, lag_summary


def test_closable_counts_impressions_whose_window_and_lateness_passed() -> None:
    ts = np.array([0.0, 10.0, 20.0, 30.0])
    assert closable(ts, 89.9, window_s=30.0, lateness_s=60.0) == 0
    assert closable(ts, 90.0, window_s=30.0, lateness_s=60.0) == 1  # ts + W + L <= clock
    assert closable(ts, 115.0, window_s=30.0, lateness_s=60.0) == 3
    assert closable(ts, 1e9, window_s=30.0, lateness_s=60.0) == 4


def test_lag_summary_skips_samples_before_any_window_closed() -> None:
    samples = [
        {"closable": 0, "monitored": 0.0},
        {"closable": 100, "monitored": 40.0},
        {"closable": 200, "monitored": 200.0},
        {"closable": 300, "monitored": 280.0},
    ]
    lag = lag_summary(samples, rate_per_s=10.0)
    assert lag["samples"] == 3
    assert lag["impressions_p50"] == 20.0 and lag["impressions_max"] == 60.0
    assert lag["seconds_p50"] == pytest.approx(2.0) and lag["seconds_max"] == pytest.approx(6.0)
    assert lag_summary(samples[:1], rate_per_s=10.0) == {"samples": 0}
