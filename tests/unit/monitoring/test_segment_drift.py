"""One drift detector per segment: a drift confined to one segment is seen and named."""

from __future__ import annotations

import numpy as np
import pytest

from monitoring.drift import (
    CalibrationDriftDetector,
    DriftConfig,
    SegmentedDriftDetector,
    make_detector,
)


def segment_stream(
    rng: np.random.Generator, n: int, scale: dict[str, float]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    seg = rng.choice(np.array(["1", "2", "3"]), n)
    p = rng.uniform(0.02, 0.08, n)
    truth = p * np.vectorize(lambda s: scale.get(s, 1.0))(seg)
    return p, (rng.random(n) < truth).astype(float), seg


def test_each_segment_gets_its_own_detector_fed_only_its_examples() -> None:
    rng = np.random.default_rng(0)
    det = SegmentedDriftDetector(lambda: CalibrationDriftDetector(DriftConfig(window=500)))
    p, y, seg = segment_stream(rng, 3_000, {})
    det.update_many(p, y, seg)
    assert set(det.detectors) == {"1", "2", "3"}
    for name, d in det.detectors.items():
        ref = CalibrationDriftDetector(DriftConfig(window=500))
        ref.update_many(p[seg == name], y[seg == name])
        assert d.statistic == pytest.approx(ref.statistic)
    assert det.statistics == {k: d.statistic for k, d in det.detectors.items()}


def test_a_drift_in_one_position_alarms_that_position_only() -> None:
    rng = np.random.default_rng(1)
    det = SegmentedDriftDetector(lambda: make_detector("cusum"))
    for _ in range(40):
        det.update_many(*segment_stream(rng, 1024, {}))
    assert det.n_alarms == {"1": 0, "2": 0, "3": 0}
    seen: set[str] = set()
    for _ in range(60):
        det.update_many(*segment_stream(rng, 1024, {"2": 1.6}))
        if det.drift_detected:
            seen |= set(det.drifted_segments)
    assert seen == {"2"}
    assert det.n_alarms["2"] >= 1 and det.n_alarms["1"] == det.n_alarms["3"] == 0


def test_segments_beyond_the_bound_are_not_tested_but_counted() -> None:
    det = SegmentedDriftDetector(lambda: make_detector("cusum"), max_segments=2)
    det.update_many([0.1, 0.1, 0.1, 0.1], [0, 1, 0, 0], ["a", "b", "c", "c"])
    assert set(det.detectors) == {"a", "b"} and det.n_dropped == 2


def test_alarming_segments_are_reset_and_reset_clears_the_flag() -> None:
    det = SegmentedDriftDetector(
        lambda: CalibrationDriftDetector(DriftConfig(window=1_000, min_positives=5, cooldown=0))
    )
    p = np.full(1_000, 0.02)
    det.update_many(p, np.ones(1_000) * (np.arange(1_000) % 5 == 0), ["x"] * 1_000)
    assert det.drifted_segments == ["x"]
    inner = det.detectors["x"]
    assert isinstance(inner, CalibrationDriftDetector) and inner.positives == 0  # reset
    det.reset()
    assert not det.drift_detected
    with pytest.raises(ValueError, match="segments"):
        det.update_many([0.1], [0], ["a", "b"])
    with pytest.raises(ValueError, match="max_segments"):
        SegmentedDriftDetector(lambda: make_detector("cusum"), max_segments=0)
