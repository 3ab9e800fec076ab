"""The monitor's drift test and calibrator kind are settings."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from logs.batches import ScoredBatch
from monitoring.metrics import StreamrecMetrics
from stream.control import CalibratorUpdate
from stream.join import JoinConfig  # the window scheme: final labels
from stream.services import MonitorService
from stream.settings import MonitorConfig, Settings


def batches(rng: np.random.Generator, n: int, true_scale: float) -> list[ScoredBatch]:
    out = []
    for k in range(n):
        p = rng.uniform(0.02, 0.06, 1024)
        y = (rng.random(1024) < p * true_scale).astype(int)
        ids = [f"{k}-{i}" for i in range(1024)]
        out.append(
            ScoredBatch(
                0,
                0,
                ids,
                [1.7e9 + k] * 1024,
                y.tolist(),
                p.tolist(),
                p.tolist(),
                ["1"] * 1024,
                [None] * 1024,
            )  # fmt: skip
        )
    return out


def run(
    detector: str, calibrator: str, recal_window: int, lead: int = 20
) -> tuple[MonitorService, list]:
    settings = Settings(
        join=JoinConfig(),
        monitor=MonitorConfig(
            warmup=0,
            detector=detector,
            calibrator=calibrator,
            recal_window=recal_window,
            recalibration="track",
        ),
    )
    svc = MonitorService(settings, StreamrecMetrics())
    rng = np.random.default_rng(4)
    for b in batches(rng, lead, 1.0):
        svc.observe(b)
    messages = [m for b in batches(rng, 40, 1.6) for m in svc.observe(b)]
    return svc, [m for m in messages if m.kind == "calibrator"]


@pytest.mark.parametrize("calibrator", ["shift", "platt"])
@pytest.mark.parametrize("detector", ["window_z", "wander_z", "cusum", "page_hinkley", "adwin"])
def test_each_detector_triggers_a_recalibration_after_an_abrupt_ctr_jump(
    detector: str, calibrator: str
) -> None:
    # wander_z first fits the stream's own wander on its reference blocks (60 of 25
    # expected clicks, ~60k impressions here): with a shorter calibrated lead the noise of
    # that fit passes for wander and a x1.6 jump stays under its threshold
    svc, cal = run(detector, calibrator, 2_500, lead=60 if detector == "wander_z" else 20)
    assert all(m.params["kind"] == calibrator for m in cal)
    assert cal, f"{detector}: no accepted recalibration after a x1.6 jump"
    assert svc.calibrator.transform(np.array([0.04]))[0] > 0.05


@pytest.mark.parametrize("calibrator", ["isotonic", "histogram"])
def test_nonparametric_calibrators_are_fitted_published_and_applied(calibrator: str) -> None:
    # they need a larger fit window than Platt's 2 parameters
    svc, cal = run("window_z", calibrator, 10_000)
    assert cal and all(m.params["kind"] == calibrator for m in cal)
    assert svc.calibrator.transform(np.array([0.04]))[0] > 0.042


def test_unknown_detector_or_calibrator_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="monitor.detector"):
        MonitorConfig(detector="nope")
    with pytest.raises(ValueError, match="monitor.calibrator"):
        MonitorConfig(calibrator="nope")


# --- recalibration policy, time windows, reliability and per-segment drift -------------


def adapting_run(recalibration: str, seed: int = 0) -> list[float]:
    """A model whose raw level learns a x1.6 CTR jump over ~40k impressions after it; the
    served score is the raw one through the monitor's latest calibrator (as the trainer
    applies control messages). Served / true click mass per batch after the alarm."""
    settings = Settings(
        join=JoinConfig(), monitor=MonitorConfig(warmup=0, recalibration=recalibration)
    )
    svc = MonitorService(settings, StreamrecMetrics())
    rng = np.random.default_rng(seed)
    ratios: list[float] = []
    alarmed = False
    for k in range(120):
        truth = rng.uniform(0.02, 0.06, 1024)
        drifted = k >= 20
        learned = 0.0 if not drifted else min(1.0, (k - 20) / 40)
        p_raw = truth * (1.0 + 0.6 * learned)
        true_p = truth * (1.6 if drifted else 1.0)
        p = svc.calibrator.transform(p_raw)
        y = (rng.random(1024) < true_p).astype(int)
        batch = ScoredBatch(
            0, svc.calibrator_version, [f"{k}-{i}" for i in range(1024)],
            [1.7e9 + k] * 1024, y.tolist(), p_raw.tolist(), p.tolist(),
            ["1"] * 1024, true_p.tolist(),
        )  # fmt: skip
        svc.observe(batch)
        alarmed = alarmed or svc.n_alarms > 0
        if alarmed:
            ratios.append(float(p.sum() / true_p.sum()))
    return ratios


def test_tracking_returns_the_served_ratio_to_one_while_a_fixed_refit_overshoots() -> None:
    tracked = adapting_run("track")
    fixed = adapting_run("alarm")
    # after the model has learned the new rate (the last 40 batches)
    assert abs(np.mean(tracked[-40:]) - 1) < 0.05
    assert max(abs(r - 1) for r in tracked[-40:]) < 0.1
    assert np.mean(fixed[-40:]) > 1.1


def test_tracking_publishes_versions_with_reasons_and_counts_refits() -> None:
    settings = Settings(
        join=JoinConfig(),
        monitor=MonitorConfig(
            warmup=0, refit_every=2048, recalibration="track", detector="window_z"
        ),
    )
    metrics = StreamrecMetrics()
    svc = MonitorService(settings, metrics)
    rng = np.random.default_rng(1)
    for b in batches(rng, 20, 1.0):
        assert svc.observe(b) == []  # calibrated: not tracking, nothing published
    messages = [m for b in batches(rng, 30, 1.6) for m in svc.observe(b)]
    cal = [m for m in messages if m.kind == "calibrator"]
    assert [m.version for m in cal] == list(range(1, len(cal) + 1))
    assert cal[0].reason == "alarm" and len(cal) > 3
    assert {m.reason for m in cal} <= {"alarm", "refit", "level"}
    r = metrics.registry
    assert r.get_sample_value("streamrec_calibrator_updates_total") == len(cal)
    refits = svc.n_recalibrations + svc.n_rejected
    assert refits >= 30 * 1024 // 2048 - 2
    assert r.get_sample_value("streamrec_recalibrations_total") == svc.n_recalibrations
    svc.publish()
    assert r.get_sample_value("streamrec_calibration_target_ctr") == pytest.approx(
        svc.tracker.target
    )
    assert r.get_sample_value("streamrec_calibrator_offset") == pytest.approx(0.47, abs=0.1)


def test_continuous_mode_calibrates_from_the_end_of_the_warmup_without_an_alarm() -> None:
    # 10% under-prediction: far too small for the window z-test to alarm
    settings = Settings(
        join=JoinConfig(), monitor=MonitorConfig(warmup=10_000, recalibration="continuous")
    )
    svc = MonitorService(settings, StreamrecMetrics())
    rng = np.random.default_rng(2)
    cal = [m for b in batches(rng, 40, 1.1) for m in svc.observe(b) if m.kind == "calibrator"]
    assert svc.n_alarms == 0 and cal
    assert svc.calibrator.transform(np.array([0.04]))[0] == pytest.approx(0.044, rel=0.04)


def test_a_restarted_monitor_adopts_the_published_calibrator_and_keeps_tracking() -> None:
    svc = MonitorService(
        Settings(join=JoinConfig(), monitor=MonitorConfig(warmup=0, recalibration="track")),
        StreamrecMetrics(),
    )
    params = {"kind": "shift", "b": 0.4}
    svc.apply_control(CalibratorUpdate(7, params))
    assert svc.calibrator_version == 7 and svc.tracker.armed
    rng = np.random.default_rng(3)
    cal = [m for b in batches(rng, 6, 1.0) for m in svc.observe(b) if m.kind == "calibrator"]
    assert cal and cal[0].version == 8  # continues from the adopted version
    assert abs(svc.calibrator.transform(np.array([0.04]))[0] / 0.04 - 1) < 0.15


def test_publish_exports_time_window_reliability_bins_and_per_segment_drift() -> None:
    settings = Settings(join=JoinConfig(), monitor=MonitorConfig(warmup=0, detector="cusum"))
    metrics = StreamrecMetrics()
    svc = MonitorService(settings, metrics)
    rng = np.random.default_rng(4)
    for k in range(60):
        p = rng.uniform(0.02, 0.06, 1024)
        seg = np.array(["1", "2", "3"])[np.arange(1024) % 3]
        scale = np.where((seg == "3") & (k >= 20), 1.6, 1.0)  # position 3 drifts alone
        y = (rng.random(1024) < p * scale).astype(int)
        svc.observe(
            ScoredBatch(
                0,
                0,
                [f"{k}-{i}" for i in range(1024)],
                (1.7e9 + 60.0 * k + np.arange(1024) / 20).tolist(),
                y.tolist(),
                p.tolist(),
                p.tolist(),
                seg.tolist(),
                [None] * 1024,
            )  # fmt: skip
        )
    svc.publish()
    r = metrics.registry
    hour = {"window": "1h", "segment": "all"}
    assert r.get_sample_value("streamrec_calibration_ratio", hour) is not None
    assert r.get_sample_value("streamrec_raw_calibration_ratio", hour) is not None
    assert r.get_sample_value("streamrec_predicted_ctr", hour) == pytest.approx(
        svc.served_time.window().mean_p
    )
    counts = np.array(
        [
            r.get_sample_value("streamrec_reliability_impressions", {"window": "20k", "bin": b})
            for b in ("01", "02", "03", "04", "05", "06", "07", "08", "09", "10")
        ]
    )
    n = svc.served.window().n  # equal-mass bins of the count window
    assert counts.sum() == n and counts.max() - counts.min() <= 1
    fixed = r.get_sample_value("streamrec_reliability_impressions", {"window": "1h", "bin": "05"})
    assert fixed is not None and fixed > 0  # the 0.03-0.04 bin of the fixed edges
    for name in ("1", "2", "3"):
        assert r.get_sample_value("streamrec_drift_z", {"segment": name}) is not None
    alarms = {
        name: r.get_sample_value("streamrec_segment_drift_alarms_total", {"segment": name}) or 0.0
        for name in ("1", "2", "3")
    }
    assert alarms["3"] >= 1 and alarms["1"] == alarms["2"] == 0


def test_the_time_window_label_follows_its_length() -> None:
    for seconds, label in ((3600.0, "1h"), (7200.0, "2h"), (900.0, "15m"), (90.0, "90s")):
        cfg = MonitorConfig(time_window_s=seconds, time_bucket_s=min(60.0, seconds))
        assert (
            MonitorService(Settings(join=JoinConfig(), monitor=cfg), StreamrecMetrics()).time_label
            == label
        )


def test_bad_recalibration_settings_are_clear_errors() -> None:
    with pytest.raises(ValueError, match="monitor.recalibration"):
        MonitorConfig(recalibration="sometimes")
    with pytest.raises(ValueError, match="recal_max_window"):
        MonitorConfig(recal_window=10_000, recal_max_window=5_000)
    with pytest.raises(ValueError, match="time_bucket_s"):
        MonitorConfig(time_window_s=60.0, time_bucket_s=120.0)


def test_the_tracking_policy_reads_its_settings_from_the_monitor_config_in_one_place() -> None:
    cfg = MonitorConfig(calibrator="platt", recal_window=1000, recal_max_window=9000,
                        refit_every=300, level_trend=0.3, settle_refits=7)  # fmt: skip
    t = cfg.tracking()
    assert (t.kind, t.recal_window, t.max_window, t.refit_every, t.trend, t.settle_refits) == (
        "platt", 1000, 9000, 300, 0.3, 7,
    )  # fmt: skip
    assert dataclasses.replace(cfg, recalibration="continuous").tracking().settle_refits == 0
    svc = MonitorService(Settings(join=JoinConfig(), monitor=cfg), StreamrecMetrics())
    assert svc.tracker.config == t
    with pytest.raises(ValueError, match="monitor \\(tracking recalibration\\)"):
        MonitorConfig(level_trend=1.5)
