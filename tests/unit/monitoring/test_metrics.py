from __future__ import annotations

import math
import urllib.request
from collections.abc import Iterator

import pytest
from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from monitoring.calibration import (
    CalibrationSnapshot,
    compute_reliability,
)
from monitoring.metrics import StreamrecMetrics, serve_metrics
from monitoring.windows import CalibrationWindow, TimeCalibrationWindow

WINDOW_GAUGES = {
    "predicted_ctr",
    "actual_ctr",
    "calibration_ratio",
    "expected_calibration_error",
    "normalized_entropy",
    "auc",
    "log_loss",
}
OTHER_GAUGES = {
    "drift_z",
    "second_label_ratio",
    "second_label_window_ratio",
    "model_version",
    "calibrator_version",
    "index_version",
    "index_items",
    "hard_negative_pool_users",
    "pending_impressions",
    "train_loss",
    "event_time_watermark_seconds",
    "monitor_pending_impressions",
    "monitor_mark_seconds",
    "join_state_entries",
    "join_state_bytes",
    "feature_state_bytes",
    "feature_state_shed",
    "feature_follower_staleness_seconds",
    "feature_follower_lag_records",
    "feature_follower_state_bytes",
    "orphan_clicks_waiting",
    "rocksdb_memory_bytes",
    "malloc_bytes",
    "calibrator_offset",
    "served_offset",
    "offset_delay_clicks",
    "calibration_target_ctr",
    "worker_starts",
    "unclean_restarts",
}
COUNTERS = {
    "impressions",
    "clicks",
    "feature_follower_events",
    "feature_follower_skipped",
    "labeled",
    "duplicate_impressions",
    "duplicate_clicks",
    "late_clicks",
    "conversion_events",
    "conversions",
    "second_labels",
    "second_label_predicted",
    "second_label_judged",
    "second_label_outcomes",
    "dead_letters",
    "history_fields_dropped",
    "scored",
    "monitored",
    "monitor_late_positives",
    "monitor_forced",
    "train_batches",
    "nonfinite_batches",
    "drift_alarms",
    "recalibrations",
    "recalibrations_rejected",
    "recalibration_rollbacks",
    "index_refreshes",
    "duplicate_examples",
    "calibrator_updates",
    "segment_drift_alarms",
    "serving_errors",
    "index_rejected",
    "stage_errors",
    "control_rejected",
    "fields_rejected",
}
RETRIEVAL_GAUGES = {
    "hard_negative_pool_items",
    "hard_negative_pool_age_seconds",
    "retrieval_negative_cosine",
    "retrieval_hard_share",
    "fusion_weight",
    "fusion_beta",
    "fusion_adapted",
    "fusion_observed_clicks",
    "fusion_covisit_entries",
    "fusion_uncounted_clicks",
    "fusion_repeated_pairs",
}
RAW_GAUGES = {"raw_predicted_ctr", "raw_calibration_ratio"} | RETRIEVAL_GAUGES
RELIABILITY_GAUGES = {
    "reliability_predicted_ctr",
    "reliability_actual_ctr",
    "reliability_impressions",
}
HISTOGRAMS = {
    "label_delay_seconds",
    "update_freshness_seconds",
    "train_step_seconds",
    "gc_pause_seconds",
    "serving_seconds",
}
STORE = {
    "streamrec_store_bytes",
    "streamrec_store_version",
    "streamrec_store_failures_total",
    "streamrec_store_writes_skipped_total",
    "streamrec_store_loads_total",
} | {
    f"streamrec_store_{h}_seconds_{s}"
    for h in ("publish", "propagation")
    for s in ("bucket", "sum", "count")
}
EXPECTED_NAMES = (
    STORE
    | {f"streamrec_{g}" for g in WINDOW_GAUGES | OTHER_GAUGES | RAW_GAUGES | RELIABILITY_GAUGES}
    | {f"streamrec_{c}_total" for c in COUNTERS}
    | {f"streamrec_{h}_{s}" for h in HISTOGRAMS for s in ("bucket", "sum", "count")}
)


@pytest.fixture
def metrics() -> StreamrecMetrics:
    return StreamrecMetrics()


def test_metric_names_are_exactly_the_specified_set(metrics: StreamrecMetrics) -> None:
    assert metrics.metric_names() == EXPECTED_NAMES


def test_every_metric_is_an_attribute_and_has_help_text(metrics: StreamrecMetrics) -> None:
    for name in WINDOW_GAUGES | OTHER_GAUGES | COUNTERS | RELIABILITY_GAUGES:
        assert hasattr(metrics, name), name
    for family in metrics.registry.collect():
        assert family.name.startswith("streamrec_")
        assert family.documentation.strip(), family.name


def test_labels_are_as_specified(metrics: StreamrecMetrics) -> None:
    for name in WINDOW_GAUGES:
        getattr(metrics, name).labels(window="1h", segment="all").set(0.5)
    metrics.drift_z.labels(segment="all").set(1.0)
    metrics.labeled.labels(label="positive").inc()
    metrics.dead_letters.labels(reason="bad_json").inc()
    with pytest.raises(ValueError):
        metrics.drift_z.labels(window="1h", segment="all")
    with pytest.raises(ValueError):
        metrics.labeled.labels(reason="x")
    r = metrics.registry
    assert r.get_sample_value("streamrec_auc", {"window": "1h", "segment": "all"}) == 0.5
    assert r.get_sample_value("streamrec_labeled_total", {"label": "positive"}) == 1.0
    assert r.get_sample_value("streamrec_labeled_total", {"label": "negative"}) == 0.0
    assert r.get_sample_value("streamrec_dead_letters_total", {"reason": "bad_json"}) == 1.0


def test_each_instance_has_its_own_registry_and_leaves_the_global_one_alone() -> None:
    before = {f.name for f in REGISTRY.collect()}
    a, b = StreamrecMetrics(), StreamrecMetrics()
    a.clicks.inc()
    assert b.registry.get_sample_value("streamrec_clicks_total") == 0.0
    after = {f.name for f in REGISTRY.collect()}
    assert after == before and not any(n.startswith("streamrec_") for n in after)
    shared = CollectorRegistry()
    assert StreamrecMetrics(shared).registry is shared


def test_publish_snapshot_sets_the_seven_window_gauges(metrics: StreamrecMetrics) -> None:
    snap = CalibrationSnapshot(
        n=10,
        positives=2.0,
        mean_p=0.1,
        actual_ctr=0.2,
        ratio=0.5,
        ece=0.05,
        ne=0.9,
        auc=0.7,
        log_loss=0.3,
        z=-1.0,
    )
    metrics.publish_snapshot(snap, window="20k", segment="mobile")
    labels = {"window": "20k", "segment": "mobile"}
    got = {
        name: metrics.registry.get_sample_value(f"streamrec_{name}", labels)
        for name in WINDOW_GAUGES
    }
    assert got == {
        "predicted_ctr": 0.1,
        "actual_ctr": 0.2,
        "calibration_ratio": 0.5,
        "expected_calibration_error": 0.05,
        "normalized_entropy": 0.9,
        "auc": 0.7,
        "log_loss": 0.3,
    }


def test_publish_snapshot_exports_nan_for_undefined_values(metrics: StreamrecMetrics) -> None:
    cw = CalibrationWindow(size=10)
    cw.update(predictions=[0.2, 0.3], labels=[0, 0])  # no clicks: ratio, auc, ne undefined
    metrics.publish_snapshot(cw.lifetime(), window="lifetime")
    labels = {"window": "lifetime", "segment": "all"}
    ratio = metrics.registry.get_sample_value("streamrec_calibration_ratio", labels)
    assert ratio is not None and math.isnan(ratio)
    assert metrics.registry.get_sample_value("streamrec_predicted_ctr", labels) == 0.25


@pytest.fixture
def served(metrics: StreamrecMetrics) -> Iterator[tuple[StreamrecMetrics, int]]:
    server, port = serve_metrics(metrics.registry, host="127.0.0.1", port=0)
    try:
        yield metrics, port
    finally:
        server.shutdown()
        server.server_close()


def test_scrape_over_http_returns_parseable_metrics(served: tuple[StreamrecMetrics, int]) -> None:
    metrics, port = served
    assert port > 0
    metrics.impressions.inc(7)
    metrics.model_version.set(3)
    metrics.publish_snapshot(
        CalibrationSnapshot(
            n=1,
            positives=1.0,
            mean_p=0.04,
            actual_ctr=0.05,
            ratio=0.8,
            ece=0.01,
            ne=0.95,
            auc=0.6,
            log_loss=0.2,
            z=0.0,
        ),
        window="20k",
    )
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        assert resp.status == 200
        body = resp.read().decode()
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(body)
        for s in family.samples
    }
    assert samples[("streamrec_impressions_total", ())] == 7.0
    assert samples[("streamrec_model_version", ())] == 3.0
    key = ("streamrec_calibration_ratio", (("segment", "all"), ("window", "20k")))
    assert samples[key] == 0.8
    scraped = {name for name, _ in samples}
    assert {"streamrec_index_refreshes_total", "streamrec_train_loss"} <= scraped


def test_raw_snapshot_and_histograms_are_exported(metrics: StreamrecMetrics) -> None:
    cw = CalibrationWindow(size=10)
    cw.update(predictions=[0.2, 0.4], labels=[0, 1])
    metrics.publish_raw_snapshot(cw.window(), window="10")
    labels = {"window": "10", "segment": "all"}
    assert metrics.registry.get_sample_value(
        "streamrec_raw_calibration_ratio", labels
    ) == pytest.approx(0.6)
    metrics.train_step_seconds.observe(0.02)
    metrics.label_delay_seconds.observe(1800)
    assert metrics.registry.get_sample_value("streamrec_train_step_seconds_count") == 1
    assert (
        metrics.registry.get_sample_value("streamrec_label_delay_seconds_bucket", {"le": "1800.0"})
        == 1
    )


def test_publish_reliability_sets_one_series_per_bin_with_sortable_labels(
    metrics: StreamrecMetrics,
) -> None:
    rel = compute_reliability([2.0, 0.0, 4.0], [0.1, 0.0, 0.8], [1.0, 0.0, 1.0])
    metrics.publish_reliability(rel, window="20k")
    r = metrics.registry

    def value(name: str, b: str) -> float | None:
        return r.get_sample_value(f"streamrec_reliability_{name}", {"window": "20k", "bin": b})

    assert value("predicted_ctr", "01") == pytest.approx(0.05)
    assert value("actual_ctr", "01") == 0.5
    assert value("impressions", "03") == 4.0
    empty = value("predicted_ctr", "02")
    assert empty is not None and math.isnan(empty) and value("impressions", "02") == 0.0
    assert value("impressions", "1") is None  # labels are zero padded


def test_time_window_reliability_is_published_with_the_fixed_bins(
    metrics: StreamrecMetrics,
) -> None:
    tw = TimeCalibrationWindow(span_s=60.0, bucket_s=10.0, edges=[0.0, 0.05, 1.0])
    tw.update(predictions=[0.01, 0.02, 0.5], labels=[0, 1, 1], ts=[0.0, 1.0, 2.0])
    metrics.publish_reliability(tw.reliability(), window="1m")
    metrics.publish_snapshot(tw.window(), window="1m")
    r = metrics.registry
    labels = {"window": "1m", "bin": "02"}
    assert r.get_sample_value("streamrec_reliability_impressions", labels) == 1.0
    assert r.get_sample_value(
        "streamrec_calibration_ratio", {"window": "1m", "segment": "all"}
    ) == pytest.approx(0.53 / 2)


def test_every_metric_the_docs_name_is_exported(metrics: StreamrecMetrics) -> None:
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[3]
    docs = [root / "README.md", root / "docs" / "DESIGN.md", root / "bench" / "README.md"]
    named = set(re.findall(r"streamrec_[a-z0-9_]+", " ".join(p.read_text() for p in docs)))
    samples = metrics.metric_names()
    families = {re.sub(r"_(total|bucket|sum|count)$", "", s) for s in samples}
    assert len(named) >= 10
    unknown = sorted(n for n in named if n not in samples and n not in families)
    assert not unknown, f"the docs name metrics the code does not export: {unknown}"
