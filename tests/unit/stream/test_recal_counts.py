"""Issue 17 item 5: the report, the CLI table and the metrics agree on shared counts; and
the guarded recalibration policy (forward holdout, rollback)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from logs.batches import ScoredBatch
from monitoring.metrics import StreamrecMetrics
from monitoring.report import load_run
from stream.control import (
    CalibratorUpdate,
    DriftAlarm,
    Recalibration,
    decode_control,
    encode_control,
)
from stream.join import JoinConfig
from stream.services import MonitorService
from stream.settings import MonitorConfig, Settings


def batches(rng: np.random.Generator, n: int, true_scale: float, k0: int = 0) -> list[ScoredBatch]:
    out = []
    for k in range(k0, k0 + n):
        p = rng.uniform(0.02, 0.06, 1024)
        y = (rng.random(1024) < p * true_scale).astype(int)
        ids = [f"{k}-{i}" for i in range(1024)]
        ts = [1.7e9 + k] * 1024
        out.append(ScoredBatch(0, 0, ids, ts, y.tolist(), p.tolist(), p.tolist(), ["1"] * 1024,
                               [None] * 1024))  # fmt: skip
    return out


def test_report_table_and_metrics_count_the_same_accepted_recalibrations(
    tmp_path: Path,
) -> None:
    """While tracking, most accepted refits are periodic, not alarms: the report used to
    count accepted alarms only (2) while the table read the counter (49)."""
    metrics = StreamrecMetrics()
    settings = Settings(
        join=JoinConfig(), monitor=MonitorConfig(warmup=0, refit_every=2048, recalibration="track")
    )
    svc = MonitorService(settings, metrics)
    rng = np.random.default_rng(1)
    controls = [
        m for b in batches(rng, 20, 1.0) + batches(rng, 30, 1.6, 20) for m in svc.observe(b)
    ]
    # as read back from the control topic (stream.demo)
    controls = [decode_control(encode_control(c)) for c in controls]
    alarms = [c.to_dict() for c in controls if isinstance(c, DriftAlarm)]
    refits = [c.to_dict() for c in controls if isinstance(c, Recalibration)]
    counter = metrics.registry.get_sample_value("streamrec_recalibrations_total")
    rejected = metrics.registry.get_sample_value("streamrec_recalibrations_rejected_total")
    accepted_alarms = sum(bool(a.get("accepted")) for a in alarms)
    assert counter is not None and counter > accepted_alarms  # the case of the discrepancy
    assert sum(r["decision"] == "accepted" for r in refits) == counter == svc.n_recalibrations
    assert sum(r["decision"] == "rejected" for r in refits) == rejected
    # a run directory as `streamrec demo` writes it (stream.demo): report.json + scored.npz
    report = {"drift_alarm_events": alarms, "recalibration_events": refits,
              "recalibrations": int(counter), "drift_alarms": len(alarms)}  # fmt: skip
    (tmp_path / "report.json").write_text(json.dumps(report))
    ts = np.arange(10.0)
    np.savez(tmp_path / "scored.npz", ts=ts, y=np.zeros(10), p=np.full(10, 0.1))
    data = load_run(tmp_path)
    assert len(data.recalibrations) == report["recalibrations"]
    assert len(data.alarms) == report["drift_alarms"]


def run_guarded(scale_after: float, calibrated_after: bool = False) -> tuple[MonitorService, list]:
    settings = Settings(join=JoinConfig(), monitor=MonitorConfig(warmup=0,
                        recalibration="guarded", recal_window=4096))  # fmt: skip
    svc = MonitorService(settings, StreamrecMetrics())
    rng = np.random.default_rng(3)
    msgs = [m for b in batches(rng, 20, 1.0) for m in svc.observe(b)]
    msgs += [m for b in batches(rng, 40, scale_after, 20) for m in svc.observe(b)]
    return svc, msgs


def test_guarded_accepts_a_real_shift_on_forward_labels_only() -> None:
    svc, msgs = run_guarded(1.6)
    decisions = [m.decision for m in msgs if m.kind == "recalibration"]
    assert "accepted" in decisions
    first_alarm = next(i for i, m in enumerate(msgs) if m.kind == "drift")
    first_cal = next(i for i, m in enumerate(msgs) if m.kind == "calibrator")
    assert first_cal > first_alarm
    # judged on labels that came after the alarm: not in the alarm's own batch
    assert msgs[first_cal].event_ts > msgs[first_alarm].event_ts  # type: ignore[operator]
    assert svc.calibrator.transform(np.array([0.04]))[0] > 0.055


def test_guarded_publishes_nothing_without_drift() -> None:
    svc, msgs = run_guarded(1.0)
    assert [m for m in msgs if m.kind == "calibrator"] == []
    assert svc.calibrator.transform(np.array([0.04]))[0] == pytest.approx(0.04)


def test_guarded_rolls_back_a_calibrator_that_loses_to_the_raw_ranker() -> None:
    from learners.calibration import LogitShiftCalibrator

    settings = Settings(join=JoinConfig(), monitor=MonitorConfig(warmup=10**9,
                        recalibration="guarded", recal_window=4096))  # fmt: skip
    svc = MonitorService(settings, StreamrecMetrics())
    bad = LogitShiftCalibrator(0.5)  # e.g. a refit the ranker has caught up with since
    svc.apply_control(CalibratorUpdate(1, bad.to_dict()))
    rng = np.random.default_rng(5)
    msgs = [m for b in batches(rng, 8, 1.0) for m in svc.observe(b)]
    assert [m.decision for m in msgs if m.kind == "recalibration"] == ["rollback"]
    assert svc.n_rollbacks == 1
    assert svc.calibrator.transform(np.array([0.04]))[0] == pytest.approx(0.04)
