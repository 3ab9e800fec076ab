"""The soak: label -> update quantiles over each interval, slopes refit once the state is full."""

from __future__ import annotations

import pytest

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


def test_slopes_stop_where_the_worker_falls_a_minute_of_input_behind() -> None:
    from bench.soak import BACKLOG_S, FEATURE_MAX_BYTES, summarize

    rate = 200.0
    rows = []
    for k in range(60):  # flat RSS until minute 45; then a backlog grows the lag and the RSS
        behind = max(0, k - 45)
        mb = 900.0 + 20.0 * behind
        rows.append({"t_s": 60.0 * k, "worker_rss_mb": mb + 20, "worker_rss_min_mb": mb,
                     "rss_heap_mb": mb / 4, "rss_anon_mb": mb / 2, "rss_file_mb": 100.0,
                     "data_dir_mb": 1.0, "store_mb": 1.0, "checkpoints_mb": 1.0,
                     "join_state_bytes": 1.0, "feature_state_bytes": FEATURE_MAX_BYTES,
                     "feature_keys_evicted": 0.0, "store_versions": 5,
                     "checkpoint_files": 5, "lag_events": 13_000.0 * behind + 500.0 * (k % 2),
                     "score_errors": 0, "stage_errors": 0.0})  # fmt: skip
    assert rows[45]["lag_events"] < BACKLOG_S * rate < rows[46]["lag_events"]
    a = summarize(rows, minutes=60, rate=rate, warmup_frac=1 / 3)["after_warmup"]
    assert (a["from_t_s"], a["to_t_s"], a["backlog_from_s"]) == (20 * 60.0, 45 * 60.0, 46 * 60.0)
    assert a["rows_after_backlog"] == 14 and a["max_lag_events"] == rows[-1]["lag_events"]
    for fits in (a["memory_fits"], a["memory_fits_after_feature_bound"]):
        assert fits["worker_rss_floor"]["points"] == 26
        assert abs(fits["worker_rss_floor"]["ols_mb_per_h"]) < 1.0  # flat before the backlog
    quiet = [r | {"lag_events": 0.0} for r in rows]  # the same RSS without a backlog
    b = summarize(quiet, minutes=60, rate=rate, warmup_frac=1 / 3)["after_warmup"]
    assert b["backlog_from_s"] is None and b["to_t_s"] == 59 * 60.0
    assert b["memory_fits"]["worker_rss_floor"]["ols_mb_per_h"] > 100


def test_refit_recomputes_a_saved_report_and_keeps_what_the_rows_cannot_give(tmp_path) -> None:
    import json

    from bench.soak import FEATURE_MAX_BYTES, cli, summarize

    rows = [{"t_s": 60.0 * k, "worker_rss_mb": 900.0 + k, "worker_rss_min_mb": 880.0 + k,
             "rss_heap_mb": 200.0, "rss_anon_mb": 500.0, "rss_file_mb": 100.0,
             "data_dir_mb": 1.0, "store_mb": 1.0, "checkpoints_mb": 1.0, "join_state_bytes": 1.0,
             "feature_state_bytes": FEATURE_MAX_BYTES, "feature_keys_evicted": 0.0,
             "store_versions": 5, "checkpoint_files": 5,
             "lag_events": 0.0 if k < 40 else 1e6, "score_errors": 0, "stage_errors": 0.0}
            for k in range(50)]  # fmt: skip
    old = summarize(rows, minutes=50, rate=200, warmup_frac=0.2)
    old["after_warmup"] |= {"freshness_p50_s": 0.4, "to_t_s": None}
    path = tmp_path / "soak.json"
    path.write_text(json.dumps(old))
    assert cli(["--refit", str(path), "--warmup-frac", "0.5"]) == 0
    new = json.loads(path.read_text())
    a = new["after_warmup"]
    assert (a["from_t_s"], a["to_t_s"], a["backlog_from_s"]) == (25 * 60.0, 39 * 60.0, 40 * 60.0)
    assert a["freshness_p50_s"] == 0.4  # kept: the rows cannot give it again
    assert new["refit"]["warmup_frac"] == 0.5 and new["rows"] == rows
    assert abs(a["memory_fits"]["worker_rss_floor"]["ols_mb_per_h"] - 60.0) < 1e-6


def test_the_c_heap_is_fitted_when_the_rows_have_it() -> None:
    """Live C-heap bytes flat, the free bytes glibc keeps growing (fragmentation): the fits
    say so; rows of an older run without the gauges get no such fits."""
    from bench.soak import FEATURE_MAX_BYTES, summarize

    rows = [{"t_s": 60.0 * k, "worker_rss_mb": 900.0 + k, "worker_rss_min_mb": 890.0 + k,
             "rss_heap_mb": 300.0 + k, "rss_anon_mb": 500.0, "rss_file_mb": 100.0,
             "malloc_in_use_mb": 260.0 + (k % 2), "malloc_free_mb": 40.0 + k,
             "data_dir_mb": 1.0, "store_mb": 1.0, "checkpoints_mb": 1.0, "join_state_bytes": 1.0,
             "feature_state_bytes": FEATURE_MAX_BYTES, "feature_keys_evicted": 0.0,
             "store_versions": 5, "checkpoint_files": 5, "lag_events": 0.0, "score_errors": 0,
             "stage_errors": 0.0} for k in range(40)]  # fmt: skip
    fits = summarize(rows, minutes=40, rate=200, warmup_frac=0.25)["after_warmup"]["memory_fits"]
    assert abs(fits["malloc_in_use"]["ols_mb_per_h"]) < 2.0
    assert abs(fits["malloc_free"]["ols_mb_per_h"] - 60.0) < 1e-6
    old = [{k: v for k, v in r.items() if not k.startswith("malloc_")} for r in rows]
    fits = summarize(old, minutes=40, rate=200, warmup_frac=0.25)["after_warmup"]["memory_fits"]
    assert "malloc_in_use" not in fits and "malloc_free" not in fits


def test_the_machine_load_after_the_warm_up_is_summarised_when_the_rows_have_it() -> None:
    """A soak's slopes are only comparable on a quiet machine: the report gives the mean and
    the highest 1-minute load over the fitted rows (none for rows of older runs)."""
    from bench.soak import FEATURE_MAX_BYTES, summarize

    rows = [{"t_s": 60.0 * k, "worker_rss_mb": 900.0, "worker_rss_min_mb": 890.0,
             "rss_heap_mb": 300.0, "rss_anon_mb": 500.0, "rss_file_mb": 100.0,
             "data_dir_mb": 1.0, "store_mb": 1.0, "checkpoints_mb": 1.0, "join_state_bytes": 1.0,
             "feature_state_bytes": FEATURE_MAX_BYTES, "feature_keys_evicted": 0.0,
             "store_versions": 5, "checkpoint_files": 5, "lag_events": 0.0, "score_errors": 0,
             "stage_errors": 0.0, "load_1m": 9.0 if k < 10 else 1.0 + (k % 2)}
            for k in range(40)]  # fmt: skip
    a = summarize(rows, minutes=40, rate=200, warmup_frac=0.25)["after_warmup"]
    assert (a["load_1m_mean"], a["load_1m_max"]) == (1.5, 2.0)  # the busy warm-up left out
    old = [{k: v for k, v in r.items() if k != "load_1m"} for r in rows]
    a = summarize(old, minutes=40, rate=200, warmup_frac=0.25)["after_warmup"]
    assert a["load_1m_mean"] is None and a["load_1m_max"] is None


def test_segments_fit_each_stretch_and_tell_glibc_free_memory_from_live_memory(tmp_path) -> None:
    """Minutes 0-29: glibc keeps freed memory (arenas and free grow 60 MB/h, in use flat);
    from minute 30 nothing grows. The segment fits say both, and --refit writes them."""
    import json

    from bench.soak import FEATURE_MAX_BYTES, cli, parse_segments, segment_fits, summarize

    rows = []
    for k in range(60):
        held = float(min(k, 30))  # MB of free memory kept: +1 a minute until minute 30
        rows.append({"t_s": 60.0 * k, "worker_rss_mb": 1000.0 + held,
                     "worker_rss_min_mb": 990.0 + held, "rss_heap_mb": 300.0,
                     "rss_anon_mb": 600.0 + held, "rss_file_mb": 100.0,
                     "malloc_in_use_mb": 280.0 + (k % 2), "malloc_free_mb": 150.0 + held,
                     "malloc_arenas_mb": 430.0 + held, "malloc_mmapped_mb": 150.0,
                     "data_dir_mb": 1.0, "store_mb": 1.0, "checkpoints_mb": 1.0,
                     "join_state_bytes": 1.0, "feature_state_bytes": FEATURE_MAX_BYTES,
                     "feature_keys_evicted": 0.0, "store_versions": 5, "checkpoint_files": 5,
                     "lag_events": 0.0, "score_errors": 0, "stage_errors": 0.0})  # fmt: skip
    growing = segment_fits(rows, 5, 29)["fits"]
    assert growing["worker_rss_floor"]["ols_mb_per_h"] == pytest.approx(60.0)
    assert growing["malloc_free"]["ols_mb_per_h"] == pytest.approx(60.0)
    assert abs(growing["malloc_in_use"]["ols_mb_per_h"]) < 2.0
    assert abs(growing["anon_not_malloc"]["ols_mb_per_h"]) < 1e-6  # all of it is glibc's
    assert abs(growing["rss_less_malloc_free"]["ols_mb_per_h"]) < 1e-6
    flat = segment_fits(rows, 30, 59)
    assert flat["points"] == 30
    assert abs(flat["fits"]["worker_rss_floor"]["ols_mb_per_h"]) < 1e-6
    assert parse_segments("5-29, 30-59") == [(5.0, 29.0), (30.0, 59.0)]
    for bad in ("30", "40-30"):
        with pytest.raises(ValueError, match="FROM-TO"):
            parse_segments(bad)
    path = tmp_path / "soak.json"
    path.write_text(json.dumps(summarize(rows, minutes=60, rate=200, warmup_frac=0.25)))
    assert cli(["--refit", str(path), "--warmup-frac", "0.5", "--segments", "5-29,30-59"]) == 0
    written = json.loads(path.read_text())["segments"]
    assert [(s["from_min"], s["to_min"]) for s in written] == [(5.0, 29.0), (30.0, 59.0)]
