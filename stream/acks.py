"""When a consumed record may be acked (so Faust may commit its offset): the two ledgers
of the worker's at-least-once delivery, kept apart from the agents that use them.

- :class:`InputAcks`: an input record (impression or click) changed the join state; its
  changes may sit in an open segment of that state (:mod:`stream.segments`), so it is
  acked only by :meth:`InputAcks.commit`, after the state was flushed to the producer
  (which Faust flushes before it commits offsets).
- :class:`TrainedAcks`: a ``labeled`` record's examples wait in the trainer's buffer; it
  is acked only once every one of them was learned from, so a crash re-delivers buffered
  examples instead of losing them.

Both hold objects with an ``ack()`` method (Faust events) and never ack one twice.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable
from typing import Any, Protocol

__all__ = ["Ackable", "InputAcks", "TrainedAcks"]


class Ackable(Protocol):
    def ack(self) -> Any: ...


class InputAcks:
    """Input records waiting for their state changes to be flushed.

    >>> class E:
    ...     def __init__(self, p): self.partition, self.acked = p, False
    ...     def ack(self): self.acked = True
    >>> acks, flushed = InputAcks(lambda e: e.partition), []
    >>> a, b = E(0), E(1)
    >>> acks.add(a); acks.add(b); len(acks)
    2
    >>> acks.drop_partitions({1})  # revoked: b goes, unacked, to the next owner
    >>> acks.commit(lambda: flushed.append(True)); a.acked, b.acked, flushed, len(acks)
    (True, False, [True], 0)
    """

    def __init__(self, partition_of: Callable[[Any], int]) -> None:
        self._partition_of = partition_of
        self._events: list[Ackable] = []

    def __len__(self) -> int:
        return len(self._events)

    def add(self, event: Ackable) -> None:
        self._events.append(event)

    def commit(self, flush: Callable[[], object]) -> None:
        """``flush()`` the state, then ack every record added so far (not if it raises)."""
        flush()
        for event in self._events:
            event.ack()
        self._events.clear()

    def drop_partitions(self, gone: Iterable[int]) -> None:
        """Forget (without acking) the records of revoked partitions: uncommitted, they go
        to the next owner with their inputs."""
        gone = set(gone)
        self._events = [e for e in self._events if self._partition_of(e) not in gone]


class TrainedAcks:
    """``labeled`` records, oldest first, with how many of their examples are still in the
    trainer's buffer; the buffer is FIFO, so examples leave in the same order.

    >>> class E:
    ...     acked = False
    ...     def ack(self): self.acked = True
    >>> acks, a, b, c = TrainedAcks(), E(), E(), E()
    >>> acks.add(a, 3); acks.add(b, 0); acks.add(c, 2)
    >>> acks.learned(2); a.acked, b.acked
    (False, False)
    >>> acks.learned(1); a.acked, b.acked, c.acked  # b had only duplicates: acked with a
    (True, True, False)
    >>> acks.learned(None); c.acked, len(acks)  # the buffer dropped: everything left
    (True, 0)
    """

    def __init__(self) -> None:
        self._waiting: deque[list[Any]] = deque()  # [event, examples left]

    def __len__(self) -> int:
        return len(self._waiting)

    def add(self, event: Ackable, examples: int) -> None:
        """A record whose ``examples`` (>= 0) entered the buffer."""
        if examples < 0:
            raise ValueError(f"examples must be >= 0, got {examples}")
        self._waiting.append([event, examples])

    def learned(self, n: int | None) -> None:
        """``n`` examples left the buffer, oldest first (None: all of them); records with
        none left are acked, as is any record in front with none (0: only those)."""
        waiting = self._waiting
        while waiting and (n is None or n > 0 or waiting[0][1] == 0):
            item = waiting[0]
            take = item[1] if n is None else min(n, item[1])
            item[1] -= take
            if n is not None:
                n -= take
            if item[1] > 0:
                break
            waiting.popleft()
            item[0].ack()
