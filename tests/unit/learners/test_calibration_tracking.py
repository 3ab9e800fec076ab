"""The tracking recalibration policy: validated refits and a level that follows the model."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from learners.calibration import (
    LogitShiftCalibrator,
    OffsetCalibrator,
    PlattCalibrator,
    fit_if_better,
    solve_offset,
)
from learners.calibration_nonparametric import IsotonicCalibrator
from learners.recalibration import TrackingConfig, TrackingRecalibrator


def naive_offset(z: list[float], target: float) -> float:
    """Bisection on the mean of sigmoids, 200 halvings."""
    lo, hi = -60.0, 60.0
    for _ in range(200):
        mid = (lo + hi) / 2
        mean = sum(1 / (1 + math.exp(-(zi + mid))) for zi in z) / len(z)
        lo, hi = (mid, hi) if mean < target else (lo, mid)
    return (lo + hi) / 2


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.floats(-8, 8), min_size=1, max_size=40),
    st.floats(0.001, 0.999),
)
def test_solve_offset_matches_bisection(z: list[float], target: float) -> None:
    d = solve_offset(z, target)
    assert d == pytest.approx(naive_offset(z, target), abs=1e-6)
    mean = float(np.mean(1 / (1 + np.exp(-(np.asarray(z) + d)))))
    assert mean == pytest.approx(target, abs=1e-9)


@pytest.mark.parametrize("cal", [LogitShiftCalibrator(0.3), PlattCalibrator(1.4, -0.2)])
def test_with_offset_moves_the_output_logit(cal: OffsetCalibrator) -> None:
    p = np.array([0.01, 0.05, 0.3])
    moved = cal.with_offset(0.5).transform(p)
    q = cal.transform(p)
    assert np.allclose(moved, 1 / (1 + np.exp(-(np.log(q / (1 - q)) + 0.5))))
    assert type(cal.with_offset(0.5)) is type(cal)
    assert isinstance(cal, OffsetCalibrator)
    assert not isinstance(IsotonicCalibrator(), OffsetCalibrator)


def feed(rec: TrackingRecalibrator, rng: np.random.Generator, p_raw: float, ctr: float, n: int):
    rec.update(p_raw=np.full(n, p_raw), labels=(rng.random(n) < ctr).astype(float))


def test_disarmed_until_a_restart_then_a_validated_refit_is_published() -> None:
    rng = np.random.default_rng(0)
    rec = TrackingRecalibrator(TrackingConfig(refit_every=2_000, recal_window=6_000))
    for _ in range(5):
        feed(rec, rng, 0.04, 0.064, 2_000)
    assert not rec.armed and not rec.due
    rec.restart()
    assert rec.due
    result = rec.refit()
    assert result.accepted is True and result.published is not None
    assert result.n_fit == 4_500 and result.n_holdout == 1_500  # 25% of 6,000
    assert result.published.transform([0.04])[0] == pytest.approx(result.target, rel=1e-9)
    assert result.target == pytest.approx(0.064, rel=0.1)
    assert rec.calibrator is result.published and not rec.due
    assert (rec.n_accepted, rec.n_rejected, rec.n_published) == (1, 0, 1)


def test_a_refit_that_loses_on_the_newest_slice_is_rejected_and_nothing_changes() -> None:
    rec = TrackingRecalibrator(TrackingConfig(refit_every=1_000, recal_window=4_000))
    p = np.full(1_000, 0.04)
    every = np.zeros(1_000)
    for _ in range(3):  # clicks at 10% ...
        rec.update(p_raw=p, labels=(np.arange(1_000) % 10 == 0).astype(float))
    every[::25] = 1.0  # ... then exactly 4%: the raw model is right again
    rec.update(p_raw=p, labels=every)
    before = rec.calibrator
    rec.restart()
    result = rec.refit()
    assert result.accepted is False and result.published is None
    assert result.holdout_logloss_new > result.holdout_logloss_old
    assert rec.calibrator is before and rec.target is None
    assert rec.n_rejected == 1 and rec.armed


def test_too_few_clicks_skip_the_refit() -> None:
    rec = TrackingRecalibrator(TrackingConfig(refit_every=500, recal_window=1_000))
    rec.update(p_raw=np.full(1_000, 0.04), labels=np.zeros(1_000))
    rec.restart()
    result = rec.refit()
    assert result.accepted is None and result.published is None
    assert rec.n_accepted == rec.n_rejected == 0


def served_ratios(policy: str, seed: int = 1) -> list[float]:
    """A model that learns a x1.6 CTR jump (its raw level rises 4% -> 6.4% over 20 batches
    after the alarm) served through the published calibrators; the served/true ratio of
    every later batch."""
    rng = np.random.default_rng(seed)
    rec = TrackingRecalibrator(TrackingConfig(refit_every=2_000, recal_window=6_000))
    truth = rng.uniform(0.02, 0.06, 2_000)
    for _ in range(3):
        rec.update(p_raw=truth, labels=(rng.random(2_000) < 1.6 * truth).astype(float))
    rec.restart()
    fixed = rec.refit().published
    assert fixed is not None
    ratios = []
    for step in range(40):
        raw = truth * (1.0 + 0.6 * min(1.0, (step + 1) / 20))
        served = (fixed if policy == "fixed" else rec.calibrator).transform(raw)
        ratios.append(float(served.sum() / (1.6 * truth).sum()))
        rec.update(p_raw=raw, labels=(rng.random(2_000) < 1.6 * truth).astype(float))
        if rec.due:
            rec.refit()
    return ratios


def test_tracking_follows_an_adapting_model_where_a_fixed_calibrator_overshoots() -> None:
    tracked, fixed = served_ratios("track"), served_ratios("fixed")
    assert max(abs(r - 1) for r in tracked) < 0.1
    assert max(abs(r - 1) for r in tracked[20:]) < 0.05
    assert min(fixed[20:]) > 1.4  # the one-shot calibrator doubles the model's own catch-up


def test_the_trend_compensates_the_lag_of_a_steadily_moving_model() -> None:
    clicks = (np.arange(2_000) % 25 == 0).astype(float)  # exactly 4%: no label noise

    def error(trend: float) -> float:
        rec = TrackingRecalibrator(
            TrackingConfig(refit_every=2_000, recal_window=4_000, trend=trend, settle_refits=0)
        )
        errs = []
        for step in range(30):
            raw = 0.02 + 0.001 * step  # the model's level keeps rising; the truth is 4%
            if step >= 3:
                errs.append(float(rec.calibrator.transform([raw])[0]) / 0.04 - 1)
            rec.update(p_raw=np.full(2_000, raw), labels=clicks)
            if step == 2:
                rec.restart()
            if rec.due:
                rec.refit()
        return float(np.mean(np.abs(errs[5:])))

    assert error(0.5) < 0.5 * error(0.0)


def test_it_settles_back_to_identity_and_disarms_once_the_model_has_caught_up() -> None:
    cfg = TrackingConfig(refit_every=1_000, recal_window=3_000, settle_refits=3)
    rec = TrackingRecalibrator(cfg)
    clicks = (np.arange(1_000) % 125 < 8).astype(float)  # exactly 6.4%
    for _ in range(3):
        rec.update(p_raw=np.full(1_000, 0.04), labels=clicks)
    rec.restart()
    assert rec.refit().accepted
    results = []
    for _ in range(20):  # the model has caught up: raw scores are right
        rec.update(p_raw=np.full(1_000, 0.064), labels=clicks)
        if rec.due:
            results.append(rec.refit())
        if not rec.armed:
            break
    assert results[-1].disarmed
    assert results[-1].published == LogitShiftCalibrator()
    assert rec.calibrator.is_identity and not rec.due and rec.target is None


def test_nonparametric_kinds_are_refitted_but_not_levelled() -> None:
    rng = np.random.default_rng(4)
    rec = TrackingRecalibrator(
        TrackingConfig(kind="isotonic", refit_every=4_000, recal_window=20_000)
    )
    for _ in range(5):
        p = rng.uniform(0.05, 0.3, 4_000)
        rec.update(p_raw=p, labels=(rng.random(4_000) < 1.6 * p).astype(float))
    rec.restart()
    result = rec.refit()
    assert not rec.levelled and result.offset > 0.3  # its mean logit shift of the raw scores
    assert isinstance(result.published, IsotonicCalibrator)
    assert result.published.transform([0.2])[0] == pytest.approx(0.32, rel=0.1)


def test_adopting_a_published_calibrator_arms_unless_it_is_the_identity() -> None:
    rec = TrackingRecalibrator()
    rec.adopt(LogitShiftCalibrator())
    assert not rec.armed
    rec.adopt(LogitShiftCalibrator(0.4))
    assert rec.armed and rec.calibrator == LogitShiftCalibrator(0.4)


def test_alarm_refit_equals_fit_if_better_for_a_constant_raw_score() -> None:
    """For the shift kind on a constant raw score the levelled refit is the logit-shift MLE
    of the fit slice, exactly what the one-shot policy fits."""
    rng = np.random.default_rng(5)
    p = np.full(8_000, 0.05)
    y = (rng.random(8_000) < 0.08).astype(float)
    rec = TrackingRecalibrator(TrackingConfig(refit_every=2_000, recal_window=8_000, trend=0.0))
    rec.update(p_raw=p, labels=y)
    rec.restart()
    got = rec.refit()
    want, accepted, _, _ = fit_if_better(p[:-2000], y[:-2000], p[-2000:], y[-2000:],
                                         LogitShiftCalibrator(), kind="shift")  # fmt: skip
    assert got.accepted == accepted
    assert got.published is not None
    assert got.published.transform([0.05])[0] == pytest.approx(want.transform([0.05])[0])


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("kind", "nope"),
        ("recal_window", 0),
        ("refit_every", 0),
        ("holdout_fraction", 1.0),
        ("trend", 1.0),
        ("settle_refits", -1),
    ],
)
def test_bad_settings_are_rejected(field: str, value: object) -> None:
    with pytest.raises(ValueError):
        TrackingConfig(**{field: value})  # type: ignore[arg-type]  # deliberately wrong
    with pytest.raises(ValueError, match="recal_window"):
        TrackingConfig(recal_window=10, max_window=5)
