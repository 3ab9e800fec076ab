"""The online event-time joiner: each semantic rule, and equality with the offline join."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from logs.events import Click, Impression, LabeledExample
from stream.join import JoinConfig, OnlineJoiner, offline_join
from tests.unit.stream.join_helpers import T0, W, both, click, imp, kinds


@pytest.fixture
def joiner() -> OnlineJoiner:
    return OnlineJoiner(JoinConfig(window_s=W, lateness_s=0.0))


def test_impression_without_click_becomes_negative_when_its_window_closes(
    joiner: OnlineJoiner,
) -> None:
    assert joiner.on_impression(imp("a", 0)) == []
    assert both(joiner, W) == []  # closes only once the watermark passes ts + W
    out = both(joiner, W + 1)
    assert kinds(out) == [("a", 0, "negative")]
    assert out[0].label_ts == T0 + W
    assert joiner.counters.negatives == 1 and not joiner.pending


def test_click_inside_window_becomes_positive_only_when_the_window_closes(
    joiner: OnlineJoiner,
) -> None:
    joiner.on_impression(imp("a", 0))
    assert joiner.on_click(click("a", 10)) == []
    assert both(joiner, 30) == []
    out = both(joiner, W + 1)
    assert kinds(out) == [("a", 1, "positive")]
    assert out[0].label_ts == T0 + 10


def test_with_emit_positives_click_a_positive_is_emitted_at_the_click() -> None:
    j = OnlineJoiner(JoinConfig(window_s=W, lateness_s=0.0, emit_positives="click"))
    j.on_impression(imp("a", 0))
    out = j.on_click(click("a", 10))
    assert kinds(out) == [("a", 1, "positive")]
    assert out[0].label_ts == T0 + 10
    assert both(j, 10 * W) == []  # never emitted twice
    assert j.counters.positives == 1


def test_click_exactly_at_the_window_end_counts_and_one_second_later_does_not(
    joiner: OnlineJoiner,
) -> None:
    joiner.on_impression(imp("edge", 0))
    joiner.on_impression(imp("late", 0))
    joiner.on_click(click("edge", W))
    joiner.on_click(click("late", W + 1))
    out = both(joiner, 2 * W)
    assert sorted(kinds(out)) == [("edge", 1, "positive"), ("late", 0, "negative")]


def test_watermark_is_the_slower_input_minus_lateness() -> None:
    j = OnlineJoiner(JoinConfig(window_s=W, lateness_s=5.0))
    j.on_impression(imp("a", 0))
    assert j.on_watermark(T0 + 1000, "impressions") == []  # clicks have not advanced
    assert j.watermark == float("-inf")
    assert j.on_watermark(T0 + W + 5, "clicks") == []  # watermark W, not past ts + W
    assert j.watermark == T0 + W
    assert kinds(j.on_watermark(T0 + W + 6, "clicks")) == [("a", 0, "negative")]


def test_click_arriving_before_its_impression_waits_and_joins(joiner: OnlineJoiner) -> None:
    assert joiner.on_click(click("a", 5)) == []
    assert "a" in joiner.orphan_clicks
    joiner.on_impression(imp("a", 0))
    assert not joiner.orphan_clicks
    assert kinds(both(joiner, W + 1)) == [("a", 1, "positive")]
    assert joiner.counters.orphan_clicks == 0


def test_early_click_with_emit_positives_click_is_emitted_with_its_impression() -> None:
    j = OnlineJoiner(JoinConfig(window_s=W, lateness_s=0.0, emit_positives="click"))
    j.on_click(click("a", 5))
    assert kinds(j.on_impression(imp("a", 0))) == [("a", 1, "positive")]


def test_click_whose_impression_never_arrives_is_counted_as_orphan_after_the_grace() -> None:
    j = OnlineJoiner(JoinConfig(window_s=W, lateness_s=0.0, orphan_grace_s=100.0))
    j.on_click(click("ghost", 0))
    both(j, 100)
    assert j.counters.orphan_clicks == 0 and "ghost" in j.orphan_clicks
    assert both(j, 101) == []
    assert j.counters.orphan_clicks == 1 and not j.orphan_clicks


def test_duplicate_impression_is_labelled_once(joiner: OnlineJoiner) -> None:
    joiner.on_impression(imp("a", 0))
    joiner.on_impression(imp("a", 0))
    out = both(joiner, W + 1)
    joiner.on_impression(imp("a", 0))  # a re-delivery after the label is still a duplicate
    assert kinds(out) == [("a", 0, "negative")]
    assert joiner.counters.duplicate_impressions == 2
    assert joiner.counters.impressions == 1


@pytest.mark.parametrize("mode", ["window_close", "click"])
def test_duplicate_clicks_are_counted_once(mode: str) -> None:
    j = OnlineJoiner(JoinConfig(window_s=W, lateness_s=0.0, emit_positives=mode))
    j.on_impression(imp("a", 0))
    out = j.on_click(click("a", 10)) + j.on_click(click("a", 10)) + j.on_click(click("a", 20))
    out += both(j, W + 1)
    out += j.on_click(click("a", 10))
    assert kinds(out) == [("a", 1, "positive")]
    assert j.counters.clicks == 1
    assert j.counters.duplicate_clicks == 3


def test_duplicate_orphan_clicks_are_counted_once(joiner: OnlineJoiner) -> None:
    joiner.on_click(click("a", 10))
    joiner.on_click(click("a", 10))
    assert joiner.counters.clicks == 1 and joiner.counters.duplicate_clicks == 1


def test_click_after_window_closed_yields_correction(joiner: OnlineJoiner) -> None:
    joiner.on_impression(imp("a", 0))
    assert kinds(both(joiner, W + 1)) == [("a", 0, "negative")]
    out = joiner.on_click(click("a", 30))  # inside the window, but later than the lateness
    assert kinds(out) == [("a", 1, "correction")]
    assert out[0].label_ts == T0 + 30
    assert joiner.counters.late_clicks == 1 and joiner.counters.corrections == 1
    assert joiner.on_click(click("a", 30)) == []  # corrected only once
    assert joiner.counters.duplicate_clicks == 1


def test_late_click_without_emit_corrections_is_counted_but_not_emitted() -> None:
    j = OnlineJoiner(JoinConfig(window_s=W, lateness_s=0.0, emit_corrections=False))
    j.on_impression(imp("a", 0))
    both(j, W + 1)
    assert j.on_click(click("a", 30)) == []
    assert j.counters.late_clicks == 1 and j.counters.corrections == 0


def test_click_after_the_window_on_a_labelled_negative_is_not_a_late_click(
    joiner: OnlineJoiner,
) -> None:
    joiner.on_impression(imp("a", 0))
    both(joiner, W + 1)
    assert joiner.on_click(click("a", W + 40)) == []
    assert joiner.counters.late_clicks == 0 and joiner.counters.corrections == 0
    # a genuinely late click inside the window still corrects the negative afterwards
    assert kinds(joiner.on_click(click("a", 30))) == [("a", 1, "correction")]


def test_click_after_the_window_on_a_pending_impression_leaves_it_negative(
    joiner: OnlineJoiner,
) -> None:
    joiner.on_impression(imp("a", 0))
    joiner.on_click(click("a", W + 1))
    assert kinds(both(joiner, W + 2)) == [("a", 0, "negative")]


def test_too_many_pending_impressions_force_the_oldest_out_early() -> None:
    j = OnlineJoiner(JoinConfig(window_s=W, lateness_s=0.0, max_pending=2))
    j.on_impression(imp("a", 0))
    j.on_click(click("a", 1))
    j.on_impression(imp("b", 1))
    out = j.on_impression(imp("c", 2))
    assert kinds(out) == [("a", 1, "positive")]
    assert set(j.pending) == {"b", "c"}
    assert j.counters.forced_negatives == 1


def test_labelled_ids_are_forgotten_after_the_dedup_horizon() -> None:
    j = OnlineJoiner(JoinConfig(window_s=W, lateness_s=0.0, dedup_horizon_s=100.0))
    j.on_impression(imp("a", 0))
    both(j, W + 1)
    assert "a" in j.done
    both(j, W + 101)
    assert "a" not in j.done


@pytest.mark.parametrize(
    "kwargs",
    [
        {"window_s": -1},
        {"lateness_s": -1},
        {"orphan_grace_s": -1},
        {"dedup_horizon_s": -1},
        {"max_pending": 0},
        {"emit_positives": "soon"},
    ],
    ids=repr,
)
def test_join_config_rejects_invalid_settings(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        JoinConfig(**kwargs)  # type: ignore[arg-type]  # invalid on purpose


def test_offline_join_keeps_the_first_duplicate_and_ignores_unknown_clicks() -> None:
    labels = offline_join(
        [imp("a", 0), imp("b", 0), imp("a", 100)],
        [click("a", W + 50), click("b", W), click("zz", 1)],
        window_s=W,
    )
    assert labels == {"a": 0, "b": 1}


# --- property: online join == offline join ----------------------------------------------


@dataclass(frozen=True)
class Scenario:
    window_s: float
    lateness_s: float
    impressions: list[Impression]
    clicks: list[Click]
    arrival: list[Impression | Click]  # both streams interleaved in arrival order


@st.composite
def scenarios(draw: st.DrawFn, in_time_order: bool = False) -> Scenario:
    """A log with duplicates, orphans and out-of-order arrival within the lateness bound.

    Times are whole seconds (no rounding at the window edge). Each event gets an arrival
    key ``ts + jitter`` with ``0 <= jitter <= lateness``; sorting by it means an event
    arrives no earlier than ``max ts seen - lateness``, which is the joiner's assumption.
    Clicks may therefore precede their impression.
    """
    window = draw(st.integers(1, 600))
    lateness = 0 if in_time_order else draw(st.integers(0, window - 1))
    n = draw(st.integers(1, 25))
    imps = [Impression(f"i{k}", T0 + draw(st.integers(0, 3 * window)), "u", "i") for k in range(n)]
    clicks: list[Click] = []
    for im in imps:
        edge = st.sampled_from([0, window, window + 1])  # at and just past the window end
        for delay in draw(st.lists(edge | st.integers(0, 2 * window), max_size=3)):
            c = Click(im.impression_id, im.ts + delay)
            clicks += [c] * draw(st.integers(1, 2))  # re-delivered duplicates
    for k in range(draw(st.integers(0, 3))):  # clicks on impressions never logged
        clicks.append(Click(f"ghost{k}", T0 + draw(st.integers(0, 3 * window))))
    dup_imps = [im for im in imps if draw(st.booleans()) and draw(st.booleans())]
    events: list[Impression | Click] = [*imps, *dup_imps, *clicks]
    order = draw(st.permutations(range(len(events))))
    if in_time_order:
        key = {i: (events[i].ts, isinstance(events[i], Click), r) for r, i in enumerate(order)}
    else:
        extreme = st.sampled_from([0, lateness])
        jitter = [draw(extreme | st.integers(0, lateness)) for _ in events]
        key = {i: (events[i].ts + jitter[i], r) for r, i in enumerate(order)}  # type: ignore[misc]
    arrival = [events[i] for i in sorted(order, key=key.__getitem__)]
    return Scenario(float(window), float(lateness), imps + dup_imps, clicks, arrival)


def run_online(s: Scenario, mode: str) -> tuple[OnlineJoiner, list[LabeledExample]]:
    j = OnlineJoiner(JoinConfig(window_s=s.window_s, lateness_s=s.lateness_s, emit_positives=mode))
    out: list[LabeledExample] = []
    for ev in s.arrival:
        out += j.on_click(ev) if isinstance(ev, Click) else j.on_impression(ev)
    end = max(e.ts for e in s.arrival) + s.window_s + s.lateness_s + 10
    out += j.on_watermark(end, "impressions") + j.on_watermark(end, "clicks")
    return j, out


@pytest.mark.parametrize("mode", ["window_close", "click"])
@settings(max_examples=200, deadline=None)
@given(s=scenarios())
def test_online_join_labels_equal_the_offline_join_exactly_once(mode: str, s: Scenario) -> None:
    j, out = run_online(s, mode)
    counts = Counter(e.impression.impression_id for e in out)
    assert all(c == 1 for c in counts.values()), counts
    assert {e.impression.impression_id: e.label for e in out} == offline_join(
        s.impressions, s.clicks, s.window_s
    )
    assert all(e.kind in ("positive", "negative") for e in out)
    assert j.counters.late_clicks == 0  # the lateness bound held, so nothing was late
    assert not j.pending and not j.clicked


@settings(max_examples=100, deadline=None)
@given(s=scenarios(in_time_order=True))
def test_window_close_emits_in_order_of_impression_time_plus_window(s: Scenario) -> None:
    _, out = run_online(s, "window_close")
    closes = [e.impression.ts + s.window_s for e in out]
    assert closes == sorted(closes)
    assert len(out) == len({im.impression_id for im in s.impressions})
