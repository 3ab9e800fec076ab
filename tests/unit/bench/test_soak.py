"""The soak's label -> update quantiles are over each interval, not since the start."""

from __future__ import annotations

from bench.e2e_measures import histogram_quantile
from bench.soak import FRESHNESS, _delta


def _scrape(counts: list[tuple[str, float]]) -> dict[str, float]:
    return {f'{FRESHNESS}_bucket{{le="{le}"}}': c for le, c in counts}


def test_freshness_quantile_covers_only_the_interval_since_the_previous_scrape() -> None:
    before = _scrape([("0.5", 100), ("1.0", 100), ("+Inf", 100)])  # 100 fast updates
    now = _scrape([("0.5", 100), ("1.0", 200), ("+Inf", 200)])  # then 100 in (0.5, 1]
    assert histogram_quantile(now, FRESHNESS, 0.5) == 0.5  # since the start
    assert histogram_quantile(_delta(now, before), FRESHNESS, 0.5) == 0.75  # this interval
    assert histogram_quantile(_delta(before, before), FRESHNESS, 0.5) is None  # nothing new
