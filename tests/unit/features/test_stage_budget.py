"""The feature stage's memory is bounded by bytes (FeatureConfig.max_bytes).

The estimate (approx_bytes: counts times per-entry sizes) is checked against tracemalloc on
a synthetic stream, the bound under a stream of ever new users, items and impression ids,
and the shedding against a restore (state_dict, and the same calls replayed)."""

from __future__ import annotations

import json
import random
import tracemalloc

import pytest

from features.config import FeatureConfig
from features.stage import FeatureStage


def _stream(n: int, seed: int, n_users: int, n_items: int) -> list[tuple]:
    """Impressions (with a click on ~5% of them a few seconds later), in arrival order."""
    rng = random.Random(seed)
    out: list[tuple] = []
    t = 1_000.0
    for j in range(n):
        t += rng.random()
        u, i = f"u{rng.randrange(n_users)}", f"i{rng.randrange(n_items)}"
        attrs = {"item_category": f"c{rng.randrange(30)}", "item_price": 3.5}
        out.append(("imp", f"imp-{j}", t, u, i, rng.randrange(1, 6), attrs))
        if rng.random() < 0.05:
            out.append(("clk", f"imp-{j}", t + rng.random() * 5.0))
    return out


def _run(stage: FeatureStage, events: list[tuple]) -> list[dict | None]:
    out: list[dict | None] = []
    for e in events:
        if e[0] == "imp":
            out.append(stage.impression(*e[1:]))
        else:
            stage.click(e[1], e[2])
    return out


def test_approx_bytes_tracks_tracemalloc() -> None:
    events = _stream(30_000, seed=1, n_users=3_000, n_items=400)
    _run(FeatureStage(), events[:50])  # the compiled kernel loads outside the measurement
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        stage = FeatureStage(FeatureConfig(impression_ttl_s=1e9))
        for e in events:  # no result list: only the stage's own memory is traced
            if e[0] == "imp":
                stage.impression(*e[1:])
            else:
                stage.click(e[1], e[2])
        true_bytes = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    est = stage.approx_bytes()
    assert stage.n_keys()["p"] > 10_000
    # a conservative estimate: never far below the truth, not wildly above it
    assert 0.85 * true_bytes <= est <= 1.5 * true_bytes, (est, true_bytes)


def test_state_stays_under_the_budget_and_sheds_oldest_first() -> None:
    budget = 2 * 2**20
    stage = FeatureStage(FeatureConfig(max_bytes=budget, impression_ttl_s=1e9))
    events = _stream(40_000, seed=2, n_users=20_000, n_items=5_000)
    peak = 0
    for k in range(0, len(events), 1_000):
        _run(stage, events[k : k + 1_000])
        peak = max(peak, stage.approx_bytes())
    assert peak <= budget * 1.01
    st = stage.stats
    assert st["evicted_keys"] > 0 and st["evicted_impressions"] > 0
    # the newest impression ids are still known (a click on one still counts) ...
    last = [e for e in events if e[0] == "imp"][-1]
    assert stage.impression(*last[1:]) is None  # duplicate: its id is remembered
    # ... the oldest were shed: a click on one now is kept as an early click
    first = events[0]
    assert stage.click(first[1], first[2] + 1.0) is True
    assert stage.n_keys()["early_clicks"] == 1


def test_without_pressure_nothing_is_shed_and_features_are_unchanged() -> None:
    events = _stream(5_000, seed=3, n_users=300, n_items=100)
    big = _run(FeatureStage(FeatureConfig(max_bytes=2**30)), events)
    small_stage = FeatureStage(FeatureConfig(max_bytes=64 * 2**20))
    assert _run(small_stage, events) == big
    assert small_stage.stats["evicted_keys"] == 0


@pytest.mark.parametrize("cut", [7_000, 23_000])
def test_shedding_is_deterministic_across_a_restore(cut: int) -> None:
    budget = 2**20
    cfg = FeatureConfig(max_bytes=budget, impression_ttl_s=1e9)
    events = _stream(30_000, seed=4, n_users=10_000, n_items=2_000)
    whole = FeatureStage(cfg)
    expect = _run(whole, events)
    first = FeatureStage(cfg)
    got = _run(first, events[:cut])
    restored = FeatureStage(cfg)
    restored.load_state_dict(json.loads(json.dumps(first.state_dict())))
    got += _run(restored, events[cut:])
    assert got == expect
    assert restored.stats == whole.stats
    assert whole.stats["evicted_keys"] > 0


def test_version_1_state_loads() -> None:
    """A state written before impression entries dropped their keys (version 1)."""
    cfg = FeatureConfig(half_lives_s=(3600.0,))
    ref = FeatureStage(cfg)
    ref.impression("a", 100.0, "u1", "i1", 2, {"item_category": "c7"})
    state = ref.state_dict()
    entry = state["imps"]["a"]
    sep = "\x1f"
    state["version"] = 1
    state["imps"]["a"] = [
        entry[0],
        entry[1],
        entry[2],
        [
            ["user", f"u{sep}u1"],
            ["item", f"i{sep}i1"],
            ["ui", f"p{sep}u1{sep}i1"],
            ["item_pos", f"q{sep}i1{sep}2"],
            ["u_item_category", f"a{sep}u1{sep}item_category{sep}c7"],
        ],
        entry[5],
    ]
    old = FeatureStage(cfg)
    old.load_state_dict(state)
    for st in (ref, old):
        assert st.click("a", 130.0) is True
    q = ("b", 160.0, "u1", "i1", 2, {"item_category": "c7"})
    assert old.impression(*q) == ref.impression(*q)
    assert old.impression(*q) is None
