"""The soak: label -> update quantiles over each interval, slopes refit once the state is full."""

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


def test_slopes_are_fitted_again_once_the_feature_state_sheds() -> None:
    from bench.soak import FEATURE_MAX_BYTES, summarize

    rows = []
    for k in range(60):  # RSS grows 1 MB a minute until minute 30 (the state fills), then flat
        mb = 800.0 + min(k, 30)
        rows.append({"t_s": 60.0 * k, "worker_rss_mb": mb + 20, "worker_rss_min_mb": mb,
                     "rss_heap_mb": mb / 4, "rss_anon_mb": mb / 2, "rss_file_mb": 100.0,
                     "data_dir_mb": 1.0, "store_mb": 1.0, "checkpoints_mb": 1.0,
                     "join_state_bytes": 1.0,
                     "feature_state_bytes": FEATURE_MAX_BYTES * min(k, 30) / 31,  # full at 28
                     "feature_keys_evicted": 0.0, "store_versions": 5,
                     "checkpoint_files": 5, "lag_events": 0.0, "score_errors": 0,
                     "stage_errors": 0.0})  # fmt: skip
    a = summarize(rows, minutes=60, rate=100, warmup_frac=1 / 3)["after_warmup"]
    assert a["feature_state_full_at_s"] == 28 * 60.0
    assert a["memory_fits"]["worker_rss_floor"]["ols_mb_per_h"] > 10  # the fill is in it
    after = a["memory_fits_after_feature_bound"]
    assert after["worker_rss_floor"]["points"] == 32
    assert (
        0
        < after["worker_rss_floor"]["ols_mb_per_h"]
        < 0.5 * a["memory_fits"]["worker_rss_floor"]["ols_mb_per_h"]
    )
    rows_never_full = [r | {"feature_state_bytes": FEATURE_MAX_BYTES / 2} for r in rows]
    a = summarize(rows_never_full, minutes=60, rate=100, warmup_frac=1 / 3)["after_warmup"]
    assert a["feature_state_full_at_s"] is None and a["memory_fits_after_feature_bound"] is None
