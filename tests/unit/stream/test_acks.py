"""stream.acks: a record is acked exactly when all it carried is safe, never twice."""

from __future__ import annotations

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
