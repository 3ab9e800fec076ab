"""bench.broker_fetch through a real embedded broker: the rows it measures and its fit."""

from __future__ import annotations

import pytest

from bench.broker_fetch import fit_ms_per_10k, measure


def test_the_fit_is_the_least_squares_slope_per_10k_batches() -> None:
    rows = [{"batches_held": b, "fetch_ms_p50": 1.0 + 0.5 * b / 1000} for b in (0, 2_000, 6_000)]
    assert fit_ms_per_10k(rows) == pytest.approx(5.0)
    assert fit_ms_per_10k(rows[:1]) is None


def test_measure_fetches_the_last_record_at_every_level() -> None:
    rows = measure((20, 60), repeats=3)
    assert [r["batches_held"] for r in rows] == [20, 60]
    for r in rows:
        assert 0 < r["fetch_ms_p50"] <= r["fetch_ms_p90"] < 30_000
        assert r["broker_cpu_ms_per_fetch"] >= 0 and r["produce_batches_per_s"] > 0
