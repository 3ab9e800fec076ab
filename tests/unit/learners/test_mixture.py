"""The fallback mixture (learners.mixture): online model selection between the ranker and
its running base rate, alone and inside the ranker."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from learners.mixture import FallbackMixture, _log_loss
from learners.ranker import RankerConfig, TorchRanker


def _stream(n: int, seed: int, p_true: np.ndarray | float) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.random(n) < p_true).astype(float)


def _prequential(m: FallbackMixture, p: np.ndarray, y: np.ndarray, batch: int) -> float:
    """Summed log loss of what the mixture served, each batch served before it learns."""
    total = 0.0
    for s in range(0, y.size, batch):
        served = m.serve(p[s : s + batch])
        total += _log_loss(served, y[s : s + batch], np.ones(served.size))
        assert m.update(p[s : s + batch], y[s : s + batch])
    return total


def test_a_useless_ranker_is_served_as_the_base_rate() -> None:
    """Pure noise at 0.4% CTR, a ranker whose scores wander around 3%: the mixture's
    prequential loss is within ln 2 (+ the prior's cost) of the constant's, and far below
    the ranker's."""
    n = 30_000
    rng = np.random.default_rng(1)
    y = _stream(n, 0, 0.004)
    p = np.clip(0.03 * np.exp(rng.normal(0, 0.8, n)), 1e-4, 0.5)
    m = FallbackMixture(prior=0.03, strength=100.0, cap=10.0)
    mixed = _prequential(m, p, y, 500)
    ranker = _log_loss(p, y, np.ones(n))
    oracle_constant = _log_loss(np.full(n, y.mean()), y, np.ones(n))
    assert m.ranker_weight < 1e-3
    assert mixed < 0.5 * ranker
    assert mixed <= oracle_constant + math.log(2) + 25.0  # 25 nats: learning the rate


def test_a_good_ranker_is_served_as_is() -> None:
    """The ranker knows the true per-example rate: the mixture ends on it and serves within
    e^-cap of its scores."""
    n = 20_000
    rng = np.random.default_rng(2)
    p = np.clip(rng.beta(0.5, 8.0, n), 1e-4, 0.99)
    y = _stream(n, 3, p)
    m = FallbackMixture(prior=0.03, strength=100.0, cap=10.0)
    _prequential(m, p, y, 500)
    assert m.ranker_weight > 1 - 1e-4
    served = m.serve(p[:100])
    np.testing.assert_allclose(served, p[:100], atol=1e-4)


def test_monotone_and_switches_back() -> None:
    """The served score keeps the ranker's order; after the ranker becomes useful the
    clipped advantage lets the mixture move back to it within about cap nats."""
    m = FallbackMixture(prior=0.05, strength=10.0, cap=5.0)
    y0 = _stream(5_000, 4, 0.05)
    m.update(np.full(5_000, 0.5), y0)  # a terrible ranker first
    assert m.ranker_weight < 0.01
    p = np.linspace(0.001, 0.9, 50)
    assert np.all(np.diff(m.serve(p)) > 0)
    rng = np.random.default_rng(5)
    good = np.clip(rng.beta(0.5, 5.0, 20_000), 1e-3, 0.99)
    y1 = _stream(20_000, 6, good)
    for s in range(0, 20_000, 1_000):
        m.update(good[s : s + 1_000], y1[s : s + 1_000])
    assert m.ranker_weight > 0.99


def test_fake_negative_space_round_trips() -> None:
    m = FallbackMixture(prior=0.05, strength=10.0, cap=5.0, fake_negatives=True)
    p = np.array([0.0, 0.01, 0.2, 0.9])
    np.testing.assert_allclose(m.to_click(m.to_label(p)), p, atol=1e-12)


def test_bad_inputs_change_nothing_and_bad_settings_raise() -> None:
    m = FallbackMixture(prior=0.05, strength=10.0, cap=5.0)
    before = m.state()
    assert not m.update(np.array([np.nan]), np.array([1.0]))
    assert not m.update(np.array([0.1]), np.array([1.0]), np.array([-1.0]))
    assert not m.update(np.array([0.1]), np.array([1.0]), np.array([0.0]))
    assert m.state() == before
    for kwargs in ({"prior": 0.0}, {"strength": 0.0}, {"cap": math.inf}):
        args = {"prior": 0.05, "strength": 10.0, "cap": 5.0, **kwargs}
        with pytest.raises(ValueError):
            FallbackMixture(**args)


def test_state_round_trip_and_label_space_mapping() -> None:
    m = FallbackMixture(prior=0.05, strength=10.0, cap=5.0)
    m.update(np.full(1_000, 0.02), _stream(1_000, 7, 0.1))
    m2 = FallbackMixture(prior=0.05, strength=10.0, cap=5.0)
    m2.load_state(m.state())
    assert m2.state() == m.state()
    # a final-label state continued on fake negatives keeps the same click probability
    f = FallbackMixture(prior=0.05, strength=10.0, cap=5.0, fake_negatives=True)
    f.load_state(m.state())
    assert f.to_click(np.array([f.base_rate]))[0] == pytest.approx(m.base_rate)


def _rows(n: int, seed: int) -> tuple[list[dict[str, object]], np.ndarray]:
    rng = np.random.default_rng(seed)
    rows = [
        {"user_id": f"u{rng.integers(50)}", "item_id": f"i{rng.integers(30)}"} for _ in range(n)
    ]
    return rows, _stream(n, seed + 1, 0.004)


def test_ranker_on_a_noise_log_is_not_worse_than_the_constant() -> None:
    """The default ranker with the mixture on against it off, prequentially,
    on a log of pure noise at 0.4% CTR: the mixture's NE is at most the constant's + 2%."""
    rows, y = _rows(6_000, 11)
    cfg = RankerConfig()
    losses = {}
    for fb in (True, False):
        r = TorchRanker(dataclasses.replace(cfg, fallback_mixture=fb), seed=0, online=False)
        total = 0.0
        for s in range(0, len(rows), 200):
            p = r.predict_proba_many(rows[s : s + 200])
            total += _log_loss(p, y[s : s + 200], np.ones(p.size))
            r.learn_many(rows[s : s + 200], y[s : s + 200])
        losses[fb] = total
    base = y.mean()
    entropy = -(base * math.log(base) + (1 - base) * math.log(1 - base)) * y.size
    assert losses[True] / entropy <= 1.2
    assert losses[True] <= losses[False] + 1.0


def test_ranker_checkpoint_keeps_the_mixture_and_old_ones_settle_on_the_ranker() -> None:
    rows, y = _rows(2_000, 12)
    r = TorchRanker(RankerConfig(fallback_mixture=True), seed=0, online=False)
    r.learn_many(rows, y)
    state = r.state()
    r2 = TorchRanker.from_state(state)
    np.testing.assert_array_equal(r2.predict_proba_many(rows[:50]), r.predict_proba_many(rows[:50]))
    old = dict(state)
    old.pop("mixture")
    r3 = TorchRanker.from_state(old)
    assert r3.mixture is not None and r3.mixture.ranker_weight > 1 - 1e-4


def test_a_base_rate_decayed_by_clicks_follows_a_falling_click_rate() -> None:
    """The click rate falls from 25% to 10% after 3,000 examples (the MovieLens dev log's
    start): 10,000 examples later the cumulative base rate is still ~13%, one with a
    half-life of 200 clicks is within 1.5% of 10%."""
    rng = np.random.default_rng(0)
    rate = np.r_[np.full(3_000, 0.25), np.full(10_000, 0.10)]
    y = (rng.random(len(rate)) < rate).astype(float)
    flat = np.full(len(y), 0.5)
    kept = FallbackMixture(prior=0.03, strength=30.0, cap=10.0)
    decayed = FallbackMixture(prior=0.03, strength=30.0, cap=10.0, half_life_clicks=200.0)
    for s in range(0, len(y), 500):
        kept.update(flat[s : s + 500], y[s : s + 500])
        decayed.update(flat[s : s + 500], y[s : s + 500])
    assert kept.base_rate > 0.125
    assert abs(decayed.base_rate - 0.10) < 0.015
    with pytest.raises(ValueError, match="half_life_clicks"):
        FallbackMixture(prior=0.03, strength=30.0, cap=10.0, half_life_clicks=0.0)
