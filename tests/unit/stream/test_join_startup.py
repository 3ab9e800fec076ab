"""Start-up compensation of the fake-negative stream (``JoinConfig.startup_compensation``):
a fresh joiner never sees the clicks of the impressions before its start, so its first
click delays carry every negative but only some of the positives."""

from __future__ import annotations

import math

import numpy as np
import pytest

from stream.join import JoinConfig, OnlineJoiner
from tests.unit.stream.join_helpers import T0, click, imp

WINDOW = 600.0


def fresh(on: bool, prior_s: float = 60.0) -> OnlineJoiner:
    cfg = JoinConfig(window_s=WINDOW, lateness_s=0.0, delayed_feedback="fake_negative",
                     align_fake_negatives=False, idle_timeout_s=None,
                     startup_compensation=on, startup_delay_prior_s=prior_s)  # fmt: skip
    return OnlineJoiner(cfg)


def stream_balance(j: OnlineJoiner, p: float, delay_mean_s: float, until_s: float) -> float:
    """Positives / summed fake-negative weight emitted in the first ``until_s`` seconds of
    a stream at 50 impressions a second, click probability ``p``, delays ~Exp(mean)."""
    rng = np.random.default_rng(3)
    ts = np.arange(0.0, until_s, 0.02)
    delay = rng.exponential(delay_mean_s, ts.size)
    clicked = rng.random(ts.size) < p
    events = [(t, 0, f"i{k}") for k, t in enumerate(ts)]
    events += [
        (t + d, 1, f"i{k}") for k, (t, d, c) in enumerate(zip(ts, delay, clicked, strict=True)) if c
    ]
    pos = neg = 0.0
    for t, kind, iid in sorted(events):
        if t >= until_s:
            break
        out = j.on_impression(imp(iid, t)) if kind == 0 else j.on_click(click(iid, t))
        out += j.on_watermark(T0 + t, source="clicks")
        pos += sum(1 for e in out if e.label == 1)
        neg += sum(e.weight for e in out if e.kind == "fake_negative")
    return pos / neg


@pytest.mark.parametrize("prior_s", [27.0, 60.0])
def test_compensation_keeps_the_first_minutes_balanced_where_plain_fake_negatives_do_not(
    prior_s: float,
) -> None:
    # FNW is unbiased when positives / negatives = p; the true delay is 40 s, the prior off
    # by a factor 1.5 either way (the fit to delays truncated at a few means pulls it
    # towards the truth only slowly: 0.96 and 1.11 here)
    p = 0.2
    plain = stream_balance(fresh(False), p, 40.0, 120.0) / p
    comp = stream_balance(fresh(True, prior_s), p, 40.0, 120.0) / p
    assert plain < 0.8  # a third of the delays' mass is still missing after 3 means
    assert abs(comp - 1.0) < 0.12, comp


def test_the_delay_fit_corrects_for_truncation() -> None:
    j = fresh(True, prior_s=200.0)
    j._start_ts = T0
    rng = np.random.default_rng(0)
    ts = np.sort(rng.uniform(0.0, 300.0, 20_000))
    d = rng.exponential(60.0, ts.size)
    seen = ts + d <= 300.0  # clicks seen by event time 300: every delay truncated at its age
    j._delays = [(T0 + t, x) for t, x in zip(ts[seen], d[seen], strict=True)]
    j.max_ts["clicks"] = T0 + 300.0
    assert float(d[seen].mean()) < 50.0  # the naive mean is biased low
    assert j._fit_delay_mean() == pytest.approx(60.0, rel=0.1)


def test_weights_start_near_zero_and_reach_one_after_a_window() -> None:
    j = fresh(True, prior_s=60.0)
    w0 = j.on_impression(imp("a", 0.0))[0].weight
    w1 = j.on_impression(imp("b", 60.0))[0].weight
    w2 = j.on_impression(imp("c", WINDOW))[0].weight
    assert w0 == 0.0 and w1 == pytest.approx(1 - math.exp(-1), rel=1e-6) and w2 == 1.0


def test_off_by_default_and_after_a_restore() -> None:
    assert not JoinConfig().startup_compensation
    plain = fresh(False)
    assert plain.on_impression(imp("a", 0.0))[0].weight == 1.0
    j = fresh(True)
    j.restore([], [], {"impressions": T0, "clicks": T0})
    assert j.on_impression(imp("a", 1.0))[0].weight == 1.0  # in-flight clicks were restored
