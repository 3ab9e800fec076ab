"""The pure helpers of bench/e2e.py, in bench/e2e_measures.py (the benchmark itself needs a
broker and minutes)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from bench.e2e_measures import histogram_quantile, slope_rate, summarize_profile


def scrape_of(name: str, bounds: list[float], counts: list[float]) -> dict[str, float]:
    """A scrape's cumulative buckets, as stream.demo.scrape keys them."""
    out = {f'{name}_bucket{{le="{b}"}}': c for b, c in zip(bounds, counts, strict=True)}
    out[f'{name}_bucket{{le="+Inf"}}'] = counts[-1]
    return out


def test_histogram_quantile_interpolates_inside_the_bucket_like_promql() -> None:
    # 100 observations uniform in (0, 1], 100 more in (1, 2]: cumulative 100 at 1, 200 at 2
    m = scrape_of("h", [1.0, 2.0], [100.0, 200.0])
    assert histogram_quantile(m, "h", 0.5) == pytest.approx(1.0)
    assert histogram_quantile(m, "h", 0.25) == pytest.approx(0.5)
    assert histogram_quantile(m, "h", 0.99) == pytest.approx(1.98)


def test_histogram_quantile_of_an_empty_or_missing_histogram_is_none() -> None:
    assert histogram_quantile(scrape_of("h", [1.0], [0.0]), "h", 0.5) is None
    assert histogram_quantile({}, "h", 0.5) is None


def test_histogram_quantile_in_the_inf_bucket_is_the_highest_finite_bound() -> None:
    m = scrape_of("h", [1.0], [10.0])
    m['h_bucket{le="+Inf"}'] = 100.0
    assert histogram_quantile(m, "h", 0.99) == 1.0


def test_slope_rate_is_the_rate_between_ten_and_ninety_percent() -> None:
    t = np.arange(0.0, 20.0, 0.5)
    samples = [{"t": float(x), "scored": float(min(1000.0, max(0.0, 100.0 * (x - 5))))} for x in t]
    assert slope_rate(samples, "scored", 1000) == pytest.approx(100.0)
    assert slope_rate(samples[:12], "scored", 1000) is None  # never reached 90%


def test_summarize_profile_counts_self_inclusive_thread_and_library_samples(
    tmp_path: Path,
) -> None:
    raw = tmp_path / "spy.txt"
    raw.write_text(
        "thread (1);main (stream/cli.py:3);handle (stream/services.py:10);"
        "loads (json/__init__.py:346) 6\n"
        "thread (1);main (stream/cli.py:3);step (learners/ranker.py:99) 3\n"
        "thread (2);run (aiokafka/consumer.py:5) 1\n"
    )
    prof = summarize_profile(raw, seconds=0.1)
    assert prof["samples"] == 10
    assert prof["busy_share_of_wall"] == pytest.approx(1.0)
    assert prof["threads"][0] == {"frame": "thread (1)", "samples": 9, "share": 0.9}
    assert prof["top_self"][0]["frame"] == "loads (json/__init__.py)"
    incl = {r["frame"]: r["samples"] for r in prof["top_inclusive"]}
    assert incl["main (stream/cli.py)"] == 9 and incl["handle (stream/services.py)"] == 6
    libs = {r["frame"]: r["share"] for r in prof["by_library_self"]}
    assert libs == {"json": 0.6, "streamrec learners/": 0.3, "aiokafka": 0.1}
    assert math.isclose(sum(libs.values()), 1.0)
