"""The demo judges one row per impression with its final label: with fresh labels a
clicked impression is scored twice (a provisional negative, then its positive), and the
summary must equal that of the same impressions labelled once at window close."""

from __future__ import annotations

import numpy as np

from stream.demo import ScoredArrays, summarize


def test_fresh_label_records_summarise_like_one_final_label_per_impression() -> None:
    rng = np.random.default_rng(0)
    n = 2_000
    ts = np.sort(rng.uniform(0, 1_000, n))
    p = rng.uniform(0.01, 0.2, n)
    y = (rng.random(n) < p).astype(float)
    ids = [f"i{k}" for k in range(n)]
    once = ScoredArrays(ts, y, p, p.copy(), p.copy(), ids)
    # fresh labels: every impression first as a negative, clicked ones again (later, with
    # a score the model gave after learning the provisional negative)
    clicked = np.flatnonzero(y == 1)
    fresh = ScoredArrays(
        np.concatenate([ts, ts[clicked]]),
        np.concatenate([np.zeros(n), np.ones(len(clicked))]),
        np.concatenate([p, p[clicked] * 0.5]),
        np.concatenate([p, p[clicked] * 0.5]),
        np.concatenate([p, p[clicked]]),
        ids + [ids[k] for k in clicked],
    )
    want = summarize(once, drift_ts=500.0)
    naive = summarize(fresh, drift_ts=500.0)
    got = summarize(fresh.final(), drift_ts=500.0)
    assert got == want
    assert naive["examples"] == n + len(clicked) and naive["auc"] != want["auc"]
    assert fresh.final().ids == ids
