"""``FeatureStage.process`` (the batch path) against the scalar per-event path.

The batch path must give the same outputs, ``state_dict()``, ``approx_bytes()`` and
``stats`` as calling :meth:`FeatureStage.impression` / :meth:`FeatureStage.click` one event
at a time, bit for bit, on hostile logs (out of order, duplicates, early and late clicks,
orphans), under TTL expiry and under shedding (small budgets), whatever the batch split.
"""

from __future__ import annotations

import gc
import json
import random
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from features.config import ClickEvent, FeatureConfig, ImpressionEvent
from features.stage import FeatureStage

# small buffers, lateness, TTLs and key budget: eviction, approximation, expiry and key
# shedding all happen within a few dozen events
TIGHT = FeatureConfig(
    half_lives_s=(60.0, 3600.0),
    seq_len=2,
    seq_keep=3,
    lateness_s=30.0,
    max_buffer=4,
    impression_ttl_s=200.0,
    ttl_s=150.0,
    max_keys=12,
)


@st.composite
def hostile(draw: st.DrawFn) -> list[Any]:
    """Impressions over few users/items, jittered arrival, duplicates, clicks before and
    long after their impression, duplicate clicks, orphans."""
    n = draw(st.integers(1, 60))
    events: list[tuple[float, Any]] = []
    for k in range(n):
        ts = 1_000.0 + draw(st.integers(0, 600)) * 1.0
        imp = ImpressionEvent(
            f"m{k}",
            ts,
            f"u{draw(st.integers(0, 3))}",
            f"i{draw(st.integers(0, 4))}",
            draw(st.one_of(st.none(), st.integers(0, 2))),
            {"item_cat": f"c{draw(st.integers(0, 1))}", "item_x": 2.0, "dev": "d"},
        )
        arrive = ts + draw(st.integers(-90, 90))
        events.append((arrive, imp))
        if draw(st.booleans()):
            events.append((arrive + draw(st.integers(-5, 300)), imp))
        if draw(st.integers(0, 2)) == 0:
            cts = ts + draw(st.integers(0, 400))
            c_arrive = cts + draw(st.integers(-120, 120))
            events.append((c_arrive, ClickEvent(imp.impression_id, cts, imp.user_id)))
            if draw(st.booleans()):
                events.append(
                    (c_arrive + draw(st.integers(0, 9)), ClickEvent(imp.impression_id, cts))
                )
    for j in range(draw(st.integers(0, 3))):
        events.append((1_000.0 + draw(st.integers(0, 700)), ClickEvent(f"orphan{j}", 1_100.0)))
    events.sort(key=lambda x: x[0])
    return [e for _, e in events]


def scalar(events: list[Any], cfg: FeatureConfig) -> tuple[list[Any], FeatureStage]:
    stage = FeatureStage(cfg)
    out: list[Any] = []
    for e in events:
        if isinstance(e, ImpressionEvent):
            out.append(
                stage.impression(
                    e.impression_id, e.ts, e.user_id, e.item_id, e.position, e.features
                )
            )
        else:
            stage.click(e.impression_id, e.ts, e.user_id)
            out.append(None)
    return out, stage


def batched(
    events: list[Any], cfg: FeatureConfig, cuts: list[int]
) -> tuple[list[Any], FeatureStage]:
    stage = FeatureStage(cfg)
    out: list[Any] = []
    lo = 0
    for hi in [*sorted(cuts), len(events)]:
        out.extend(stage.process(events[lo:hi]))
        lo = max(lo, hi)
    return out, stage


def assert_identical(a: tuple[list[Any], FeatureStage], b: tuple[list[Any], FeatureStage]) -> None:
    (out_a, sa), (out_b, sb) = a, b
    assert len(out_a) == len(out_b)
    for fa, fb in zip(out_a, out_b, strict=True):
        assert fa == fb  # dict equality: same names, values equal as floats (bitwise here)
        if fa is not None:
            assert list(fa) == list(fb)  # same feature order
    # JSON text compares floats exactly (repr round-trips) and the state's order
    assert json.dumps(sa.state_dict()) == json.dumps(sb.state_dict())
    assert sa.approx_bytes() == sb.approx_bytes()
    assert sa.stats == sb.stats


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(hostile(), st.lists(st.integers(0, 200), max_size=4))
def test_batch_path_equals_scalar_path(events: list[Any], cuts: list[int]) -> None:
    for cfg in (TIGHT, FeatureConfig(half_lives_s=(60.0, 3600.0, 86_400.0))):
        assert_identical(batched(events, cfg, cuts), scalar(events, cfg))


def test_batch_path_equals_scalar_path_when_shedding() -> None:
    # 5,000 impressions of 900 users (70% clicked) against a 1 MiB budget: impression ids,
    # sequences and keys are all shed; a few hundred events go out of order
    rng = random.Random(13)
    events: list[Any] = []
    for k in range(5_000):
        ts = 1_000.0 + k + rng.uniform(-20.0, 20.0)
        imp = ImpressionEvent(
            f"m{k}", ts, f"u{k % 900}", f"i{rng.randrange(40)}", k % 3, {"item_c": "a"}
        )
        events.append(imp)
        if rng.random() < 0.7:
            events.append(ClickEvent(f"m{k - rng.randrange(5)}", ts + rng.uniform(0, 9)))
    cfg = FeatureConfig(
        half_lives_s=(60.0, 3600.0), max_bytes=2**20, seq_keep=30, lateness_s=5.0, max_buffer=4
    )
    got, want = batched(events, cfg, [1_000, 1_001, 2_500]), scalar(events, cfg)
    assert_identical(got, want)
    stats = got[1].stats
    assert stats["evicted_impressions"] > 0 and stats["evicted_keys"] > 0
    assert stats["evicted_sequences"] > 0 and stats["approximate"] > 0


def test_process_restores_the_garbage_collector() -> None:
    stage = FeatureStage()
    assert gc.isenabled()
    stage.process([ImpressionEvent("a", 1.0, "u", "i")])
    assert gc.isenabled()
    gc.disable()
    try:
        stage.process([ImpressionEvent("b", 2.0, "u", "i")])
        assert not gc.isenabled()
    finally:
        gc.enable()
    try:
        stage.process([ImpressionEvent("c", 3.0, "u", "i"), object()])
    except AttributeError:
        pass
    assert gc.isenabled()


def test_a_bad_event_fails_the_batch_with_the_events_before_it_applied() -> None:
    """An event the stage cannot read (a time that is not a number) raises; the events
    staged before it are applied, as they would have been one call at a time, and the bad
    one changes nothing."""
    good = [ImpressionEvent("a", 10.0, "u", "i", 1), ClickEvent("a", 12.0)]
    bad = ImpressionEvent("b", "soon", "u", "i", 1)  # type: ignore[arg-type]
    stage = FeatureStage()
    try:
        stage.process([*good, bad, ImpressionEvent("c", 20.0, "u", "i", 1)])
    except ValueError:
        pass
    else:
        raise AssertionError("a time that is not a number was accepted")
    want = scalar(good, FeatureConfig())[1]
    assert json.dumps(stage.state_dict()) == json.dumps(want.state_dict())
    assert stage.stats == want.stats
