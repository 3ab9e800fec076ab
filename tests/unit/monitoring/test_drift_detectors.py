"""Tests of the sequential drift detectors, the DriftDetector protocol and the factory."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from river import drift as river_drift

from monitoring.drift import DETECTOR_NAMES, CalibrationDriftDetector, DriftDetector, make_detector
from monitoring.drift_sequential import (
    RESIDUAL_P_MIN,
    CusumConfig,
    CusumDriftDetector,
    PageHinkleyConfig,
    PageHinkleyDriftDetector,
    RiverDriftDetector,
    _fading_sum,
    standardized_residual,
)


def ctr_predictions(rng: np.random.Generator, n: int) -> np.ndarray:
    """Logit-normal predictions with mean ~4%."""
    return 1.0 / (1.0 + np.exp(-rng.normal(-3.3, 0.5, n)))


def naive_residual(p: float, y: float) -> float:
    q = min(max(p, RESIDUAL_P_MIN), 1.0 - RESIDUAL_P_MIN)
    return (y - q) / math.sqrt(q * (1.0 - q))


def naive_cusum_alarms(
    p: np.ndarray, y: np.ndarray, cfg: CusumConfig
) -> tuple[list[int], float, float]:
    """Per-example loop with the documented alarm rules; returns alarm indices, S+, S-."""
    s_up = s_down = 0.0
    clicks, cooldown, alarms = 0.0, 0, []
    for i, (pi, yi) in enumerate(zip(p.tolist(), y.tolist(), strict=True)):
        r = naive_residual(pi, yi)
        s_up = max(0.0, s_up + r - cfg.k)
        s_down = max(0.0, s_down - r - cfg.k)
        clicks += yi
        cooldown = max(0, cooldown - 1)
        if max(s_up, s_down) > cfg.h and clicks >= cfg.min_positives and cooldown == 0:
            alarms.append(i)
            s_up = s_down = clicks = 0.0
            cooldown = cfg.cooldown
    return alarms, s_up, s_down


def naive_page_hinkley_alarms(p: np.ndarray, y: np.ndarray, cfg: PageHinkleyConfig) -> list[int]:
    n, total, inc, dec = 0, 0.0, 0.0, 0.0
    min_inc, max_dec = math.inf, -math.inf
    clicks, cooldown, alarms = 0.0, 0, []
    for i, (pi, yi) in enumerate(zip(p.tolist(), y.tolist(), strict=True)):
        r = naive_residual(pi, yi)
        n += 1
        total += r
        dev = r - total / n
        inc = cfg.alpha * inc + dev - cfg.delta
        dec = cfg.alpha * dec + dev + cfg.delta
        min_inc, max_dec = min(min_inc, inc), max(max_dec, dec)
        clicks += yi
        cooldown = max(0, cooldown - 1)
        test = max(inc - min_inc, max_dec - dec)
        if test > cfg.threshold and clicks >= cfg.min_positives and cooldown == 0:
            alarms.append(i)
            n, total, inc, dec = 0, 0.0, 0.0, 0.0
            min_inc, max_dec = math.inf, -math.inf
            clicks, cooldown = 0.0, cfg.cooldown
    return alarms


def regime_stream(seed: int, n: int, period: int) -> tuple[np.ndarray, np.ndarray]:
    """Predictions ~4%; the true CTR alternates x1 / x2 every ``period`` examples."""
    rng = np.random.default_rng(seed)
    p = ctr_predictions(rng, n)
    factor = np.where((np.arange(n) // period) % 2 == 1, 2.0, 1.0)
    return p, (rng.random(n) < np.minimum(1.0, p * factor)).astype(float)


def feed_in_batches(
    det: DriftDetector, p: np.ndarray, y: np.ndarray, sizes: list[int]
) -> list[tuple[int, int, bool]]:
    """Feed ``p, y`` in batches of the given sizes (cycled); return (start, end, alarmed)."""
    out, start, i = [], 0, 0
    while start < p.size:
        end = min(p.size, start + sizes[i % len(sizes)])
        det.update_many(p[start:end], y[start:end])
        out.append((start, end, det.drift_detected))
        start, i = end, i + 1
    return out


def alarmed_batches_match(batches: list[tuple[int, int, bool]], alarms: list[int]) -> bool:
    return all(flag == any(s <= a < e for a in alarms) for s, e, flag in batches)


@pytest.mark.parametrize("name", DETECTOR_NAMES)
def test_every_named_detector_satisfies_the_protocol(name: str) -> None:
    det = make_detector(name)
    assert isinstance(det, DriftDetector)
    det.update_many(np.full(10, 0.04), np.zeros(10))
    assert not det.drift_detected and det.n_alarms == 0 and math.isfinite(det.statistic)


def test_make_detector_passes_params_and_rejects_unknown_names() -> None:
    det = make_detector("cusum", k=0.1, h=30.0)
    assert isinstance(det, CusumDriftDetector) and det.config == CusumConfig(k=0.1, h=30.0)
    assert isinstance(make_detector("window_z", window=100), CalibrationDriftDetector)
    ph = make_detector("river_page_hinkley", threshold=10.0, cooldown=0)
    assert isinstance(ph, RiverDriftDetector) and ph.params["threshold"] == 10.0
    with pytest.raises(ValueError, match="unknown detector"):
        make_detector("ddm")
    with pytest.raises(ValueError):
        RiverDriftDetector("kswin")


def test_standardized_residual_has_unit_moments_under_calibration() -> None:
    rng = np.random.default_rng(0)
    p = ctr_predictions(rng, 400_000)
    r = standardized_residual(p, rng.random(p.size) < p)
    assert abs(r.mean()) < 0.01 and abs(r.var() - 1.0) < 0.03
    # The floor bounds one click's influence.
    assert standardized_residual([0.0], [1.0])[0] == pytest.approx(math.sqrt(1 / 1e-3 - 1))


@settings(max_examples=25, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 3_000), min_size=1, max_size=6),
    seed=st.integers(0, 10_000),
    k=st.sampled_from([0.0, 0.05, 0.3]),
    h=st.sampled_from([5.0, 20.0, 60.0]),
    min_pos=st.sampled_from([0, 20]),
    cooldown=st.sampled_from([0, 700]),
)
def test_cusum_batches_match_naive_per_example_loop(
    sizes: list[int], seed: int, k: float, h: float, min_pos: int, cooldown: int
) -> None:
    p, y = regime_stream(seed, 12_000, period=3_000)
    cfg = CusumConfig(k=k, h=h, min_positives=min_pos, cooldown=cooldown)
    det = CusumDriftDetector(cfg)
    alarms, s_up, s_down = naive_cusum_alarms(p, y, cfg)
    batches = feed_in_batches(det, p, y, sizes)
    assert det.n_alarms == len(alarms)
    assert alarmed_batches_match(batches, alarms)
    assert det.s_up == pytest.approx(s_up, abs=1e-6) and det.s_down == pytest.approx(
        s_down, abs=1e-6
    )


@settings(max_examples=20, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 3_000), min_size=1, max_size=6),
    seed=st.integers(0, 10_000),
    alpha=st.sampled_from([1.0, 0.999, 0.9]),
    threshold=st.sampled_from([10.0, 40.0]),
    cooldown=st.sampled_from([0, 700]),
)
def test_page_hinkley_batches_match_naive_per_example_loop(
    sizes: list[int], seed: int, alpha: float, threshold: float, cooldown: int
) -> None:
    p, y = regime_stream(seed, 12_000, period=3_000)
    cfg = PageHinkleyConfig(
        delta=0.05, threshold=threshold, alpha=alpha, min_positives=10, cooldown=cooldown
    )
    det = PageHinkleyDriftDetector(cfg)
    alarms = naive_page_hinkley_alarms(p, y, cfg)
    batches = feed_in_batches(det, p, y, sizes)
    assert det.n_alarms == len(alarms)
    assert alarmed_batches_match(batches, alarms)


@pytest.mark.parametrize("alpha", [1.0, 0.99999, 0.999, 0.5])
def test_fading_sum_matches_recursion(alpha: float) -> None:
    u = np.random.default_rng(1).standard_normal(5_000)
    want, y = np.empty_like(u), 3.0
    for i, ui in enumerate(u):
        y = alpha * y + ui
        want[i] = y
    np.testing.assert_allclose(_fading_sum(u, alpha, 3.0), want, rtol=1e-9, atol=1e-9)


def test_page_hinkley_alarms_where_river_page_hinkley_does() -> None:
    p, y = regime_stream(3, 40_000, period=8_000)
    cfg = PageHinkleyConfig(delta=0.05, threshold=25.0, alpha=0.9999, min_positives=0, cooldown=0)
    river_ph = river_drift.PageHinkley(min_instances=1, delta=0.05, threshold=25.0, alpha=0.9999)
    river_alarms = []
    for i, r in enumerate(standardized_residual(p, y).tolist()):
        river_ph.update(r)
        if river_ph.drift_detected:
            river_alarms.append(i)
    assert len(river_alarms) >= 3
    batches = feed_in_batches(PageHinkleyDriftDetector(cfg), p, y, [256])
    assert alarmed_batches_match(batches, river_alarms)


@pytest.mark.parametrize("name", ["cusum", "page_hinkley", "adwin", "river_page_hinkley"])
def test_calibrated_stream_of_300k_raises_no_alarm(name: str) -> None:
    rng = np.random.default_rng(2024)
    det = make_detector(name)
    for _ in range(300):
        p = ctr_predictions(rng, 1_000)
        det.update_many(p, rng.random(1_000) < p)
    assert det.n_alarms == 0


@pytest.mark.parametrize("name", ["cusum", "page_hinkley", "adwin", "river_page_hinkley"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ctr_jump_from_4_to_6_4_percent_detected_quickly(name: str, seed: int) -> None:
    rng = np.random.default_rng(seed)
    det = make_detector(name)
    preds = np.full(1_024, 0.04)
    for _ in range(30):
        det.update_many(preds, rng.random(1_024) < 0.04)
    assert det.n_alarms == 0
    limit = 20 * 1_024 if name == "adwin" else 6 * 1_024
    for _ in range(limit // 1_024):
        det.update_many(preds, rng.random(1_024) < 0.064)
        if det.drift_detected:
            break
    assert det.drift_detected and det.n_alarms == 1


@pytest.mark.parametrize("name", ["cusum", "page_hinkley"])
def test_over_prediction_alarms_with_negative_statistic(name: str) -> None:
    rng = np.random.default_rng(5)
    det = make_detector(name, min_positives=0)
    for _ in range(20):
        det.update_many(np.full(1_000, 0.04), rng.random(1_000) < 0.04)
    for _ in range(40):
        det.update_many(np.full(1_000, 0.04), rng.random(1_000) < 0.02)
        if det.drift_detected:
            break
    assert isinstance(det, CusumDriftDetector | PageHinkleyDriftDetector)
    assert det.drift_detected and det.last_alarm_statistic < -120


@pytest.mark.parametrize("name", ["cusum", "page_hinkley", "adwin", "river_page_hinkley"])
def test_no_alarm_before_min_positives_clicks(name: str) -> None:
    # 0.1% predicted; after 5k examples 1% actual: a huge change, but ~10 clicks per 1k.
    def feed(det: DriftDetector) -> None:
        rng = np.random.default_rng(3)
        for i in range(20):
            det.update_many(np.full(1_000, 0.001), rng.random(1_000) < (0.001 if i < 5 else 0.01))

    strict = make_detector(name, min_positives=1_000)
    feed(strict)
    assert strict.n_alarms == 0
    loose = make_detector(name, min_positives=5)
    feed(loose)
    assert loose.n_alarms >= 1


@pytest.mark.parametrize("name", ["cusum", "page_hinkley", "adwin", "river_page_hinkley"])
def test_alarms_are_separated_by_at_least_the_cooldown(name: str) -> None:
    # The CTR flips between 4% and 12% every 4,000 examples: more often than the cooldown.
    rng = np.random.default_rng(9)
    det = make_detector(name, cooldown=10_000)
    alarm_at = []
    for t in range(100, 100_001, 100):
        ctr = 0.12 if (t // 4_000) % 2 else 0.04
        det.update_many(np.full(100, 0.04), rng.random(100) < ctr)
        if det.drift_detected:
            alarm_at.append(t)
    assert len(alarm_at) >= 2 and det.n_alarms == len(alarm_at)
    assert all(b - a >= 10_000 for a, b in zip(alarm_at, alarm_at[1:], strict=False))


@pytest.mark.parametrize("name", ["cusum", "page_hinkley", "adwin", "river_page_hinkley"])
def test_reset_clears_flag_keeps_alarm_count_and_starts_cooldown(name: str) -> None:
    rng = np.random.default_rng(1)
    det = make_detector(name, cooldown=3_000)
    for fed in range(500, 40_001, 500):
        ctr = 0.04 if fed <= 10_000 else 0.12
        det.update_many(np.full(500, 0.04), rng.random(500) < ctr)
        if det.drift_detected:
            break
    assert det.drift_detected and det.n_alarms == 1
    det.reset()
    assert not det.drift_detected and det.n_alarms == 1
    # A new change after the reset cannot alarm within the 3,000 cooldown. River's change
    # detectors would spend their detection inside the cooldown and never re-fire (they
    # track changes, not levels), so their change comes as the cooldown ends.
    change = 3_000 if name in ("adwin", "river_page_hinkley") else 1_000
    for fed in range(500, 40_001, 500):
        ctr = 0.04 if fed <= change else 0.12
        det.update_many(np.full(500, 0.04), rng.random(500) < ctr)
        if det.drift_detected:
            break
    assert det.drift_detected and fed >= 3_000 and det.n_alarms == 2


def test_cusum_reset_zeroes_statistic() -> None:
    det = CusumDriftDetector(CusumConfig(h=1e9))
    det.update_many(np.full(1_000, 0.04), np.ones(1_000))
    assert det.statistic > 0 and det.s_up > 0
    det.reset()
    assert det.statistic == 0.0 and det.s_up == det.s_down == 0.0 and det.in_cooldown


def test_drift_detected_lasts_only_until_next_update() -> None:
    det = CusumDriftDetector(CusumConfig(min_positives=1, cooldown=5_000))
    det.update_many(np.full(1_000, 0.01), np.ones(1_000))
    assert det.drift_detected
    det.update_many(np.full(10, 0.01), np.ones(10))
    assert not det.drift_detected


def test_invalid_input_and_settings_raise() -> None:
    with pytest.raises(ValueError):
        CusumDriftDetector().update_many(np.zeros(3), np.zeros(2))
    with pytest.raises(ValueError):
        PageHinkleyDriftDetector().update_many([np.nan], [0.0])
    with pytest.raises(ValueError):
        CusumDriftDetector(CusumConfig(h=0.0))
    with pytest.raises(ValueError):
        PageHinkleyDriftDetector(PageHinkleyConfig(alpha=1.5))


def test_empty_batch_is_a_no_op() -> None:
    for name in DETECTOR_NAMES:
        det = make_detector(name)
        det.update_many(np.array([]), np.array([]))
        assert not det.drift_detected and det.n_alarms == 0
