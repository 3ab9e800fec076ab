from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from learners.calibration import PlattCalibrator, fit_if_better
from monitoring.calibration import log_loss


def miscalibrated(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    p = rng.uniform(0.005, 0.6, n)
    p_true = PlattCalibrator(1.5, 0.3).transform(p)
    return p, (rng.random(n) < p_true).astype(float)


def test_fit_recovers_known_miscalibration() -> None:
    p, y = miscalibrated(50_000, seed=1)
    cal = PlattCalibrator().fit(p, y)
    assert abs(cal.a - 1.5) < 0.08
    assert abs(cal.b - 0.3) < 0.12


def test_fit_returns_new_calibrator_and_leaves_original_unchanged() -> None:
    p, y = miscalibrated(2_000, seed=2)
    base = PlattCalibrator()
    fitted = base.fit(p, y)
    assert fitted is not base and base.is_identity and not fitted.is_identity


def test_weighted_fit_equals_fit_on_repeated_rows() -> None:
    p, y = miscalibrated(3_000, seed=3)
    w = np.random.default_rng(3).integers(1, 4, p.shape[0]).astype(float)
    a = PlattCalibrator().fit(p, y, w)
    b = PlattCalibrator().fit(np.repeat(p, w.astype(int)), np.repeat(y, w.astype(int)))
    np.testing.assert_allclose([a.a, a.b], [b.a, b.b], rtol=1e-4, atol=1e-4)


def test_fit_if_better_accepts_helpful_fit() -> None:
    p, y = miscalibrated(20_000, seed=4)
    cal, accepted, loss_cur, loss_new = fit_if_better(
        p[:10_000], y[:10_000], p[10_000:], y[10_000:], PlattCalibrator()
    )
    assert accepted and loss_new < loss_cur and not cal.is_identity


def test_fit_if_better_rejects_fit_that_does_not_help() -> None:
    rng = np.random.default_rng(5)
    p = rng.uniform(0.01, 0.5, 4_000)
    y = (rng.random(4_000) < p).astype(float)  # already calibrated
    # Fit slice from a very different (miscalibrated) regime: it cannot help on the holdout.
    p_fit, y_fit = miscalibrated(4_000, seed=6)
    current = PlattCalibrator()
    cal, accepted, loss_cur, loss_new = fit_if_better(p_fit, 1 - y_fit, p, y, current)
    assert not accepted and cal is current and loss_new >= loss_cur


@settings(max_examples=15, deadline=None)
@given(st.integers(1, 200), st.sampled_from([0.0, 1.0]), st.integers(0, 10_000))
def test_fit_is_finite_when_all_labels_are_equal(n: int, label: float, seed: int) -> None:
    p = np.random.default_rng(seed).uniform(0.0, 1.0, n)
    cal = PlattCalibrator().fit(p, np.full(n, label))
    assert np.isfinite([cal.a, cal.b]).all()
    out = cal.transform(p)
    assert np.all((out >= 0) & (out <= 1))


@settings(max_examples=20, deadline=None)
@given(
    st.floats(-3, 3),
    st.floats(-3, 3),
    st.lists(st.floats(0.0, 1.0), min_size=1, max_size=50),
)
def test_transform_is_in_unit_interval_and_round_trips(a: float, b: float, ps: list) -> None:
    cal = PlattCalibrator(a, b)
    out = cal.transform(np.array(ps))
    assert out.shape == (len(ps),) and np.all((out >= 0) & (out <= 1))
    assert PlattCalibrator.from_dict(cal.to_dict()) == cal


def test_identity_transform_returns_input() -> None:
    p = np.linspace(0.01, 0.99, 11)
    np.testing.assert_allclose(PlattCalibrator().transform(p), p, rtol=1e-9)
    assert PlattCalibrator().is_identity


def test_log_loss_matches_naive() -> None:
    p, y = np.array([0.2, 0.9]), np.array([0.0, 1.0])
    expected = -(np.log(0.8) + np.log(0.9)) / 2
    assert abs(log_loss(p, y) - expected) < 1e-12
