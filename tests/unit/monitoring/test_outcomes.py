"""Final labels for the monitor from a fake-negative stream (monitoring.outcomes)."""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from logs.batches import ScoredBatch
from logs.events import MIN_TS
from monitoring.metrics import StreamrecMetrics
from monitoring.outcomes import FinalOutcomes
from stream.join import JoinConfig
from stream.services import MonitorService
from stream.settings import MonitorConfig, Settings


def test_each_impression_is_judged_once_on_its_final_label() -> None:
    fo = FinalOutcomes(window_s=10.0)
    fo.add(["a", "b", "c"], ts=[0.0, 1.0, 2.0], label=[0, 0, 0], columns={"p": [0.1, 0.2, 0.3]})
    fo.add(["a"], ts=[0.0], label=[1], columns={"p": [0.9]})  # a's click, scored later
    fo.add(["b"], ts=[1.0], label=[0], columns={"p": [0.5]})  # a redelivered fake negative
    assert fo.resolve() == {}  # no window closed yet
    fo.add(["d"], ts=[20.0], label=[0], columns={"p": [0.4]})
    out = fo.resolve()
    assert out["label"].tolist() == [1.0, 0.0, 0.0]
    assert out["p"].tolist() == [0.1, 0.2, 0.3]  # the first (impression-time) scores
    assert fo.duplicates == 1 and fo.pending == 1
    fo.add(["c"], ts=[2.0], label=[1], columns={"p": [0.9]})  # after c was resolved
    assert fo.late_positives == 1
    assert fo.resolve(flush=True)["label"].tolist() == [0.0]


def test_rejects_negative_window() -> None:
    with pytest.raises(ValueError):
        FinalOutcomes(window_s=-1.0)


def _batch(ids: list[str], ts: list[float], label: list[int], p: float) -> ScoredBatch:
    n = len(ids)
    return ScoredBatch(1, 0, ids, ts, label, [p] * n, [p] * n, ["1"] * n, [None] * n)


def test_monitor_does_not_count_fake_negatives() -> None:
    """Fake-negative stream at a true CTR of 0.1: the monitor's label rate is 0.1 (final
    labels), not 0.1 / 1.1 (the stream's) and not lower (clicks still on their way)."""
    rng = np.random.default_rng(0)
    assert Settings().join.delayed_feedback == "fake_negative"  # the worker's default
    join = JoinConfig(window_s=2000.0, lateness_s=0.0, delayed_feedback="fake_negative")
    settings = Settings(join=join)
    assert settings.ranker.loss == "fnw"
    mon = MonitorService(settings, StreamrecMetrics(registry=CollectorRegistry()))
    n, b = 20_000, 500
    clicked = rng.random(n) < 0.1
    for start in range(0, n, b):  # one impression a second
        ids = [f"i{k}" for k in range(start, start + b)]
        mon.observe(_batch(ids, [float(k) for k in range(start, start + b)], [0] * b, 0.1))
        # the clicks of the previous batch's impressions arrive now (inside the window)
        back = [k for k in range(max(0, start - b), start) if clicked[k]]
        mon.observe(_batch([f"i{k}" for k in back], [float(k) for k in back], [1] * len(back), 0.1))
    assert mon.n_seen > 0.8 * n
    assert mon.outcomes is not None and mon.outcomes.late_positives == 0
    rate = mon.served.lifetime().actual_ctr
    assert rate == pytest.approx(clicked[: mon.n_seen].mean(), abs=1e-9)


def test_a_batch_spanning_more_than_a_window_is_resolved_record_by_record() -> None:
    fo = FinalOutcomes(window_s=10.0)
    fo.add(["a", "b", "c"], ts=[0.0, 15.0, 30.0], label=[0, 0, 0], columns={"p": [1.0, 2.0, 3.0]})
    fo.add(["b"], ts=[15.0], label=[1], columns={"p": [9.0]})
    out = fo.resolve()  # clock 30: a (0) and b (15) are due, c is not
    assert out["p"].tolist() == [1.0, 2.0] and out["label"].tolist() == [0.0, 1.0]
    assert fo.pending == 1


def test_monitor_judges_final_labels_on_the_dfm_stream() -> None:
    """DFM stream at a true CTR of 0.1, delays ~Exp(60 s), T = 30 s: the records' label
    rate is 0.1 (1 - e^-0.5) ~ 0.04; the monitor's, on final labels, is the clicks' 0.1
    (each impression once: its click-time positive or its unclicked record, made 1 by a
    weight-0 late click)."""
    rng = np.random.default_rng(1)
    join = JoinConfig(window_s=600.0, lateness_s=0.0, delayed_feedback="dfm", dfm_observe_s=30.0)
    settings = Settings(join=join)
    assert settings.ranker.loss == "dfm"  # "bce" on the DFM stream is read as DFM
    mon = MonitorService(settings, StreamrecMetrics(registry=CollectorRegistry()))
    assert mon.outcomes is not None and mon.outcomes.positives_first
    n = 20_000
    ts = np.arange(n, dtype=np.float64)  # one impression a second
    clicked = rng.random(n) < 0.1
    delay = rng.exponential(60.0, n)
    events = []  # (event time, impression, label) in the order the joiner sends them
    for k in range(n):
        if clicked[k] and delay[k] <= 30.0:
            events.append((ts[k] + delay[k], k, 1))
        else:
            events.append((ts[k] + 30.0, k, 0))
            if clicked[k] and delay[k] <= 600.0:
                events.append((ts[k] + delay[k], k, 1))  # the weight-0 late click
    events.sort()
    for start in range(0, len(events), 500):
        part = events[start : start + 500]
        mon.observe(_batch([f"i{k}" for _, k, _ in part], [ts[k] for _, k, _ in part],
                           [lab for _, _, lab in part], 0.1))  # fmt: skip
    assert mon.n_seen > 0.8 * n and mon.outcomes.late_positives == 0
    final = clicked & (delay <= 600.0)
    assert mon.served.lifetime().actual_ctr == pytest.approx(final[: mon.n_seen].mean(), abs=1e-9)
    first_records = sum(1 for k in range(n) if clicked[k] and delay[k] <= 30.0)
    assert first_records < 0.6 * final.sum()  # most clicks came after T: the records alone are low


def test_the_joiners_marks_close_windows_no_later_impression_passes() -> None:
    """The end of a replay: no impression comes after the last ones, so the newest
    impression time never passes their windows; the joiner's marks (one per input
    partition, a watermark: lateness taken off) do, once every partition has one."""
    join = JoinConfig(window_s=60.0, lateness_s=5.0, delayed_feedback="fake_negative")
    mon = MonitorService(
        Settings(join=join, partitions=2), StreamrecMetrics(registry=CollectorRegistry())
    )
    ids = [f"i{k}" for k in range(10)]
    mon.observe(_batch(ids, [100.0 + k for k in range(10)], [0] * 10, 0.1))
    mon.observe(_batch(["i3"], [103.0], [1], 0.1))  # i3's click
    assert mon.n_seen == 0  # no later impression: nothing judged
    marks_only = dataclasses.replace(_batch([], [], [], 0.1), marks={0: 200.0})
    mon.observe(marks_only)
    assert mon.n_seen == 0  # partition 1 has said nothing yet: it may still hold clicks
    mon.observe(dataclasses.replace(marks_only, marks={1: 170.0}))
    # clock = min(200, 170) + 5 = 175; due: ts < 175 - 65 = 110: all ten
    assert mon.n_seen == 10
    assert mon.served.lifetime().actual_ctr == pytest.approx(0.1)  # i3 clicked, once
    # an older mark moves nothing back; a partition the settings do not have is ignored
    mon.observe(dataclasses.replace(marks_only, marks={1: 120.0, 7: 1e9}))
    assert mon.marks == {0: 200.0, 1: 170.0}


def test_marks_resolve_up_to_the_lowest_partition_only() -> None:
    join = JoinConfig(window_s=60.0, lateness_s=0.0, delayed_feedback="fake_negative")
    mon = MonitorService(
        Settings(join=join, partitions=2), StreamrecMetrics(registry=CollectorRegistry())
    )
    mon.observe(_batch(["a", "b", "c"], [100.0, 130.0, 160.0], [0, 0, 0], 0.1))
    mon.observe(dataclasses.replace(_batch([], [], [], 0.1), marks={0: 1000.0, 1: 195.0}))
    # clock 195: due ts < 135: a and b, not c
    assert mon.n_seen == 2 and mon.outcomes is not None and mon.outcomes.pending == 1


@pytest.mark.parametrize("positives_first", [False, True])
def test_a_positive_in_the_batch_of_its_impressions_record_is_never_late(
    positives_first: bool,
) -> None:
    """A trainer batch of a fast replay may span more than a window of event time: an
    old impression's provisional record and its click in the same batch, behind the
    clock, are one clicked impression, not a late positive."""
    fo = FinalOutcomes(window_s=10.0, positives_first=positives_first)
    fo.add(["z"], ts=[100.0], label=[0], columns={"p": [0.5]})  # the clock is at 100
    fo.add(["a", "a", "b"], ts=[1.0, 1.0, 2.0], label=[0, 1, 0], columns={"p": [0.1] * 3})
    assert fo.late_positives == 0
    out = fo.resolve()
    assert dict(zip(out["ts"].tolist(), out["label"].tolist(), strict=True)) == {1.0: 1.0, 2.0: 0.0}
    fo.add(["c"], ts=[3.0], label=[1], columns={"p": [0.1]})  # alone, behind the clock: late
    assert fo.late_positives == 1


def test_once_marked_only_marks_move_the_clock_and_a_stalled_partition_holds() -> None:
    """Partition 1 is read more slowly: its impressions' clicks are behind partition 0's
    newest impression time. Once every partition has a mark, newer impressions no longer
    resolve anything. A partition whose mark stands still holds the others back however
    long it lasts: its joiner may be stalled with clicks still to send (a quiet partition
    is its joiner's to mark, see test_join_idle)."""
    join = JoinConfig(
        window_s=60.0, lateness_s=0.0, delayed_feedback="fake_negative", idle_timeout_s=0.01
    )
    mon = MonitorService(
        Settings(join=join, partitions=2), StreamrecMetrics(registry=CollectorRegistry())
    )
    mon.observe(_batch(["a", "b"], [100.0, 110.0], [0, 0], 0.1))
    mon.observe(dataclasses.replace(_batch([], [], [], 0.1), marks={0: 150.0, 1: 120.0}))
    assert mon.n_seen == 0  # clock 120: nothing older than 60
    # partition 0 races ahead: its impression at 500 would have resolved a and b
    mon.observe(_batch(["c"], [500.0], [0], 0.1))
    assert mon.n_seen == 0
    mon.observe(_batch(["a"], [100.0], [1], 0.1))  # a's click, read late on partition 1
    mon.observe(dataclasses.replace(_batch([], [], [], 0.1), marks={0: 600.0, 1: 171.0}))
    assert mon.n_seen == 2 and mon.outcomes is not None and mon.outcomes.late_positives == 0
    assert mon.served.lifetime().actual_ctr == 0.5  # a clicked, b not
    # partition 1's joiner stalls (its mark stands at 171) past the idle timeout: c (500)
    # waits, so c's click, sent after the stall, is not late
    time.sleep(0.05)
    for mark in (700.0, 800.0, 900.0):
        mon.observe(dataclasses.replace(_batch([], [], [], 0.1), marks={0: mark}))
    assert mon.n_seen == 2 and mon.outcomes.pending == 1
    # the gauges show which partition holds the monitor, and what waits for it
    mon.publish()
    r = mon.metrics.registry
    assert r.get_sample_value("streamrec_monitor_mark_seconds", {"partition": "1"}) == 171.0
    assert r.get_sample_value("streamrec_monitor_mark_seconds", {"partition": "0"}) == 900.0
    assert r.get_sample_value("streamrec_monitor_pending_impressions") == 1
    mon.observe(_batch(["c"], [500.0], [1], 0.1))
    mon.observe(dataclasses.replace(_batch([], [], [], 0.1), marks={1: 700.0}))
    assert mon.n_seen == 3 and mon.outcomes.late_positives == 0
    assert mon.served.lifetime().actual_ctr == pytest.approx(2 / 3)


def test_from_the_first_mark_on_impression_times_close_nothing() -> None:
    join = JoinConfig(window_s=60.0, lateness_s=0.0, delayed_feedback="fake_negative")
    mon = MonitorService(
        Settings(join=join, partitions=2), StreamrecMetrics(registry=CollectorRegistry())
    )
    # no marks yet (an older joiner): the newest impression time closes windows
    mon.observe(_batch(["a", "b"], [100.0, 1000.0], [0, 0], 0.1))
    assert mon.n_seen == 1
    # a joiner that sends marks: partition 1 has not said anything yet, so nothing closes
    mon.observe(dataclasses.replace(_batch([], [], [], 0.1), marks={0: MIN_TS}))
    mon.observe(_batch(["c"], [5000.0], [0], 0.1))
    assert mon.n_seen == 1
    mon.observe(dataclasses.replace(_batch([], [], [], 0.1), marks={0: 1100.0, 1: 1070.0}))
    assert mon.n_seen == 2  # b (1000) closed at 1070; c waits


def test_late_positives_are_counted_in_the_metrics() -> None:
    join = JoinConfig(window_s=60.0, lateness_s=0.0, delayed_feedback="fake_negative")
    metrics = StreamrecMetrics(registry=CollectorRegistry())
    mon = MonitorService(Settings(join=join, partitions=1), metrics)
    mon.observe(_batch(["a"], [100.0], [0], 0.1))
    mon.observe(dataclasses.replace(_batch([], [], [], 0.1), marks={0: 200.0}))
    assert mon.n_seen == 1  # a judged unclicked
    mon.observe(_batch(["a", "b"], [100.0, 150.0], [1, 1], 0.1))  # a's click, too late
    late = metrics.registry.get_sample_value("streamrec_monitor_late_positives_total")
    assert late == 1 and mon.outcomes is not None and mon.outcomes.late_positives == 1


def test_max_pending_judges_the_oldest_early_when_the_clock_stands_still() -> None:
    """A stalled joiner holds the marks (the clock): at most max_pending records wait,
    the oldest beyond it are judged on the clicks known then, counted as forced."""
    fo = FinalOutcomes(window_s=60.0, max_pending=5)
    fo.advance(0.0)
    fo.add(["a", "b", "c"], ts=[1.0, 2.0, 3.0], label=[0, 0, 0], columns={"p": [0.1] * 3})
    fo.add(["b"], ts=[2.0], label=[1], columns={"p": [0.2]})
    assert fo.resolve() == {} and fo.forced == 0
    fo.add(["d", "e", "f", "g"], ts=[4.0, 5.0, 6.0, 7.0], label=[0] * 4,
           columns={"p": [0.1] * 4})  # fmt: skip
    out = fo.resolve()  # 7 waiting, 5 allowed: a and b, split off the first chunk's front
    assert out["ts"].tolist() == [1.0, 2.0] and out["label"].tolist() == [0.0, 1.0]
    assert fo.forced == 2 and fo.pending == 5
    fo.advance(63.5)  # the clock moves again: c (3.0) is due, d.. are not
    out = fo.resolve()
    assert out["ts"].tolist() == [3.0] and fo.forced == 2 and fo.pending == 4
    with pytest.raises(ValueError, match="max_pending"):
        FinalOutcomes(window_s=1.0, max_pending=0)


def test_the_monitor_counts_impressions_judged_early_for_its_bound() -> None:
    join = JoinConfig(window_s=60.0, lateness_s=0.0, delayed_feedback="fake_negative")
    settings = Settings(join=join, partitions=1, monitor=MonitorConfig(max_pending=3))
    metrics = StreamrecMetrics(registry=CollectorRegistry())
    mon = MonitorService(settings, metrics)
    mon.observe(dataclasses.replace(_batch([], [], [], 0.1), marks={0: 0.0}))
    mon.observe(_batch(["a", "b", "c", "d", "e"], [1.0, 2.0, 3.0, 4.0, 5.0], [0] * 5, 0.1))
    assert mon.n_seen == 2
    forced = metrics.registry.get_sample_value("streamrec_monitor_forced_total")
    assert forced == 2
