"""monitoring.offset.LogitOffset on simulated impression/click streams with known truth."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from monitoring.offset import DelayCDF, LogitOffset, OffsetConfig

RATE_S = 50.0  # impressions per second of event time (3,000 a minute)
DELAY_S = 60.0
#: the half-life (and horizon) these tests were sized for; the default is 5,000 (README
#: "Recovery after a drift": longer, so less noisy in the worker)
HL = {"half_life": 1_500, "horizon": 12_000}


def stream(
    offset: LogitOffset,
    n: int,
    p_served: float,
    mult: float,
    rng: np.random.Generator,
    *,
    t0: float = 0.0,
    start: int = 0,
    step: int = 250,
) -> tuple[list[float], float]:
    """Feed ``n`` impressions served at ``p_served`` whose true CTR is ``mult`` times it,
    clicks after Exponential(DELAY_S) delays, in steps of ``step`` impressions; returns the
    served (offset-corrected) mean per step and the end time."""
    ts = t0 + np.arange(n) / RATE_S
    clicked = rng.random(n) < min(p_served * mult, 0.99)
    click_ts = ts + rng.exponential(DELAY_S, size=n)
    ids = [f"i{start + k}" for k in range(n)]
    order = np.argsort(click_ts)
    order = order[clicked[order]]
    ci = 0
    served = []
    pending = getattr(offset, "_test_pending", [])
    for i in range(0, n, step):
        j = min(i + step, n)
        offset.refresh(float(ts[i]))
        served.append(float(offset.transform(np.full(j - i, p_served)).mean()))
        offset.observe_impressions(ids[i:j], ts[i:j], np.full(j - i, p_served))
        t_end = float(ts[j - 1])
        due = [iid for iid, t in pending if t <= t_end]
        pending = [(iid, t) for iid, t in pending if t > t_end]
        while ci < order.size and click_ts[order[ci]] <= t_end:
            due.append(ids[order[ci]])
            ci += 1
        offset.observe_clicks(due)
    pending.extend((ids[k], float(click_ts[k])) for k in order[ci:])
    offset._test_pending = pending  # type: ignore[attr-defined]
    return served, float(ts[-1]) + 1.0 / RATE_S


def test_recovers_a_planted_x1_6_offset() -> None:
    rng = np.random.default_rng(0)
    off = LogitOffset(OffsetConfig(enabled=True, **HL, delay_mean_s=DELAY_S))
    p = 0.04
    before, t = stream(off, 20_000, p, 1.0, rng)
    after, _ = stream(off, 20_000, p, 1.6, rng, t0=t, start=20_000)
    assert abs(np.mean(before[-40:]) / p - 1) < 0.10
    ratios = np.array(after) / (1.6 * p)
    # within ±10% of the truth after at most 6,000 impressions (24 steps of 250) ...
    first = int(np.flatnonzero(np.abs(ratios - 1) <= 0.10)[0])
    assert first * 250 <= 6_000
    # ... and the last 10,000 impressions' mean within ±5%
    assert abs(ratios[-40:].mean() - 1) < 0.05
    assert 0.3 < off.offset < 0.65  # log 1.6 = 0.47


def test_does_not_move_on_a_calibrated_stream() -> None:
    rng = np.random.default_rng(1)
    off = LogitOffset(OffsetConfig(enabled=True, **HL, delay_mean_s=DELAY_S))
    served, _ = stream(off, 40_000, 0.04, 1.0, rng)
    ratios = np.array(served[8:]) / 0.04
    assert abs(ratios.mean() - 1) < 0.03
    assert np.abs(ratios - 1).max() < 0.25


def test_without_delay_model_lags_behind_the_delay() -> None:
    """The plain tracked ratio counts recent impressions as unclicked: at 3,000 a minute
    and a 60 s mean delay it sits far below the truth, the delay model does not."""
    rng = np.random.default_rng(2)
    plain = LogitOffset(OffsetConfig(enabled=True, **HL, delay_mean_s=None))
    served, _ = stream(plain, 20_000, 0.04, 1.0, rng)
    assert np.mean(served[-20:]) / 0.04 < 0.8


def test_state_round_trips() -> None:
    rng = np.random.default_rng(3)
    cfg = OffsetConfig(enabled=True, **HL, delay_mean_s=DELAY_S)
    off = LogitOffset(cfg)
    _, t = stream(off, 15_000, 0.05, 1.5, rng)
    back = LogitOffset.from_state(off.state_dict(), cfg)
    assert back.offset == off.offset
    assert back.refresh(t) == pytest.approx(off.refresh(t), abs=1e-12)
    assert not math.isclose(off.offset, 0.0)


def test_bad_input_is_rejected() -> None:
    with pytest.raises(ValueError, match="half_life"):
        OffsetConfig(half_life=0)
    with pytest.raises(ValueError, match="horizon"):
        OffsetConfig(half_life=100, horizon=10)
    with pytest.raises(ValueError, match="delay_mean_s"):
        OffsetConfig(delay_mean_s=-1.0)
    off = LogitOffset()
    with pytest.raises(ValueError, match="differ in length"):
        off.observe_impressions(["a"], [0.0, 1.0], [0.1])
    with pytest.raises(ValueError, match="within"):
        off.observe_impressions(["a"], [0.0], [1.5])
    assert off.observe_clicks(["unknown"]) == 0
    assert off.refresh(0.0) == 0.0


def test_shrinkage_holds_still_at_very_low_click_counts() -> None:
    """p = 0.01: ~20 expected clicks in a half-life window, log m's noise ~0.2. The
    shrunk offset stays within ±0.2 (about one null sd) and is exactly 0 most of the
    time; the unshrunk ratio on the same stream wanders further."""
    offs = {
        s: LogitOffset(OffsetConfig(enabled=True, **HL, delay_mean_s=DELAY_S, shrink=s))
        for s in (True, False)
    }
    seen: dict[bool, list[float]] = {True: [], False: []}
    for s, off in offs.items():
        rng = np.random.default_rng(4)
        for k in range(8):
            stream(off, 2_000, 0.01, 1.0, rng, t0=k * 2_000 / RATE_S, start=k * 2_000)
            seen[s].append(off.refresh(k * 2_000 / RATE_S + 40.0))
        assert off.null_var >= 0.0
    shrunk, raw = np.abs(seen[True]), np.abs(seen[False])
    assert shrunk.max() <= 0.2
    assert np.mean(shrunk == 0.0) >= 0.5
    assert shrunk.mean() < raw.mean()


def test_shrinkage_still_recovers_a_x1_6_jump_within_8000_impressions() -> None:
    rng = np.random.default_rng(5)
    off = LogitOffset(OffsetConfig(enabled=True, **HL, delay_mean_s=DELAY_S))
    _, t = stream(off, 10_000, 0.02, 1.0, rng)
    after, _ = stream(off, 16_000, 0.02, 1.6, rng, t0=t, start=10_000)
    ratios = np.array(after) / (1.6 * 0.02)
    first = int(np.flatnonzero(np.abs(ratios - 1) <= 0.10)[0])
    assert first * 250 <= 8_000
    assert 0.3 < off.offset < 0.65


def test_a_redelivered_impression_keeps_its_first_score_and_click() -> None:
    off = LogitOffset(OffsetConfig(enabled=True, half_life=10, horizon=20))
    off.observe_impressions(["a", "b"], [1.0, 2.0], [0.1, 0.2])
    assert off.observe_clicks(["a"]) == 1
    off.observe_impressions(["a", "c", "c"], [5.0, 6.0, 6.0], [0.9, 0.3, 0.4])
    assert off.n_seen == 3 and off.remembers("c") and not off.remembers("d")
    state = off.state_dict()
    assert state["ids"] == ["a", "b", "c"]
    assert state["p"] == [0.1, 0.2, 0.3] and state["c"] == [1.0, 0.0, 0.0]


def test_worker_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="refresh_every"):
        OffsetConfig(refresh_every=0)
    with pytest.raises(ValueError, match="min_change"):
        OffsetConfig(min_change=math.nan)


def test_an_impression_older_than_a_full_window_is_not_remembered_again() -> None:
    off = LogitOffset(OffsetConfig(enabled=True, half_life=2, horizon=3))
    off.observe_impressions(["a", "b", "c", "d"], [1.0, 2.0, 3.0, 4.0], [0.1] * 4)
    assert not off.remembers("a")  # evicted by "d"
    off.observe_impressions(["a"], [1.0], [0.1])  # a late record of "a": skipped
    assert not off.remembers("a") and off.n_seen == 4
    assert off.observe_clicks(["a"]) == 0
    off.observe_impressions(["e"], [3.5], [0.1])  # within the window's span: kept
    assert off.remembers("e") and not off.remembers("b")


def test_a_gated_offset_stays_at_zero_on_a_calibrated_stream() -> None:
    rng = np.random.default_rng(1)
    shrunk = LogitOffset(OffsetConfig(enabled=True, **HL, delay_mean_s=DELAY_S))
    gated = LogitOffset(OffsetConfig(enabled=True, **HL, delay_mean_s=DELAY_S, gate_z=3.0))
    a, _ = stream(shrunk, 40_000, 0.04, 1.0, np.random.default_rng(1))
    b, _ = stream(gated, 40_000, 0.04, 1.0, rng)
    # the same clicks: the shrunk estimate serves some of their noise, the gate none
    assert np.abs(np.array(a) / 0.04 - 1).max() > 0.0
    assert np.abs(np.array(b) / 0.04 - 1).max() < 1e-9 and not gated.engaged


def test_a_gated_offset_engages_on_a_x1_6_jump_and_releases_when_the_ranker_catches_up() -> None:
    rng = np.random.default_rng(0)
    off = LogitOffset(OffsetConfig(enabled=True, **HL, delay_mean_s=DELAY_S, gate_z=3.0))
    p = 0.04
    _, t = stream(off, 20_000, p, 1.0, rng)
    after, t = stream(off, 20_000, p, 1.6, rng, t0=t, start=20_000)
    ratios = np.array(after) / (1.6 * p)
    first = int(np.flatnonzero(np.abs(ratios - 1) <= 0.10)[0])
    assert first * 250 <= 6_000 and off.engaged
    assert abs(ratios[-40:].mean() - 1) < 0.05
    # the ranker catches up: scores at the new truth; once the window holds them the
    # pre-offset ratio is back within the noise and the offset lets go
    caught, _ = stream(off, 30_000, 1.6 * p, 1.0, rng, t0=t, start=40_000)
    assert not off.engaged and off.offset == 0.0
    assert abs(np.mean(caught[-20:]) / (1.6 * p) - 1) < 1e-9


def test_gate_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="gate_z"):
        OffsetConfig(gate_z=0.0)
    with pytest.raises(ValueError, match="release_z"):
        OffsetConfig(gate_z=2.0, release_z=3.0)
    off = LogitOffset(OffsetConfig(enabled=True, **HL, gate_z=2.0))
    off.engaged = True
    assert LogitOffset.from_state(off.state_dict(), off.config).engaged


def _truncated_exponential(rng: np.random.Generator, mean: float, cap: float, n: int) -> np.ndarray:
    """Delays ~ Exponential(mean) conditioned on <= cap (every click arrives in the window)."""
    u = rng.random(n)
    return -mean * np.log1p(-u * -np.expm1(-cap / mean))


def test_delay_cdf_learns_the_delays_from_complete_buckets_only() -> None:
    window, mean = 600.0, 120.0
    rng = np.random.default_rng(11)
    imp = rng.uniform(0.0, 3_000.0, 40_000)
    d = _truncated_exponential(rng, mean, window, imp.size)
    arrived = imp + d <= 3_000.0  # what the stream has shown at event time 3,000
    cdf = DelayCDF(window, min_clicks=500)
    cdf.add(imp[arrived], d[arrived])
    f = cdf.cdf(3_000.0)
    assert f is not None and cdf.n_clicks >= 500
    for a in (30.0, 120.0, 300.0):
        truth = -np.expm1(-a / mean) / -np.expm1(-window / mean)
        assert cdf.at(f, [a])[0] == pytest.approx(truth, abs=0.03)
    assert cdf.at(f, [0.0, window, 2 * window]).tolist() == [0.0, 1.0, 1.0]
    # nothing complete yet, or too few clicks: no estimate
    early = DelayCDF(window, min_clicks=500)
    early.add(imp[arrived], d[arrived])
    assert early.cdf(700.0) is None
    few = DelayCDF(window, min_clicks=10**6)
    few.add(imp[arrived], d[arrived])
    assert few.cdf(3_000.0) is None


def _slow_click_stream(
    off: LogitOffset, rng: np.random.Generator, hours: float, mult: float = 1.0
) -> None:
    """A stream served at 0.05 whose true CTR is ``mult`` times that (1: calibrated), at 5
    impressions/s, clicks ~Exponential(300 s) later within a 30-minute window, fed as the
    worker's monitor does: impressions, then each click with its delay at the stream's
    event time."""
    rate, p, window = 5.0, 0.05, 1_800.0
    n = int(hours * 3_600 * rate)
    ts = np.arange(n) / rate
    clicked = rng.random(n) < p * mult
    click_ts = ts + _truncated_exponential(rng, 300.0, window, n)
    order = np.argsort(click_ts)
    order = order[clicked[order]]
    ci, step = 0, 50
    for i in range(0, n, step):
        j = min(i + step, n)
        off.observe_impressions([f"i{k}" for k in range(i, j)], ts[i:j], np.full(j - i, p))
        now = float(ts[j - 1])
        due = []
        while ci < order.size and click_ts[order[ci]] <= now:
            due.append(int(order[ci]))
            ci += 1
        off.observe_clicks([f"i{k}" for k in due])
        off.observe_delays(ts[due], now)
        if i % 500 == 0:
            off.refresh(now)


def test_estimated_delays_unbias_an_offset_whose_delay_prior_is_wrong() -> None:
    """The prior says clicks come after 30 s, they come after ~300 s: with the prior the
    offset takes the clicks not yet in for misses and pulls a calibrated score down; with
    the delays learned from the stream it stays near 0."""
    base = OffsetConfig(enabled=True, **HL, delay_mean_s=30.0, max_delay_s=1_800.0)
    fixed = LogitOffset(dataclasses.replace(base, estimate_delay=False))
    learned = LogitOffset(base)
    _slow_click_stream(fixed, np.random.default_rng(12), hours=3.0)
    _slow_click_stream(learned, np.random.default_rng(12), hours=3.0)
    assert fixed.delay_source == "prior" and learned.delay_source == "estimated"
    assert fixed.offset < -0.3
    assert abs(learned.offset) < 0.1
    # the learned delays survive a snapshot
    back = LogitOffset.from_state(learned.state_dict(), base)
    assert back.refresh(3 * 3_600.0) == pytest.approx(learned.refresh(3 * 3_600.0), abs=1e-12)
    assert back.delay_source == "estimated"


def test_no_delay_estimate_without_a_window_or_a_delay_model() -> None:
    assert LogitOffset(OffsetConfig(enabled=True, **HL, max_delay_s=None)).delays is None
    no_model = OffsetConfig(enabled=True, **HL, delay_mean_s=None, max_delay_s=600.0)
    assert LogitOffset(no_model).delays is None
    with pytest.raises(ValueError, match="min_delay_clicks"):
        OffsetConfig(min_delay_clicks=0)
    with pytest.raises(ValueError, match="window_s"):
        DelayCDF(0.0)


def test_delay_cdf_reaches_back_as_many_windows_as_few_clicks_need() -> None:
    """At a few clicks a minute the newest complete buckets hold too few clicks: the
    estimate sums older complete buckets (up to 24 windows) until it has enough."""
    window = 60.0
    rng = np.random.default_rng(13)
    imp = np.sort(rng.uniform(0.0, 20 * window, 400))  # ~20 clicks per window
    d = _truncated_exponential(rng, 10.0, window, imp.size)
    cdf = DelayCDF(window, min_clicks=200)
    cdf.add(imp, d)
    f = cdf.cdf(21 * window)
    assert f is not None and 200 <= cdf.n_clicks < 260
    assert cdf.at(f, [10.0])[0] == pytest.approx(-np.expm1(-1.0), abs=0.08)


def test_until_the_delays_are_learned_only_closed_windows_count() -> None:
    """Before the delay estimate exists the offset reads only the impressions whose
    window has closed: a calibrated stream stays near 0 and a x1.6 one is found, whatever
    the (wrong) prior says; with a ring shorter than a window there is no offset."""
    cfg = OffsetConfig(enabled=True, delay_mean_s=30.0, max_delay_s=1_800.0,
                       half_life=3_000, horizon=24_000, min_delay_clicks=10**9)  # fmt: skip
    calm, jump = LogitOffset(cfg), LogitOffset(cfg)
    _slow_click_stream(calm, np.random.default_rng(14), hours=3.0)
    _slow_click_stream(jump, np.random.default_rng(15), hours=3.0, mult=1.6)
    assert calm.delay_source == jump.delay_source == "complete"
    assert abs(calm.offset) < 0.15
    assert jump.offset == pytest.approx(math.log(1.6), abs=0.2)
    short = LogitOffset(dataclasses.replace(cfg, horizon=3_000))  # 10 minutes < the window
    _slow_click_stream(short, np.random.default_rng(15), hours=1.0, mult=1.6)
    assert short.delay_source == "complete" and short.offset == 0.0


def test_delay_cdf_state_stays_bounded_under_hostile_times() -> None:
    """Delays that cannot be a click's (negative, or far past the window: a hostile or
    skewed time) are not counted, so the buckets stay near the present and complete ones
    beyond the kept ones are dropped."""
    window = 60.0
    cdf = DelayCDF(window, min_clicks=1)
    rng = np.random.default_rng(16)
    cdf.add(rng.uniform(-1e9, 1e9, 10_000), rng.uniform(-1e9, 1e9, 10_000))
    assert len(cdf._buckets) <= 2  # only the rare pairs that are plausible
    for t in np.arange(0.0, 500 * window, 10.0):  # a long calm stream, a click every 10 s
        cdf.add([t], [5.0])
        cdf.cdf(t + 5.0)
    assert len(cdf._buckets) <= DelayCDF.KEEP_COMPLETE + 2 * DelayCDF.BUCKETS_PER_WINDOW + 2
