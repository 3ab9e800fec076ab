"""The one-parameter logit-shift calibrator."""

from __future__ import annotations

import numpy as np
import pytest

from learners.calibration import LogitShiftCalibrator, calibrator_from_dict, fit_if_better


def _logit(p: np.ndarray) -> np.ndarray:
    return np.log(p / (1 - p))


def test_recovers_a_known_logit_shift() -> None:
    rng = np.random.default_rng(1)
    p = rng.uniform(0.01, 0.2, 200_000)
    true = 1 / (1 + np.exp(-(_logit(p) + 0.4)))
    y = (rng.random(p.size) < true).astype(float)
    cal = LogitShiftCalibrator().fit(p, y)
    assert cal.b == pytest.approx(0.4, abs=0.03)
    np.testing.assert_allclose(cal.transform(p), 1 / (1 + np.exp(-(_logit(p) + cal.b))), rtol=1e-9)


def test_round_trips_and_constant_labels_stay_finite() -> None:
    cal = LogitShiftCalibrator(0.25)
    again = calibrator_from_dict(cal.to_dict())
    assert isinstance(again, LogitShiftCalibrator) and again.b == 0.25
    fitted = LogitShiftCalibrator().fit(np.full(100, 0.1), np.zeros(100))
    assert np.isfinite(fitted.b) and fitted.b < 0


def test_fit_if_better_accepts_a_shift_only_when_it_helps() -> None:
    rng = np.random.default_rng(2)
    p = rng.uniform(0.02, 0.08, 20_000)
    y = (rng.random(p.size) < 1.6 * p).astype(float)
    chosen, accepted, old, new = fit_if_better(
        p[:15_000], y[:15_000], p[15_000:], y[15_000:], LogitShiftCalibrator(), kind="shift"
    )
    assert accepted and new < old and chosen.transform(np.array([0.04]))[0] > 0.055
    y2 = (rng.random(p.size) < p).astype(float)  # already calibrated: nothing to gain
    fitted = LogitShiftCalibrator().fit(p[:15_000], y2[:15_000])
    assert abs(fitted.b) < 0.1
