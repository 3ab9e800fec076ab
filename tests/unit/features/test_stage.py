"""The feature stage against an independent, naive point-in-time recomputation.

``naive_features`` below is written separately from ``features.stage``: for each impression
it scans the whole log and keeps what was visible when the impression arrived (events that
arrived before it, impressions with ``ts`` < t, clicks with ``click_ts`` < t), then sums the
decays directly. No aggregation, no buffers, no out-of-order tricks.
"""

from __future__ import annotations

import json
import math
import random
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from features.config import ClickEvent, FeatureConfig, ImpressionEvent
from features.replay import attach_log
from features.stage import FeatureStage

EXACT = FeatureConfig(
    half_lives_s=(60.0, 3600.0),
    seq_len=3,
    seq_keep=10_000,
    lateness_s=1e9,
    max_buffer=1_000_000,
    impression_ttl_s=1e9,
    ttl_s=1e9,
)


def naive_features(events: list[Any], cfg: FeatureConfig) -> dict[str, dict[str, object]]:
    """impression_id -> features, by brute force (see the module docstring)."""
    first_imp: dict[str, int] = {}
    for k, e in enumerate(events):
        if isinstance(e, ImpressionEvent) and e.impression_id not in first_imp:
            first_imp[e.impression_id] = k
    # the winning click of each impression: the first to arrive; it takes effect at its
    # arrival, or at its impression's arrival when it came first; orphans never do
    won: dict[str, tuple[int, float]] = {}
    for k, e in enumerate(events):
        if isinstance(e, ClickEvent) and e.impression_id not in won:
            won[e.impression_id] = (k, e.ts)
    clicks = []  # (effective index, click_ts, impression)
    for iid, (k, cts) in won.items():
        if iid in first_imp:
            clicks.append((max(k, first_imp[iid]), cts, events[first_imp[iid]]))

    def keys_of(imp: ImpressionEvent) -> dict[str, tuple]:
        out: dict[str, tuple] = {"user": ("u", imp.user_id), "item": ("i", imp.item_id)}
        out["ui"] = ("p", imp.user_id, imp.item_id)
        if imp.position is not None:
            out["item_pos"] = ("q", imp.item_id, imp.position)
        for name, v in imp.features.items():
            if name.startswith("item_") and isinstance(v, str):
                out["u_" + name] = ("a", imp.user_id, name, v)
        return out

    labels = {60.0: "60s", 3600.0: "1h"}
    result: dict[str, dict[str, object]] = {}
    for iid, k in first_imp.items():
        me = events[k]
        t = me.ts
        vis_imps = [events[j] for j in first_imp.values() if j < k and events[j].ts < t]
        vis_clicks = [(eff, cts, imp) for eff, cts, imp in clicks if eff < k and cts < t]
        f: dict[str, object] = {}
        if cfg.counters:
            for ent, key in keys_of(me).items():
                ti = [x.ts for x in vis_imps if keys_of(x).get(ent) == key]
                tc = [cts for _, cts, x in vis_clicks if keys_of(x).get(ent) == key]
                for h in cfg.half_lives_s:
                    ci = sum(0.5 ** ((t - s) / h) for s in ti)
                    cc = sum(0.5 ** ((t - s) / h) for s in tc)
                    lab = labels[h]
                    f[f"hist_{ent}_imp_{lab}"] = math.log1p(ci)
                    f[f"hist_{ent}_clk_{lab}"] = math.log1p(cc)
                    f[f"hist_{ent}_ctr_{lab}"] = (cc + cfg.ctr_prior * cfg.ctr_strength) / (
                        ci + cfg.ctr_strength
                    )
                if ent == "user":
                    if ti:
                        f["hist_user_since_imp"] = math.log1p(t - max(ti))
                    if tc:
                        f["hist_user_since_clk"] = math.log1p(t - max(tc))
                if ent == "ui":
                    f["hist_ui_n"] = math.log1p(len(ti))
                    if ti:
                        f["hist_ui_since_imp"] = math.log1p(t - max(ti))
        if cfg.sequence:
            mine = sorted(
                ((cts, eff, x.item_id) for eff, cts, x in vis_clicks if x.user_id == me.user_id),
                reverse=True,
            )[: cfg.seq_len]
            if mine:
                f["hist_seq"] = [m[2] for m in mine]
                f["hist_seq_age"] = [t - m[0] for m in mine]
        result[iid] = f
    return result


def stage_features(events: list[Any], cfg: FeatureConfig) -> dict[str, dict[str, object]]:
    stage = FeatureStage(cfg)
    out = {}
    for e, f in zip(events, stage.process(events), strict=True):
        if f is not None:
            out[e.impression_id] = f
    return out


def assert_same(a: dict[str, dict[str, object]], b: dict[str, dict[str, object]]) -> None:
    assert a.keys() == b.keys()
    for iid in a:
        fa, fb = a[iid], b[iid]
        assert fa.keys() == fb.keys(), (iid, sorted(set(fa) ^ set(fb)))
        for name, va in fa.items():
            vb = fb[name]
            if name == "hist_seq":
                assert va == vb, (iid, name, va, vb)
            elif name == "hist_seq_age":
                assert len(va) == len(vb) and all(  # type: ignore[arg-type]
                    math.isclose(x, y, rel_tol=1e-9, abs_tol=1e-9)
                    for x, y in zip(va, vb, strict=True)  # type: ignore[call-overload]
                ), (iid, name, va, vb)
            else:
                assert math.isclose(va, vb, rel_tol=1e-7, abs_tol=1e-7), (iid, name, va, vb)  # type: ignore[arg-type]


@st.composite
def logs(draw: st.DrawFn, span: int = 300) -> list[Any]:
    """A hostile log: impressions over few users/items (so keys repeat), clicks with
    delays, a click before its impression, duplicates of both, orphan clicks, and an
    arrival order jittered away from event time (equal timestamps included)."""
    n = draw(st.integers(1, 40))
    events: list[tuple[float, Any]] = []
    for k in range(n):
        ts = 1_000.0 + draw(st.integers(0, span)) * 1.0
        imp = ImpressionEvent(
            f"m{k}",
            ts,
            f"u{draw(st.integers(0, 2))}",
            f"i{draw(st.integers(0, 3))}",
            draw(st.one_of(st.none(), st.integers(0, 2))),
            {"item_cat": f"c{draw(st.integers(0, 1))}", "item_score": 1.5, "dev": "x"},
        )
        arrive = ts + draw(st.integers(-60, 60))
        events.append((arrive, imp))
        if draw(st.booleans()):
            events.append((arrive + draw(st.integers(-5, 30)), imp))  # duplicate
        if draw(st.integers(0, 2)) == 0:
            cts = ts + draw(st.integers(0, 120))
            c_arrive = cts + draw(st.integers(-90, 60))  # may come before its impression
            events.append((c_arrive, ClickEvent(imp.impression_id, cts, imp.user_id)))
            if draw(st.booleans()):
                events.append(
                    (c_arrive + draw(st.integers(0, 9)), ClickEvent(imp.impression_id, cts + 1))
                )
    for j in range(draw(st.integers(0, 3))):
        events.append((1_000.0 + draw(st.integers(0, 400)), ClickEvent(f"orphan{j}", 1_100.0)))
    events.sort(key=lambda x: x[0])  # stable: ties keep their drawing order
    return [e for _, e in events]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(logs())
def test_stage_equals_naive_recomputation_on_hostile_logs(events: list[Any]) -> None:
    assert_same(stage_features(events, EXACT), naive_features(events, EXACT))


@settings(max_examples=60, deadline=None)
@given(logs(span=2_000))
def test_exact_within_the_lateness_bound(events: list[Any]) -> None:
    # an event arrives at most ~300 s after a later one of the same key: with a lateness
    # bound of 400 s (and a buffer that does not overflow) time-based eviction, which
    # happens over a 2,000 s log, must keep every answer exact
    cfg = FeatureConfig(
        half_lives_s=(60.0, 3600.0), seq_len=3, seq_keep=10_000, lateness_s=400.0, max_buffer=400
    )
    stage = FeatureStage(cfg)
    got = {
        e.impression_id: f
        for e, f in zip(events, stage.process(events), strict=True)
        if f is not None
    }
    assert stage.stats["approximate"] == 0
    assert_same(got, naive_features(events, cfg))


def test_ablation_switches() -> None:
    ev = [
        ImpressionEvent("a", 10.0, "u", "i"),
        ClickEvent("a", 11.0),
        ImpressionEvent("b", 20.0, "u", "i"),
    ]
    no_counters = stage_features(ev, FeatureConfig(counters=False))["b"]
    assert set(no_counters) == {"hist_seq", "hist_seq_age"}
    no_seq = stage_features(ev, FeatureConfig(sequence=False))["b"]
    assert "hist_seq" not in no_seq and no_seq["hist_ui_n"] == math.log1p(1)


def test_no_feature_sees_its_own_label() -> None:
    rng = random.Random(1)
    base = []
    for k in range(300):
        ts = 1_000.0 + k
        base.append(
            ImpressionEvent(
                f"m{k}", ts, f"u{rng.randrange(5)}", f"i{rng.randrange(4)}", rng.randrange(3)
            )
        )
    for k in range(0, 300, 7):
        # the same log with and without impression k's click (at its own ts, arriving
        # before the impression, and 0.5 s later): k's features must not change
        for click_ts, before in ((base[k].ts, True), (base[k].ts + 0.5, False)):
            clicked = list(base)
            clk = ClickEvent(f"m{k}", click_ts)
            clicked.insert(k if before else k + 1, clk)
            with_label = stage_features(clicked, EXACT)[f"m{k}"]
            without = stage_features(base, EXACT)[f"m{k}"]
            assert with_label == without
            # and it is seen by a later impression of the same user
            later = [e for e in base[k + 1 :] if e.user_id == base[k].user_id and e.ts > click_ts]
            if later:
                assert (
                    stage_features(clicked, EXACT)[later[0].impression_id]
                    != stage_features(base, EXACT)[later[0].impression_id]
                )


def test_beyond_the_lateness_bound_is_approximate_and_counted() -> None:
    cfg = FeatureConfig(half_lives_s=(3600.0,), lateness_s=10.0, max_buffer=4)
    stage = FeatureStage(cfg)
    for k in range(50):
        stage.impression(f"m{k}", 1_000.0 + k, "u", "i")
    assert stage.stats["approximate"] == 0
    stage.impression("late", 1_000.0, "u", "i")  # 49 s older than the key's newest event
    assert stage.stats["approximate"] > 0


def test_duplicates_are_idempotent_and_state_round_trips() -> None:
    rng = random.Random(2)
    ev: list[Any] = []
    for k in range(500):
        ts = 1_000.0 + k * 10
        ev.append(
            ImpressionEvent(
                f"m{k}", ts, f"u{rng.randrange(20)}", f"i{rng.randrange(30)}", 1, {"item_cat": "c"}
            )
        )
        if rng.random() < 0.2:
            ev.append(ClickEvent(f"m{k}", ts + 3))
    cfg = FeatureConfig(half_lives_s=(600.0, 3600.0))
    ref = FeatureStage(cfg).process(ev)
    # restart half way through from a JSON copy of the state, replaying the last 50
    # events twice (at-least-once): the same features, duplicates ignored
    a = FeatureStage(cfg)
    out1 = a.process(ev[:300])
    b = FeatureStage(cfg)
    b.load_state_dict(json.loads(json.dumps(a.state_dict(), allow_nan=False)))
    replayed = b.process(ev[250:300])
    assert all(f is None for f in replayed)
    assert b.stats["duplicate_impressions"] > 0
    out2 = b.process(ev[300:])
    assert out1 + out2 == ref


def test_idle_keys_expire_and_budget_holds() -> None:
    cfg = FeatureConfig(half_lives_s=(60.0,), ttl_s=100.0, impression_ttl_s=50.0, max_keys=500)
    stage = FeatureStage(cfg)
    for k in range(2_000):
        stage.impression(f"m{k}", 1_000.0 + k, f"u{k}", f"i{k % 7}")
    n = stage.n_keys()
    assert n["u"] + n["p"] + n["i"] <= 500 + 3 * 110
    assert n["impressions"] <= 60
    assert stage.stats["expired_keys"] > 0


def test_attach_log_orders_by_event_time() -> None:
    f = attach_log(
        FeatureStage(EXACT),
        ts=[10.0, 5.0, 20.0],
        impression_id=["a", "b", "c"],
        user_id=["u", "u", "u"],
        item_id=["i", "j", "i"],
        position=[None, None, None],
        attrs=[{}, {}, {}],
        click_ts=[float("nan"), 6.0, None],
    )
    assert f[1].get("hist_seq") is None  # first in event time
    assert f[0]["hist_seq"] == ["j"] and f[0]["hist_seq_age"] == [4.0]
    assert f[2]["hist_ui_n"] == math.log1p(1)


@pytest.mark.parametrize("filler", [0, 500])
def test_a_key_idle_past_the_ttl_reads_as_never_seen_whatever_the_sweeps(filler: int) -> None:
    """Expiry is exact at every read: a user, item, pair or click sequence whose newest
    event is more than ``ttl_s`` before the read reads as never seen, however many events
    (and sweeps) came between; one just inside the TTL still counts."""
    cfg = FeatureConfig(half_lives_s=(1e6,), ttl_s=1_000.0, impression_ttl_s=100.0)
    stage = FeatureStage(cfg)
    stage.impression("a", 0.0, "u", "i", 1, {"item_cat": "c"})
    stage.click("a", 1.0)
    for k in range(filler):  # other traffic: sweeps run between
        stage.impression(f"f{k}", 2.0 + k * 2.0, f"x{k}", f"y{k}")
    inside = stage.peek(1_000.5, "u", "i", 1, {"item_cat": "c"})
    assert inside["hist_ui_n"] > 0 and inside["hist_seq"] == ["i"]
    fresh = FeatureStage(cfg).peek(1_001.5, "u", "i", 1, {"item_cat": "c"})
    got = stage.impression("b", 1_001.5, "u", "i", 1, {"item_cat": "c"})
    assert got == fresh and "hist_seq" not in got  # every key and the sequence expired
    assert stage.stats["expired_keys"] >= 5  # user, item, pair, item x position, u x cat
    again = stage.peek(1_002.0, "u", "i", 1, {"item_cat": "c"})
    assert again["hist_ui_n"] == pytest.approx(math.log1p(1))  # started afresh at 1,001.5
