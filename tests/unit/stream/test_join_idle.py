"""Idle inputs must not stall the joiner's watermark forever (wall-clock idleness)."""

from __future__ import annotations

import json
import time

import pytest

from logs.events import MIN_TS, Impression
from monitoring.metrics import StreamrecMetrics
from stream.join import JoinConfig, OnlineJoiner
from stream.services import JoinService
from stream.services.join import STALL_S
from stream.settings import Settings


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_quiet_click_stream_holds_the_watermark_until_the_idle_timeout() -> None:
    clock = FakeClock()
    j = OnlineJoiner(JoinConfig(window_s=60, lateness_s=0, idle_timeout_s=30), clock=clock)
    assert j.on_impression(Impression("a", 100.0, "u", "i")) == []
    clock.now += 10
    assert j.on_impression(Impression("b", 500.0, "u", "i")) == []  # clicks not idle yet
    clock.now += 25  # clicks silent for 35 s of wall time
    out = j.on_impression(Impression("c", 501.0, "u", "i"))
    assert [(e.impression.impression_id, e.label) for e in out] == [("a", 0)]


def test_idle_timeout_none_keeps_pure_event_time() -> None:
    clock = FakeClock()
    j = OnlineJoiner(JoinConfig(window_s=60, lateness_s=0, idle_timeout_s=None), clock=clock)
    j.on_impression(Impression("a", 100.0, "u", "i"))
    clock.now += 10_000
    assert j.on_impression(Impression("b", 5000.0, "u", "i")) == []


T0 = 1_700_000_000.0


def imp(iid: str, ts: float) -> bytes:
    body = {"impression_id": iid, "ts": T0 + ts, "user_id": "u", "item_id": "i"}
    return json.dumps(body).encode()


def wm(ts: float) -> bytes:
    return json.dumps({"type": "watermark", "ts": T0 + ts}).encode()


@pytest.fixture(autouse=True, scope="module")
def _warm_feature_kernel() -> None:
    """The first impression a process stages loads the feature kernel (numba's cache,
    ~0.3 s): longer than the idle timeouts below, it would make a partition idle."""
    JoinService(Settings(), StreamrecMetrics()).handle(imp("warm", 0.0), "impressions", 0, 0)


def test_an_idle_partition_stops_holding_back_the_others() -> None:
    settings = Settings(join=JoinConfig(window_s=60, lateness_s=0, idle_timeout_s=0.2))
    svc = JoinService(settings, StreamrecMetrics())
    # partition 1 saw early times only, then went quiet
    svc.handle(wm(50.0), "impressions", 1, 0)
    svc.handle(wm(50.0), "clicks", 1, 1)
    svc.handle(imp("a", 100.0), "impressions", 0, 0)
    out, dead = svc.handle(wm(1000.0), "clicks", 0, 1)
    out2, dead2 = svc.handle(wm(1000.0), "impressions", 0, 2)
    assert dead is None and dead2 is None
    assert out + out2 == []  # partition 1's watermark (50) holds partition 0 back
    assert svc.tick() == []
    time.sleep(0.25)  # partition 1 is idle now
    released = svc.tick()
    assert [(e.impression.impression_id, e.label) for e in released] == [("a", 0)]
    labeled = svc.metrics.registry.get_sample_value(
        "streamrec_labeled_total", {"label": "negative"}
    )
    assert labeled == 1


def _behind_and_ahead(join: JoinConfig, impression: bool = True) -> JoinService:
    """Partition 1 at 50 s of event time on both inputs, partition 0 at 1,000 s (with
    impression "a" at 100 s when ``impression``): partition 1 holds partition 0 back."""
    svc = JoinService(Settings(join=join), StreamrecMetrics())
    svc.handle(wm(50.0), "impressions", 1, 0)
    svc.handle(wm(50.0), "clicks", 1, 1)
    if impression:
        svc.handle(imp("a", 100.0), "impressions", 0, 0)
    svc.handle(wm(1000.0), "clicks", 0, 1)
    svc.handle(wm(1000.0), "impressions", 0, 2)
    return svc


def test_a_partition_with_unconsumed_records_is_not_idle() -> None:
    svc = _behind_and_ahead(JoinConfig(window_s=60, lateness_s=0, idle_timeout_s=0.2))
    time.sleep(0.25)
    # partition 1 has a backlog: the consumer is just busy elsewhere
    svc.note_backlog({("impressions", 1): 5000, ("clicks", 1): 0, ("impressions", 0): 0})
    assert svc.tick() == []
    time.sleep(0.25)  # caught up and quiet now
    svc.note_backlog({("impressions", 1): 0, ("clicks", 1): 0})
    assert [e.impression.impression_id for e in svc.tick()] == ["a"]


def test_marks_cover_every_assigned_partition() -> None:
    """A joiner's event-time marks (for the monitor): a partition's watermark capped
    where releases are; MIN_TS while nothing is known. An assigned partition without
    events holds (MIN_TS) until it was quiet for idle_timeout_s: the consumer may not
    have fetched its backlog yet; then its mark is where the worker released
    everything."""
    settings = Settings(join=JoinConfig(window_s=60, lateness_s=5, idle_timeout_s=0.2))
    svc = JoinService(settings, StreamrecMetrics())
    assert svc.marks([0, 3]) == {0: MIN_TS, 3: MIN_TS}
    svc.handle(imp("a", 100.0), "impressions", 0, 0)
    assert svc.marks([0]) == {0: MIN_TS}  # no clicks read yet: no watermark
    svc.handle(wm(1000.0), "clicks", 0, 1)
    svc.handle(wm(900.0), "impressions", 0, 2)
    svc.tick()
    # partition 3 has sent nothing yet: it may hold old impressions, so it holds
    assert svc.marks([0, 3]) == {0: T0 + 895.0, 3: MIN_TS}
    time.sleep(0.25)  # 3 stayed quiet; 0 stays live
    svc.handle(wm(1000.0), "impressions", 0, 3)
    svc.tick()
    assert svc.marks([0, 3]) == {0: T0 + 995.0, 3: T0 + 995.0}
    # a partition revoked and assigned again starts over
    svc.drop([3])
    assert svc.marks([0, 3])[3] == MIN_TS


def test_without_an_idle_timeout_a_partition_without_events_holds() -> None:
    settings = Settings(join=JoinConfig(window_s=60, lateness_s=0, idle_timeout_s=None))
    svc = JoinService(settings, StreamrecMetrics())
    svc.handle(wm(1000.0), "clicks", 0, 1)
    svc.handle(wm(900.0), "impressions", 0, 2)
    svc.tick()
    time.sleep(0.05)
    assert svc.marks([0, 3]) == {0: T0 + 900.0, 3: MIN_TS}


def test_a_quiet_partition_is_marked_where_the_worker_released_everything() -> None:
    """The joiner's idle rule reaches the monitor through the marks: a quiet partition
    (no record and no backlog for idle_timeout_s) is marked at the release point, as it
    stops holding the other partitions back here; until then it holds the marks too."""
    svc = _behind_and_ahead(JoinConfig(window_s=60, lateness_s=0, idle_timeout_s=0.2))
    svc.tick()
    assert svc.marks([0, 1]) == {0: T0 + 50.0, 1: T0 + 50.0}
    time.sleep(0.25)
    # partition 1 has a backlog: not quiet, so its mark still holds
    svc.note_backlog({("impressions", 1): 5000})
    svc.tick()
    assert svc.marks([0, 1]) == {0: T0 + 50.0, 1: T0 + 50.0}
    time.sleep(0.25)  # caught up and quiet now; partition 0 stays live
    svc.handle(wm(1010.0), "clicks", 0, 3)
    svc.handle(wm(1010.0), "impressions", 0, 4)
    svc.tick()
    assert svc.marks([0, 1]) == {0: T0 + 1010.0, 1: T0 + 1010.0}


def test_a_quiet_partition_holding_a_fake_negative_keeps_its_mark() -> None:
    """A fake negative held back (its clicks input behind its time, until the next release
    finds that input idle and sends it) is a label still to send: its partition is not
    marked past it."""
    join = JoinConfig(
        window_s=60, lateness_s=0, idle_timeout_s=0.2, delayed_feedback="fake_negative"
    )
    svc = _behind_and_ahead(join, impression=False)
    time.sleep(0.25)
    svc.handle(wm(1010.0), "clicks", 0, 2)
    svc.handle(wm(1010.0), "impressions", 0, 3)
    svc.tick()
    assert svc.marks([0, 1]) == {0: T0 + 1010.0, 1: T0 + 1010.0}
    j = svc.joiners[1]
    j.held.append(Impression("b", T0 + 80.0, "u", "i"))  # not sent yet
    assert svc.marks([0, 1]) == {0: T0 + 1010.0, 1: T0 + 50.0}


def test_a_stall_of_the_worker_is_not_quiet_time() -> None:
    """After the worker stood still (no record and no timer beat for longer than
    STALL_S), its inputs' backlog is unknown until the next fetch: the stall does not
    count towards idleness, so no partition is marked (or released) past records that
    may be waiting, even when the first record after it comes before the timer."""
    settings = Settings(join=JoinConfig(window_s=60, lateness_s=0, idle_timeout_s=0.2))
    svc = JoinService(settings, StreamrecMetrics())
    svc.handle_record(wm(50.0), "impressions", 1, 0)
    svc.handle_record(wm(50.0), "clicks", 1, 1)
    svc.handle_record(imp("a", 100.0), "impressions", 0, 0)
    svc.handle_record(wm(1000.0), "clicks", 0, 1)
    assert svc.marks([0, 1, 2]) == {0: T0 + 50.0, 1: T0 + 50.0, 2: MIN_TS}
    time.sleep(STALL_S + 0.1)  # stopped: not quiet
    out, _ = svc.handle_record(wm(1000.0), "impressions", 0, 2)  # the first record after
    assert out == [] and svc.tick() == []
    assert svc.marks([0, 1, 2]) == {0: T0 + 50.0, 1: T0 + 50.0, 2: MIN_TS}
    time.sleep(0.25)  # running (a beat) and quiet now
    svc.beat()
    assert [e.impression.impression_id for e in svc.tick()] == ["a"]
    marks = svc.marks([0, 1, 2])
    assert marks[1] == marks[2] == T0 + 1000.0
    svc.note_stall(0.0)  # nothing to take off
    svc.note_stall(100.0)  # at most to now: quiet again after one idle timeout
    time.sleep(0.25)
    assert svc.marks([0, 1, 2])[2] == T0 + 1000.0
