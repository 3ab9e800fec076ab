"""Isotonic and histogram-binning calibrators, the Calibrator protocol and dispatch."""

from __future__ import annotations

import json
from typing import Literal

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from learners.calibration import (
    CALIBRATOR_KINDS,
    Calibrator,
    LogitShiftCalibrator,
    PlattCalibrator,
    calibrator_from_dict,
    fit_if_better,
)
from learners.calibration_nonparametric import (
    HistogramBinningCalibrator,
    IsotonicCalibrator,
    pool_adjacent_violators,
)
from monitoring.calibration import log_loss


def brute_force_isotonic(y: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Weighted isotonic regression by the min-max formula: O(n^3), obviously right.

    ``f_i = max_{j <= i} min_{k >= i} mean_w(y[j..k])``.
    """
    n = y.size
    out = np.empty(n)
    for i in range(n):
        out[i] = max(
            min(np.dot(w[j : k + 1], y[j : k + 1]) / w[j : k + 1].sum() for k in range(i, n))
            for j in range(i + 1)
        )
    return out


def expand_blocks(starts: np.ndarray, values: np.ndarray, n: int) -> np.ndarray:
    return np.repeat(values, np.diff(np.append(starts, n)))


def miscalibrated(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Logit-normal predictions around 4% whose true CTR is sigmoid(1.3 logit p + 0.4)."""
    rng = np.random.default_rng(seed)
    p = 1.0 / (1.0 + np.exp(-rng.normal(-3.2, 0.7, n)))
    truth = PlattCalibrator(1.3, 0.4).transform(p)
    return p, (rng.random(n) < truth).astype(float)


def make(kind: str) -> Calibrator:
    classes: dict[str, type[Calibrator]] = {
        "platt": PlattCalibrator,
        "isotonic": IsotonicCalibrator,
        "histogram": HistogramBinningCalibrator,
        "shift": LogitShiftCalibrator,
    }
    return classes[kind]()


def test_pav_means_never_decrease_by_rounding() -> None:
    """Hypothesis found it: equal means 0.46875 after a block of weight 0.5958... rounded
    one ulp above the next block's, so the returned values decreased."""
    w = [1.0, 0.5958680394951875, 1.0]
    _, values, _ = pool_adjacent_violators([0.0, 0.46875, 0.46875], w)
    assert np.all(np.diff(values) >= 0)
    assert values[-1] == 0.46875


@settings(max_examples=60, deadline=None)
@given(
    ys=st.lists(st.floats(0.0, 1.0), min_size=1, max_size=12),
    ws=st.lists(st.floats(0.1, 5.0), min_size=12, max_size=12),
)
def test_pav_equals_brute_force_isotonic_regression(ys: list[float], ws: list[float]) -> None:
    y, w = np.array(ys), np.array(ws[: len(ys)])
    starts, values, weights = pool_adjacent_violators(y, w)
    assert np.all(np.diff(values) >= 0)
    assert weights.sum() == pytest.approx(w.sum())
    np.testing.assert_allclose(
        expand_blocks(starts, values, y.size), brute_force_isotonic(y, w), atol=1e-9
    )


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(1, 40))
def test_isotonic_knots_are_the_isotonic_fit_of_labels_sorted_by_prediction(
    seed: int, n: int
) -> None:
    rng = np.random.default_rng(seed)
    p = rng.choice(np.linspace(0.01, 0.5, 15), n)  # ties on purpose
    y = (rng.random(n) < p * 2).astype(float)
    cal = IsotonicCalibrator(eps=1e-9).fit(p, y)
    # Reference: pool ties, then brute-force isotonic regression on the unique predictions.
    uniq = np.unique(p)
    w_u = np.array([np.sum(p == u) for u in uniq], dtype=float)
    y_u = np.array([y[p == u].mean() for u in uniq])
    fitted = brute_force_isotonic(y_u, w_u)
    assert np.all(np.diff(cal.x) > 0) and np.all(np.diff(cal.y) >= 0)
    # One knot per block of unique predictions: at the block's mean prediction, with the
    # block's isotonic value, and transform() returns that value at the knot.
    starts, _, _ = pool_adjacent_violators(y_u, w_u)
    bounds = np.append(starts, uniq.size)
    want_x = [
        np.dot(uniq[a:b], w_u[a:b]) / w_u[a:b].sum()
        for a, b in zip(bounds, bounds[1:], strict=False)
    ]
    np.testing.assert_allclose(cal.x, want_x, rtol=1e-12)
    np.testing.assert_allclose(cal.y, fitted[starts], atol=1e-9)
    np.testing.assert_allclose(cal.transform(cal.x), np.clip(cal.y, 1e-9, 1 - 1e-9))


def test_isotonic_interpolates_between_knots_and_is_flat_beyond() -> None:
    cal = IsotonicCalibrator([0.1, 0.3], [0.02, 0.06])
    np.testing.assert_allclose(
        cal.transform([0.0, 0.1, 0.2, 0.3, 0.9]), [0.02, 0.02, 0.04, 0.06, 0.06]
    )


def test_isotonic_clips_blocks_without_clicks_away_from_zero() -> None:
    p = np.linspace(0.01, 0.2, 1_000)
    y = (p > 0.15).astype(float)
    cal = IsotonicCalibrator(eps=1e-4).fit(p, y)
    out = cal.transform(p)
    assert out.min() == pytest.approx(1e-4) and out.max() == pytest.approx(1 - 1e-4)


def test_isotonic_weighted_fit_equals_fit_on_repeated_rows() -> None:
    p, y = miscalibrated(3_000, seed=3)
    w = np.random.default_rng(3).integers(1, 4, p.size)
    a = IsotonicCalibrator().fit(p, y, w.astype(float))
    b = IsotonicCalibrator().fit(np.repeat(p, w), np.repeat(y, w))
    np.testing.assert_allclose(a.x, b.x, rtol=1e-12)
    np.testing.assert_allclose(a.y, b.y, rtol=1e-12)


@pytest.mark.parametrize("strategy", ["mass", "width"])
def test_histogram_rates_match_naive_bin_loop(strategy: Literal["mass", "width"]) -> None:
    rng = np.random.default_rng(4)
    p = rng.beta(2.0, 20.0, 5_000)
    y = (rng.random(p.size) < p * 1.4).astype(float)
    cal = HistogramBinningCalibrator(n_bins=8, strategy=strategy, prior_strength=30.0).fit(p, y)
    assert cal.edges is not None and cal.rates is not None
    for b in range(8):
        lo, hi = cal.edges[b], cal.edges[b + 1]
        inside = [i for i in range(p.size) if lo <= p[i] < hi or (b == 7 and p[i] >= hi)]
        if inside:
            m = float(np.mean(p[inside]))
            want = (sum(y[i] for i in inside) + 30.0 * m) / (len(inside) + 30.0)
        else:
            want = (lo + hi) / 2  # empty bin: its prior mean, the bin midpoint
        assert cal.rates[b] == pytest.approx(want, rel=1e-9)
        probe = np.array([lo, (lo + hi) / 2]) if hi > lo else np.array([lo])
        if hi > lo:
            assert np.all(cal.transform(probe) == pytest.approx(cal.rates[b]))


def test_histogram_mass_bins_hold_equal_counts_and_small_bins_stay_near_predictions() -> None:
    rng = np.random.default_rng(5)
    p = rng.beta(2.0, 48.0, 15_000)
    cal = HistogramBinningCalibrator(n_bins=15).fit(p, rng.random(p.size) < p)
    assert cal.edges is not None
    counts = np.histogram(p, bins=cal.edges)[0]
    assert counts.min() >= 990 and counts.max() <= 1_010
    # Three examples, all clicked: the prior keeps the rate near the predictions.
    tiny = HistogramBinningCalibrator(n_bins=3, prior_strength=100.0).fit(
        [0.02, 0.04, 0.06], [1, 1, 1]
    )
    assert tiny.rates is not None and np.all(tiny.rates < 0.1)


def test_histogram_empty_width_bins_are_safe() -> None:
    p = np.full(500, 0.03)
    cal = HistogramBinningCalibrator(n_bins=10, strategy="width").fit(p, np.zeros(500))
    out = cal.transform(np.linspace(0, 1, 21))
    assert np.all(np.isfinite(out)) and np.all((out > 0) & (out < 1))
    assert cal.transform([0.95])[0] == pytest.approx(0.95)  # empty bin -> its midpoint


@pytest.mark.parametrize("kind", CALIBRATOR_KINDS)
def test_each_calibrator_lowers_held_out_log_loss_on_known_miscalibration(kind: str) -> None:
    p, y = miscalibrated(60_000, seed=11)
    p_hold, y_hold = miscalibrated(60_000, seed=12)
    cal = make(kind).fit(p, y)
    before, after = log_loss(p_hold, y_hold), log_loss(cal.transform(p_hold), y_hold)
    assert after < before - 0.002
    truth = log_loss(PlattCalibrator(1.3, 0.4).transform(p_hold), y_hold)
    assert after < truth + 0.001


@pytest.mark.parametrize("kind", ["isotonic", "histogram"])
def test_fit_if_better_fits_the_requested_kind(kind: str) -> None:
    p, y = miscalibrated(40_000, seed=13)
    chosen, accepted, ll_cur, ll_new = fit_if_better(
        p[:20_000], y[:20_000], p[20_000:], y[20_000:], PlattCalibrator(), kind=kind
    )
    assert accepted and ll_new < ll_cur and chosen.to_dict()["kind"] == kind


def test_fit_if_better_keeps_current_settings_when_kind_matches() -> None:
    p, y = miscalibrated(40_000, seed=14)
    current = HistogramBinningCalibrator(n_bins=5, prior_strength=10.0)
    chosen, accepted, *_ = fit_if_better(
        p[:20_000], y[:20_000], p[20_000:], y[20_000:], current, kind="histogram"
    )
    assert accepted and isinstance(chosen, HistogramBinningCalibrator) and chosen.n_bins == 5


def test_fit_if_better_default_is_the_platt_fit() -> None:
    p, y = miscalibrated(20_000, seed=15)
    chosen, accepted, _, _ = fit_if_better(
        p[:10_000], y[:10_000], p[10_000:], y[10_000:], PlattCalibrator()
    )
    assert accepted and chosen == PlattCalibrator().fit(p[:10_000], y[:10_000])
    with pytest.raises(ValueError, match="unknown calibrator kind"):
        fit_if_better(p, y, p, y, PlattCalibrator(), kind="beta")


@pytest.mark.parametrize("kind", CALIBRATOR_KINDS)
def test_dict_round_trip_through_json_and_dispatch(kind: str) -> None:
    p, y = miscalibrated(5_000, seed=16)
    for cal in (make(kind), make(kind).fit(p, y)):
        assert isinstance(cal, Calibrator)
        d = json.loads(json.dumps(cal.to_dict()))
        back = calibrator_from_dict(d)
        assert d["kind"] == kind and type(back) is type(cal) and back == cal
        np.testing.assert_array_equal(back.transform(p), cal.transform(p))
        assert type(cal).from_dict(d) == cal  # type: ignore[attr-defined]


def test_platt_dict_has_kind_and_old_dicts_still_load() -> None:
    cal = PlattCalibrator(1.2, -0.1)
    assert cal.to_dict() == {"kind": "platt", "a": 1.2, "b": -0.1}
    assert PlattCalibrator.from_dict({"a": 1.2, "b": -0.1}) == cal
    assert calibrator_from_dict({"a": 1.2, "b": -0.1}) == cal
    with pytest.raises(ValueError):
        PlattCalibrator.from_dict({"kind": "isotonic", "x": [], "y": []})
    with pytest.raises(ValueError, match="unknown calibrator kind"):
        calibrator_from_dict({"kind": "beta"})


@pytest.mark.parametrize("kind", ["isotonic", "histogram"])
def test_unfitted_is_identity_and_fit_returns_new_instance(kind: str) -> None:
    base = make(kind)
    p = np.linspace(0.01, 0.99, 11)
    assert base.is_identity
    np.testing.assert_allclose(base.transform(p), p)
    fitted = base.fit(*miscalibrated(2_000, seed=17))
    assert fitted is not base and base.is_identity and not fitted.is_identity
    # Nothing usable to fit on: unchanged.
    assert make(kind).fit([np.nan], [1.0]).is_identity


@settings(max_examples=25, deadline=None)
@given(
    kind=st.sampled_from(["isotonic", "histogram"]),
    fit_p=st.lists(st.floats(0.0, 1.0), min_size=1, max_size=40),
    labels=st.lists(st.sampled_from([0.0, 1.0]), min_size=40, max_size=40),
    probe=st.lists(st.floats(-0.5, 1.5), min_size=1, max_size=30),
)
def test_outputs_stay_inside_unit_interval(
    kind: str, fit_p: list[float], labels: list[float], probe: list[float]
) -> None:
    cal = make(kind).fit(np.array(fit_p), np.array(labels[: len(fit_p)]))
    out = cal.transform(np.array(probe))
    assert out.shape == (len(probe),) and np.all((out > 0) & (out < 1))
    if kind == "isotonic":
        grid = np.linspace(0, 1, 50)
        assert np.all(np.diff(cal.transform(grid)) >= 0)
