"""The joiner's fake-negative scheme (``JoinConfig.delayed_feedback="fake_negative"``)."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from learners.delayed_feedback import SCHEMES
from logs.events import Click, Impression, LabeledExample
from stream.join import DELAYED_FEEDBACK_SCHEMES, JoinConfig, OnlineJoiner, offline_join
from tests.unit.stream.join_helpers import T0, W, both, click, imp, kinds


@pytest.fixture
def joiner() -> OnlineJoiner:
    return OnlineJoiner(
        JoinConfig(
            window_s=W, lateness_s=0.0, delayed_feedback="fake_negative", idle_timeout_s=None
        )
    )


def test_every_impression_is_emitted_at_once_as_a_fake_negative(joiner: OnlineJoiner) -> None:
    out = joiner.on_impression(imp("a", 0))
    assert kinds(out) == [("a", 0, "fake_negative")]
    assert out[0].label_ts == T0 and out[0].weight == 1.0
    assert joiner.counters.fake_negatives == 1 and joiner.counters.negatives == 0


def test_click_in_window_emits_a_positive_duplicate_when_the_click_arrives(
    joiner: OnlineJoiner,
) -> None:
    joiner.on_impression(imp("a", 0))
    out = joiner.on_click(click("a", 10))
    assert kinds(out) == [("a", 1, "positive")]
    assert out[0].label_ts == T0 + 10
    assert joiner.counters.positives == 1


def test_window_close_emits_nothing_in_fake_negative_mode(joiner: OnlineJoiner) -> None:
    joiner.on_impression(imp("a", 0))
    joiner.on_impression(imp("b", 0))
    joiner.on_click(click("b", 5))
    assert both(joiner, 10 * W) == []
    assert not joiner.pending


def test_click_after_the_window_yields_no_positive(joiner: OnlineJoiner) -> None:
    joiner.on_impression(imp("a", 0))
    assert joiner.on_click(click("a", W + 1)) == []
    assert joiner.counters.positives == 0 and joiner.counters.clicks == 1


def test_click_later_than_the_lateness_bound_still_yields_a_positive_not_a_correction(
    joiner: OnlineJoiner,
) -> None:
    joiner.on_impression(imp("a", 0))
    both(joiner, W + 30)  # the window closed by the watermark: "a" left pending
    assert not joiner.pending
    out = joiner.on_click(click("a", W))
    assert kinds(out) == [("a", 1, "positive")]
    assert joiner.counters.corrections == 0 and joiner.counters.late_clicks == 0


def test_duplicate_impressions_and_clicks_are_counted_once(joiner: OnlineJoiner) -> None:
    out = joiner.on_impression(imp("a", 0))
    out += joiner.on_impression(imp("a", 0))
    out += joiner.on_click(click("a", 5))
    out += joiner.on_click(click("a", 5))
    out += joiner.on_click(click("a", 7))
    out += joiner.on_impression(imp("a", 8))
    out += both(joiner, 10 * W)
    out += joiner.on_click(click("a", 20))
    assert kinds(out) == [("a", 0, "fake_negative"), ("a", 1, "positive")]
    assert joiner.counters.duplicate_impressions == 2
    assert joiner.counters.duplicate_clicks == 3 and joiner.counters.clicks == 1


def test_orphan_click_then_impression_emits_the_negative_followed_by_the_positive(
    joiner: OnlineJoiner,
) -> None:
    assert joiner.on_click(click("a", 3)) == []  # the click waits for its impression
    out = joiner.on_impression(imp("a", 0))
    assert kinds(out) == [("a", 0, "fake_negative"), ("a", 1, "positive")]
    assert out[1].label_ts == T0 + 3


def test_orphan_click_outside_the_window_yields_only_the_negative(joiner: OnlineJoiner) -> None:
    joiner.on_click(click("a", W + 1))
    assert kinds(joiner.on_impression(imp("a", 0))) == [("a", 0, "fake_negative")]


def test_window_scheme_is_the_default_and_unchanged() -> None:
    assert JoinConfig().delayed_feedback == "window"
    j = OnlineJoiner(JoinConfig(window_s=W, lateness_s=0.0, idle_timeout_s=None))
    assert j.on_impression(imp("a", 0)) == []
    assert kinds(both(j, W + 1)) == [("a", 0, "negative")]


def test_join_config_rejects_an_unknown_delayed_feedback_scheme() -> None:
    with pytest.raises(ValueError, match="delayed_feedback"):
        JoinConfig(delayed_feedback="eventually")


def test_joiner_schemes_are_the_learners_schemes() -> None:
    assert DELAYED_FEEDBACK_SCHEMES == SCHEMES


# --- property: one negative per impression, positives == the offline join ----------------


@st.composite
def arrivals(draw: st.DrawFn) -> tuple[float, float, list[Impression | Click]]:
    """(window, lateness, events in arrival order): duplicates, orphans, ghost clicks, and
    out-of-order arrival within the lateness bound (each event at ``ts + jitter``)."""
    window = draw(st.integers(1, 600))
    lateness = draw(st.integers(0, window - 1))
    n = draw(st.integers(1, 25))
    imps = [Impression(f"i{k}", T0 + draw(st.integers(0, 3 * window)), "u", "i") for k in range(n)]
    events: list[Impression | Click] = list(imps)
    for im in imps:
        edge = st.sampled_from([0, window, window + 1])
        for delay in draw(st.lists(edge | st.integers(0, 2 * window), max_size=3)):
            events += [Click(im.impression_id, im.ts + delay)] * draw(st.integers(1, 2))
        if draw(st.booleans()) and draw(st.booleans()):
            events.append(im)  # a re-delivered impression
    events += [Click(f"ghost{k}", T0 + draw(st.integers(0, 3 * window))) for k in range(2)]
    jitter = [draw(st.integers(0, lateness)) for _ in events]
    order = sorted(range(len(events)), key=lambda i: (events[i].ts + jitter[i], i))
    return float(window), float(lateness), [events[i] for i in order]


@settings(max_examples=200, deadline=None)
@given(arrivals())
def test_fake_negative_stream_has_one_negative_per_impression_and_the_offline_positives(
    case: tuple[float, float, list[Impression | Click]],
) -> None:
    window, lateness, events = case
    j = OnlineJoiner(
        JoinConfig(
            window_s=window,
            lateness_s=lateness,
            delayed_feedback="fake_negative",
            idle_timeout_s=None,
        )
    )
    out: list[LabeledExample] = []
    for ev in events:
        out += j.on_click(ev) if isinstance(ev, Click) else j.on_impression(ev)
    end = max(e.ts for e in events) + window + lateness + 10
    out += j.on_watermark(end, "impressions") + j.on_watermark(end, "clicks")

    impressions = [e for e in events if isinstance(e, Impression)]
    clicks = [e for e in events if isinstance(e, Click)]
    truth = offline_join(impressions, clicks, window)
    negatives = Counter(e.impression.impression_id for e in out if e.kind == "fake_negative")
    positives = Counter(e.impression.impression_id for e in out if e.kind == "positive")
    assert negatives == Counter(list(truth))  # each logged impression exactly once
    assert positives == Counter(iid for iid, y in truth.items() if y == 1)
    assert {e.kind for e in out} <= {"fake_negative", "positive"}
    assert all(e.label == (e.kind == "positive") for e in out)
    # a positive never precedes its impression's negative
    first: dict[tuple[str, str], int] = {}
    for k, e in enumerate(out):
        first.setdefault((e.impression.impression_id, e.kind), k)
    assert all(first[(iid, "fake_negative")] < first[(iid, "positive")] for iid in positives)
