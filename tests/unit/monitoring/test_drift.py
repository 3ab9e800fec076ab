from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from monitoring.drift import CalibrationDriftDetector, DriftConfig


def run_until_alarm(
    det: CalibrationDriftDetector, p: float, ctr: float, rng: np.random.Generator, limit: int
) -> int | None:
    """Feed batches of 100 until an alarm; return examples fed, or None."""
    preds = np.full(100, p)
    for fed in range(100, limit + 1, 100):
        det.update_many(preds, rng.random(100) < ctr)
        if det.drift_detected:
            return fed
    return None


def test_calibrated_stream_of_500k_raises_no_alarm() -> None:
    rng = np.random.default_rng(2024)
    det = CalibrationDriftDetector(DriftConfig(threshold_z=5.0))
    for _ in range(500):
        p = rng.beta(2.0, 48.0, size=1_000)  # mean 0.04
        det.update_many(p, rng.random(1_000) < p)
        assert abs(det.z) < 5.0
    assert det.n_alarms == 0


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
def test_abrupt_ctr_jump_from_4_to_6_4_percent_detected_within_few_thousand(seed: int) -> None:
    rng = np.random.default_rng(seed)
    det = CalibrationDriftDetector(DriftConfig())
    assert run_until_alarm(det, 0.04, 0.04, rng, limit=20_000) is None
    fed = run_until_alarm(det, 0.04, 0.064, rng, limit=20_000)
    assert fed is not None and fed <= 10_000
    assert det.z > 5.0 and det.n_alarms == 1


def test_smaller_window_detects_faster() -> None:
    rng = np.random.default_rng(11)
    det = CalibrationDriftDetector(DriftConfig(window=5_000))
    run_until_alarm(det, 0.04, 0.04, rng, limit=5_000)
    fed = run_until_alarm(det, 0.04, 0.064, rng, limit=20_000)
    assert fed is not None and fed <= 5_000


def test_over_prediction_gives_negative_z_alarm() -> None:
    rng = np.random.default_rng(5)
    det = CalibrationDriftDetector(DriftConfig(window=5_000))
    assert run_until_alarm(det, 0.08, 0.04, rng, limit=5_000) is not None
    assert det.z <= -5.0


def test_no_alarm_below_min_positives_even_with_large_z() -> None:
    rng = np.random.default_rng(3)
    cfg = DriftConfig(window=2_000, min_positives=50)
    det = CalibrationDriftDetector(cfg)
    assert run_until_alarm(det, 0.001, 0.01, rng, limit=20_000) is None
    assert det.z > 5.0 and det.positives < 50
    det_loose = CalibrationDriftDetector(DriftConfig(window=2_000, min_positives=5))
    assert run_until_alarm(det_loose, 0.001, 0.01, np.random.default_rng(3), 20_000) is not None


def test_alarms_are_separated_by_at_least_the_cooldown() -> None:
    rng = np.random.default_rng(9)
    det = CalibrationDriftDetector(DriftConfig(window=5_000, cooldown=10_000))
    preds = np.full(100, 0.04)
    alarm_at = []
    for t in range(100, 60_001, 100):
        det.update_many(preds, rng.random(100) < 0.08)
        if det.drift_detected:
            alarm_at.append(t)
    assert len(alarm_at) >= 2
    assert all(b - a >= 10_000 for a, b in zip(alarm_at, alarm_at[1:], strict=False))
    assert det.n_alarms == len(alarm_at)


def test_reset_clears_window_and_starts_cooldown() -> None:
    rng = np.random.default_rng(1)
    det = CalibrationDriftDetector(DriftConfig(window=5_000, cooldown=3_000))
    assert run_until_alarm(det, 0.04, 0.08, rng, limit=10_000) is not None
    det.reset()
    assert not det.drift_detected and det.z == 0.0 and det.positives == 0.0
    assert det.in_cooldown
    # Drift persists, but nothing fires during the 3,000-example cooldown.
    fed = run_until_alarm(det, 0.04, 0.08, rng, limit=20_000)
    assert fed is not None and fed >= 3_000
    assert det.n_alarms == 2


def test_drift_detected_lasts_only_until_next_update() -> None:
    det = CalibrationDriftDetector(DriftConfig(window=1_000, min_positives=1, cooldown=5_000))
    det.update_many(np.full(1_000, 0.01), np.ones(1_000))
    assert det.drift_detected
    det.update_many(np.full(10, 0.01), np.ones(10))
    assert not det.drift_detected


@settings(max_examples=30, deadline=None)
@given(
    window=st.integers(1, 300),
    batches=st.lists(st.integers(0, 400), min_size=1, max_size=12),
    seed=st.integers(0, 1_000),
)
def test_z_equals_naive_statistic_over_last_window_examples(
    window: int, batches: list[int], seed: int
) -> None:
    rng = np.random.default_rng(seed)
    det = CalibrationDriftDetector(DriftConfig(window=window))
    ps, ys = [], []
    for b in batches:
        p = rng.random(b)
        y = (rng.random(b) < 0.5).astype(float)
        det.update_many(p, y)
        ps.append(p)
        ys.append(y)
    p_win = np.concatenate(ps)[-window:]
    y_win = np.concatenate(ys)[-window:]
    var = sum(pi * (1 - pi) for pi in p_win)
    want = 0.0 if var == 0 else (sum(y_win) - sum(p_win)) / math.sqrt(var)
    assert math.isclose(det.z, want, rel_tol=1e-7, abs_tol=1e-7)


def test_single_example_update_matches_batch() -> None:
    a = CalibrationDriftDetector(DriftConfig(window=50))
    b = CalibrationDriftDetector(DriftConfig(window=50))
    rng = np.random.default_rng(0)
    p, y = rng.random(120), (rng.random(120) < 0.3).astype(float)
    for pi, yi in zip(p, y, strict=True):
        a.update(float(pi), float(yi))
    b.update_many(p, y)
    assert math.isclose(a.z, b.z, rel_tol=1e-9, abs_tol=1e-9)


def test_mismatched_shapes_raise() -> None:
    det = CalibrationDriftDetector()
    with pytest.raises(ValueError):
        det.update_many(np.zeros(3), np.zeros(2))
