"""Fake negatives held until the clicks input reaches their event time
(``JoinConfig.align_fake_negatives``, the worker's default)."""

from __future__ import annotations

from stream.join import JoinConfig, OnlineJoiner
from stream.settings import Settings
from tests.unit.stream.join_helpers import T0, W, click, imp, kinds


def aligned(
    idle: float | None = None, clock: list[float] | None = None, **kw: object
) -> OnlineJoiner:
    cfg = JoinConfig(window_s=W, lateness_s=0.0, delayed_feedback="fake_negative",
                     align_fake_negatives=True, idle_timeout_s=idle, **kw)  # type: ignore[arg-type]  # fmt: skip
    if clock is None:
        return OnlineJoiner(cfg)
    return OnlineJoiner(cfg, clock=lambda: clock[0])


def test_the_worker_aligns_by_default() -> None:
    assert Settings().join.align_fake_negatives and not JoinConfig().align_fake_negatives


def test_impressions_ahead_of_the_clicks_wait_and_leave_in_event_time_order() -> None:
    j = aligned()
    assert j.on_impression(imp("a", 0)) == [] and j.on_impression(imp("b", 20)) == []
    assert len(j.held) == 2
    # a click at +10 on "a": a's negative first, then its positive; b (at +20) still waits
    assert kinds(j.on_click(click("a", 10))) == [("a", 0, "fake_negative"), ("a", 1, "positive")]
    assert [i.impression_id for i in j.held] == ["b"]
    # a watermark on the clicks input moves the frontier too
    assert kinds(j.on_watermark(T0 + 25, source="clicks")) == [("b", 0, "fake_negative")]
    assert j.counters.fake_negatives == 2 and not j.held


def test_an_impression_behind_the_clicks_leaves_at_once() -> None:
    j = aligned()
    j.on_watermark(T0 + 100, source="clicks")
    assert kinds(j.on_impression(imp("a", 50))) == [("a", 0, "fake_negative")]


def test_an_idle_clicks_input_holds_nothing_back() -> None:
    clock = [0.0]
    j = aligned(idle=30.0, clock=clock)
    assert j.on_impression(imp("a", 0)) == []
    clock[0] = 31.0  # no click and no click watermark for 31 wall seconds
    assert kinds(j.on_impression(imp("b", 1))) == [
        ("a", 0, "fake_negative"),
        ("b", 0, "fake_negative"),
    ]


def test_the_pending_bound_and_a_forced_close_release_what_is_held() -> None:
    j = aligned(max_pending=2)
    j.on_impression(imp("a", 0))
    j.on_impression(imp("b", 1))
    out = j.on_impression(imp("c", 2))  # over max_pending: "a" is closed early
    assert ("a", 0, "fake_negative") in kinds(out)
    assert j.counters.fake_negatives == 1 and [i.impression_id for i in j.held] == ["b", "c"]


def test_a_restore_holds_again_what_the_clicks_had_not_reached() -> None:
    j = aligned()
    j.restore(pending=[(imp("old", 0), None), (imp("new", 40), None)], orphans=[],
              max_ts={"impressions": T0 + 40, "clicks": T0 + 10})  # fmt: skip
    assert [i.impression_id for i in j.held] == ["new"]  # "old" was sent before the crash
    assert kinds(j.on_click(click("new", 45))) == [
        ("new", 0, "fake_negative"),
        ("new", 1, "positive"),
    ]


def test_without_alignment_the_negative_leaves_at_arrival() -> None:
    j = OnlineJoiner(JoinConfig(window_s=W, lateness_s=0.0, delayed_feedback="fake_negative",
                                idle_timeout_s=None))  # fmt: skip
    assert kinds(j.on_impression(imp("a", 0))) == [("a", 0, "fake_negative")]
