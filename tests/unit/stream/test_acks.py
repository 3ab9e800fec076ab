"""stream.acks: a record is acked exactly when all it carried is safe, never twice."""

from __future__ import annotations

import asyncio
import random

import pytest

from stream.acks import InputAcks, TrainedAcks


class Event:
    def __init__(self, partition: int = 0) -> None:
        self.partition = partition
        self.acks = 0

    def ack(self) -> None:
        self.acks += 1


@pytest.mark.parametrize("seed", range(20))
def test_trained_acks_match_a_naive_count(seed: int) -> None:
    rng = random.Random(seed)
    acks = TrainedAcks()
    events: list[tuple[Event, int]] = []
    buffered = learned = 0
    for _ in range(200):
        if rng.random() < 0.5:
            e, n = Event(), rng.choice([0, 0, 1, 3, 7])
            acks.add(e, n)
            events.append((e, n))
            buffered += n
            acks.learned(0)
        elif buffered > learned:
            step = rng.randint(1, buffered - learned)
            acks.learned(step)
            learned += step
        # naive: a record is safe once every example up to and including its own was learned
        total = 0
        for e, n in events:
            total += n
            assert e.acks == (1 if total <= learned else 0)
    acks.learned(None)
    assert all(e.acks == 1 for e, _ in events) and len(acks) == 0
    with pytest.raises(ValueError, match=">= 0"):
        acks.add(Event(), -1)


def test_input_acks_wait_for_the_flush_and_skip_revoked_partitions() -> None:
    acks = InputAcks(lambda e: e.partition)
    events = [Event(p) for p in (0, 1, 2, 1)]
    for e in events:
        acks.add(e)

    def failing_flush() -> None:
        raise OSError("disk full")

    with pytest.raises(OSError):
        acks.commit(failing_flush)
    assert [e.acks for e in events] == [0, 0, 0, 0] and len(acks) == 4  # kept for next time
    acks.drop_partitions({1})
    acks.commit(lambda: None)
    assert [e.acks for e in events] == [1, 0, 1, 0] and len(acks) == 0


def test_input_acks_commit_up_to_a_mark_keeps_the_later_records() -> None:
    """commit(upto=mark) acks only the records added before the mark, whatever was
    dropped meanwhile; the rest wait for a later commit."""
    acks = InputAcks(lambda e: e.partition)
    events = [Event(p) for p in (0, 1, 0, 1, 0)]
    for e in events[:3]:
        acks.add(e)
    mark = acks.mark()
    for e in events[3:]:
        acks.add(e)
    acks.drop_partitions({1})  # the records of partition 1 go to the next owner
    acks.commit(lambda: None, upto=mark)
    assert [e.acks for e in events] == [1, 0, 1, 0, 0] and len(acks) == 1
    acks.commit(lambda: None, upto=mark)  # nothing before the mark is left
    assert events[4].acks == 0
    acks.commit(lambda: None)
    assert [e.acks for e in events] == [1, 0, 1, 0, 1] and len(acks) == 0


def test_input_acks_wait_for_the_brokers_confirmation_of_every_write() -> None:
    """Faust may commit offsets while its producer buffer still holds changelog writes, so
    records are acked only when the writes of their flush are delivered."""
    loop = asyncio.new_event_loop()
    try:
        unacked: list[int] = []
        acks = InputAcks(lambda e: e.partition, on_failed=unacked.append)
        first = [Event(0), Event(1)]
        for e in first:
            acks.add(e)
        writes = [loop.create_future(), loop.create_future()]
        acks.commit(lambda: writes)
        later = Event(0)
        acks.add(later)
        acks.commit(lambda: [])  # nothing written since: acked at once, before `first`
        assert [e.acks for e in first] == [0, 0] and later.acks == 1
        assert acks.waiting == 2 and len(acks) == 0
        writes[0].set_result("meta")
        loop.run_until_complete(asyncio.sleep(0))
        assert [e.acks for e in first] == [0, 0]  # one write still in flight
        writes[1].set_result("meta")
        loop.run_until_complete(asyncio.sleep(0))
        assert [e.acks for e in first] == [1, 1] and acks.waiting == 0 and acks.failed == 0

        # a failed write: its records are never acked (read again by the next owner)
        lost = [Event(2), Event(3)]
        for e in lost:
            acks.add(e)
        bad = [loop.create_future(), loop.create_future()]
        acks.commit(lambda: bad)
        bad[0].set_exception(OSError("broker gone"))
        bad[1].set_result("meta")
        loop.run_until_complete(asyncio.sleep(0))
        assert [e.acks for e in lost] == [0, 0] and acks.failed == 2 and acks.waiting == 0

        # writes already done when the flush returns: delivered ones ack at once
        done = loop.create_future()
        done.set_result("meta")
        quick = Event(0)
        acks.add(quick)
        acks.commit(lambda: [done])
        assert quick.acks == 1
        cancelled = loop.create_future()
        cancelled.cancel()
        dropped = Event(0)
        acks.add(dropped)
        acks.commit(lambda: [done, cancelled])
        assert dropped.acks == 0 and acks.failed == 3 and unacked == [2, 1]
    finally:
        loop.close()
