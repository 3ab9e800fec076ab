"""The wander-aware drift test: quiet on a learning model's own wander, alarms on drift."""

from __future__ import annotations

import math

import numpy as np
import pytest

from monitoring.drift import CalibrationDriftDetector, DriftConfig
from monitoring.drift_wander import WanderConfig, WanderDriftDetector


def wandering_predictions(rng: np.random.Generator, n: int, sd: float, block: int) -> np.ndarray:
    """Predictions of a model whose calibration wanders: ``0.04 * exp(w)``, ``w`` an AR(1)
    with stationary sd ``sd`` that moves once per ``block`` examples (slowly)."""
    steps = n // block + 1
    w = np.zeros(steps)
    rho = 0.95
    for i in range(1, steps):
        w[i] = rho * w[i - 1] + math.sqrt(1 - rho**2) * sd * rng.standard_normal()
    return np.clip(0.04 * np.exp(np.repeat(w, block)[:n]), 1e-4, 0.5)


def feed(det: object, p: np.ndarray, y: np.ndarray, batch: int) -> list[int]:
    """Feed in batches; the example index at the end of each batch that alarmed."""
    alarms = []
    for s in range(0, p.size, batch):
        det.update_many(p[s : s + batch], y[s : s + batch])  # type: ignore[attr-defined]
        if det.drift_detected:  # type: ignore[attr-defined]
            alarms.append(min(s + batch, p.size))
    return alarms


def test_a_learning_models_wander_alarms_the_click_noise_test_but_not_this_one() -> None:
    rng = np.random.default_rng(0)
    n = 1_500_000  # ~30,000 impressions a minute for 50 minutes
    p = wandering_predictions(rng, n, sd=0.15, block=2_000)
    y = (rng.random(n) < 0.04).astype(np.float64)  # the world does not change
    worker_default = CalibrationDriftDetector(
        DriftConfig(threshold_z=4.0, window=2_500, cooldown=2_500)
    )
    wander = WanderDriftDetector()
    z_alarms = feed(worker_default, p, y, 1024)
    w_alarms = feed(wander, p, y, 1024)
    assert len(z_alarms) >= 5  # the click-noise test fires on the wander
    assert len(w_alarms) <= 1  # the wander-aware one stays (almost) quiet
    assert 0.05 < wander.wander < 0.4  # and it measured the wander, not the floor


def test_a_real_jump_is_found_through_the_wander() -> None:
    rng = np.random.default_rng(1)
    n0, n1 = 400_000, 60_000
    p = wandering_predictions(rng, n0 + n1, sd=0.05, block=2_000)
    true = np.full(n0 + n1, 0.04)
    true[n0:] = 0.04 * 2.0  # the CTR doubles; the model keeps predicting ~4%
    y = (rng.random(true.size) < true).astype(np.float64)
    det = WanderDriftDetector()
    alarms = feed(det, p, y, 1024)
    assert [a for a in alarms if a <= n0] == []
    after = [a - n0 for a in alarms if a > n0]
    assert after and after[0] <= 10_000  # ~4 blocks of 25 expected clicks at 4%
    assert det.statistic > 0  # more clicks than predicted


def test_blocks_do_not_depend_on_how_the_stream_is_batched() -> None:
    rng = np.random.default_rng(2)
    p = rng.uniform(0.01, 0.1, 60_000)
    y = (rng.random(p.size) < p * 1.3).astype(np.float64)
    a, b = WanderDriftDetector(), WanderDriftDetector()
    feed(a, p, y, 60_000)
    feed(b, p, y, 7)
    assert a.statistic == pytest.approx(b.statistic, rel=1e-9)
    assert a.wander == pytest.approx(b.wander, rel=1e-9)


def test_very_low_ctr_blocks_end_at_max_block_and_nothing_fires_before_the_reference() -> None:
    cfg = WanderConfig(block_clicks=25, max_block=1_000, min_ref_blocks=12, ref_blocks=12)
    det = WanderDriftDetector(cfg)
    rng = np.random.default_rng(5)
    p = np.full(15_000, 0.001)  # 1 expected click per 1,000: blocks close on max_block
    det.update_many(p, (rng.random(p.size) < p).astype(np.float64))
    assert det.n_alarms == 0  # 15 blocks: 11 reference blocks behind the 4-block window
    det.update_many(p[:2_000], np.ones(2_000))  # absurdly many clicks: blocks 16 and 17
    assert det.n_alarms == 1 and det.drift_detected and det.statistic > 100


def test_reset_forgets_blocks_and_starts_the_cooldown() -> None:
    rng = np.random.default_rng(4)
    det = WanderDriftDetector(WanderConfig(cooldown=5_000))
    p = np.full(200_000, 0.04)
    det.update_many(p, (rng.random(p.size) < 0.04).astype(np.float64))
    assert math.isfinite(det.wander)
    det.reset()
    assert det.statistic == 0.0 and det.in_cooldown and not det.drift_detected
    det.update_many(p[:1_000], np.ones(1_000))  # fewer than min_ref_blocks blocks now
    assert det.n_alarms == 0


@pytest.mark.parametrize(
    "bad",
    [
        {"threshold_z": 0.0},
        {"block_clicks": -1.0},
        {"window_blocks": 0},
        {"min_ref_blocks": 80, "ref_blocks": 60},
        {"cooldown": -1},
    ],
)
def test_bad_settings_are_refused(bad: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        WanderConfig(**bad)  # type: ignore[arg-type]
