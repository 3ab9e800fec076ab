from __future__ import annotations

import math
from typing import Literal

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from monitoring.calibration import (
    auc,
    calibration_ratio,
    drift_z,
    expected_calibration_error,
    log_loss,
    normalized_entropy,
    reliability_bins,
)
from monitoring.windows import CalibrationWindow

# --- deliberately naive references (Python loops, no numpy tricks) -----------------------


def naive_ratio(p: list[float], y: list[float], w: list[float]) -> float:
    num = sum(wi * pi for pi, wi in zip(p, w, strict=True))
    den = sum(wi * yi for yi, wi in zip(y, w, strict=True))
    return math.nan if den == 0 else num / den


def naive_log_loss(p: list[float], y: list[float], w: list[float]) -> float:
    total = 0.0
    for pi, yi, wi in zip(p, y, w, strict=True):
        pc = min(max(pi, 1e-7), 1 - 1e-7)
        total += wi * -(yi * math.log(pc) + (1 - yi) * math.log(1 - pc))
    return total / sum(w)


def naive_ne(p: list[float], y: list[float], w: list[float]) -> float:
    rate = sum(wi * yi for yi, wi in zip(y, w, strict=True)) / sum(w)
    if rate in (0.0, 1.0):
        return math.nan
    h = -(rate * math.log(rate) + (1 - rate) * math.log(1 - rate))
    return naive_log_loss(p, y, w) / h


def naive_auc(p: list[float], y: list[float]) -> float:
    pos = [pi for pi, yi in zip(p, y, strict=True) if yi == 1]
    neg = [pi for pi, yi in zip(p, y, strict=True) if yi == 0]
    if not pos or not neg:
        return math.nan
    wins = 0.0
    for a in pos:
        for b in neg:
            wins += 1.0 if a > b else 0.5 if a == b else 0.0
    return wins / (len(pos) * len(neg))


def naive_mass_bins(p: list[float], y: list[float], n_bins: int) -> list[list[int]]:
    order = sorted(range(len(p)), key=lambda i: p[i])  # stable
    q, r = divmod(len(p), n_bins)
    bins, start = [], 0
    for b in range(n_bins):
        size = q + 1 if b < r else q
        if size:
            bins.append(order[start : start + size])
        start += size
    return bins


def naive_ece(p: list[float], y: list[float], n_bins: int, strategy: str) -> float:
    if strategy == "mass":
        bins = naive_mass_bins(p, y, n_bins)
    else:
        groups: dict[int, list[int]] = {}
        for i, pi in enumerate(p):
            groups.setdefault(min(int(pi * n_bins), n_bins - 1), []).append(i)
        bins = list(groups.values())
    total = 0.0
    for idx in bins:
        mp = sum(p[i] for i in idx) / len(idx)
        my = sum(y[i] for i in idx) / len(idx)
        total += len(idx) * abs(mp - my)
    return total / len(p)


def same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)


# Predictions on a coarse grid so ties are common.
probs = st.lists(st.integers(0, 20).map(lambda i: i / 20), min_size=1, max_size=60)


@st.composite
def examples(draw: st.DrawFn) -> tuple[list[float], list[float], list[float]]:
    p = draw(probs)
    y = draw(st.lists(st.sampled_from([0.0, 1.0]), min_size=len(p), max_size=len(p)))
    w = draw(st.lists(st.floats(0.1, 5.0), min_size=len(p), max_size=len(p)))
    return p, y, w


@given(examples())
def test_ratio_log_loss_ne_match_naive_reference(ex: tuple[list[float], ...]) -> None:
    p, y, w = ex
    assert same(calibration_ratio(p, y, w), naive_ratio(p, y, w))
    assert same(log_loss(p, y, w), naive_log_loss(p, y, w))
    assert same(normalized_entropy(p, y, w), naive_ne(p, y, w))
    ones = [1.0] * len(p)
    assert same(calibration_ratio(p, y), naive_ratio(p, y, ones))
    assert same(log_loss(p, y), naive_log_loss(p, y, ones))


@given(examples())
def test_auc_matches_pairwise_count_with_ties_as_half(ex: tuple[list[float], ...]) -> None:
    p, y, _ = ex
    assert same(auc(p, y), naive_auc(p, y))


@given(examples(), st.integers(1, 12), st.sampled_from(["mass", "width"]))
def test_ece_matches_naive_binning(
    ex: tuple[list[float], ...], n_bins: int, strategy: Literal["mass", "width"]
) -> None:
    p, y, _ = ex
    assert same(
        expected_calibration_error(p, y, n_bins, strategy), naive_ece(p, y, n_bins, strategy)
    )


@given(examples(), st.integers(1, 12))
def test_reliability_bins_match_naive_equal_mass_bins(
    ex: tuple[list[float], ...], n_bins: int
) -> None:
    p, y, _ = ex
    got = reliability_bins(p, y, n_bins)
    want = [
        (sum(p[i] for i in b) / len(b), sum(y[i] for i in b) / len(b), len(b))
        for b in naive_mass_bins(p, y, n_bins)
    ]
    assert len(got) == len(want)
    for (gp, gy, gn), (wp, wy, wn) in zip(got, want, strict=True):
        assert same(gp, wp) and same(gy, wy) and gn == wn
    assert sum(n for _, _, n in got) == len(p)


def test_undefined_statistics_are_nan() -> None:
    assert math.isnan(calibration_ratio([0.3, 0.2], [0, 0]))
    assert math.isnan(normalized_entropy([0.3, 0.2], [1, 1]))
    assert math.isnan(normalized_entropy([0.3, 0.2], [0, 0]))
    assert math.isnan(auc([0.3, 0.2], [1, 1]))
    assert math.isnan(expected_calibration_error([], []))
    assert math.isnan(log_loss([], []))
    assert reliability_bins([], []) == []


def test_log_loss_clips_extreme_predictions() -> None:
    assert log_loss([0.0], [1]) == pytest.approx(-math.log(1e-7))
    assert log_loss([1.0], [0]) == pytest.approx(-math.log(1e-7), rel=1e-6)


def test_drift_z_formula_and_zero_variance() -> None:
    assert drift_z(60.0, 40.0, 16.0) == 5.0
    assert drift_z(30.0, 40.0, 25.0) == -2.0
    assert drift_z(3.0, 0.0, 0.0) == 0.0


def test_mismatched_shapes_raise() -> None:
    with pytest.raises(ValueError, match="same length"):
        calibration_ratio([0.1, 0.2], [1])
    with pytest.raises(ValueError, match="shape"):
        log_loss([0.1, 0.2], [1, 0], [1.0])
    with pytest.raises(ValueError, match="strategy"):
        expected_calibration_error([0.1], [1], strategy="quantile")  # type: ignore[arg-type]


# --- CalibrationWindow -------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(
    size=st.integers(1, 50),
    batch_sizes=st.lists(st.integers(0, 80), min_size=1, max_size=8),
    seed=st.integers(0, 2**16),
    weighted=st.booleans(),
)
def test_window_equals_statistics_of_last_size_examples(
    size: int, batch_sizes: list[int], seed: int, weighted: bool
) -> None:
    rng = np.random.default_rng(seed)
    cw = CalibrationWindow(size=size)
    ps, ys, ws = [], [], []
    for b in batch_sizes:
        p = rng.random(b)
        y = (rng.random(b) < p).astype(float)
        w = rng.uniform(0.5, 2.0, b) if weighted else np.ones(b)
        cw.update(predictions=p, labels=y, weights=w if weighted else None)
        ps.append(p)
        ys.append(y)
        ws.append(w)
    p_all, y_all, w_all = np.concatenate(ps), np.concatenate(ys), np.concatenate(ws)
    p_win, y_win, w_win = p_all[-size:], y_all[-size:], w_all[-size:]

    got_p, got_y = cw.window_arrays()
    np.testing.assert_array_equal(got_p, p_win)
    np.testing.assert_array_equal(got_y, y_win)

    win, life = cw.window(), cw.lifetime()
    assert win.n == p_win.size and life.n == p_all.size
    if p_all.size == 0:
        return
    assert same(win.ratio, calibration_ratio(p_win, y_win, w_win))
    assert same(win.log_loss, log_loss(p_win, y_win, w_win))
    assert same(win.ne, normalized_entropy(p_win, y_win, w_win))
    assert same(win.auc, auc(p_win, y_win))
    assert same(win.ece, expected_calibration_error(p_win, y_win))
    assert same(win.mean_p, float(np.average(p_win, weights=w_win)))
    assert same(win.actual_ctr, float(np.average(y_win, weights=w_win)))
    assert same(life.ratio, calibration_ratio(p_all, y_all, w_all))
    assert same(life.log_loss, log_loss(p_all, y_all, w_all))
    assert same(life.ne, normalized_entropy(p_all, y_all, w_all))
    assert same(life.positives, float(np.dot(w_all, y_all)))
    want_z = drift_z(
        float(np.dot(w_all, y_all)),
        float(np.dot(w_all, p_all)),
        float(np.dot(w_all**2, p_all * (1 - p_all))),
    )
    assert math.isclose(life.z, want_z, rel_tol=1e-9, abs_tol=1e-9)
    assert math.isnan(life.auc) and math.isnan(life.ece)


def test_reset_window_keeps_lifetime() -> None:
    cw = CalibrationWindow(size=10)
    cw.update(predictions=[0.2, 0.4, 0.6], labels=[0, 1, 1])
    cw.reset_window()
    assert cw.window().n == 0 and math.isnan(cw.window().ratio) and cw.window().z == 0.0
    assert cw.lifetime().n == 3
    cw.update(predictions=[0.5], labels=[1])
    assert cw.window_arrays()[0].tolist() == [0.5]
    assert cw.lifetime().n == 4


def test_update_rejects_bad_input_without_changing_state() -> None:
    cw = CalibrationWindow(size=10)
    with pytest.raises(ValueError):
        cw.update(predictions=[0.2, 1.5], labels=[0, 1])
    with pytest.raises(ValueError):
        cw.update(predictions=[0.2, math.nan], labels=[0, 1])
    with pytest.raises(ValueError):
        cw.update(predictions=[0.2, 0.3], labels=[0])
    assert cw.lifetime().n == 0 and cw.window().n == 0


def test_update_does_not_mutate_inputs() -> None:
    p = np.array([0.1, 0.9])
    y = np.array([0.0, 1.0])
    cw = CalibrationWindow(size=1)
    cw.update(predictions=p, labels=y)
    p_win, _ = cw.window_arrays()
    p_win[0] = 0.5
    assert p.tolist() == [0.1, 0.9]
    assert cw.window_arrays()[0].tolist() == [0.9]
