"""When a consumed record may be acked (so Faust may commit its offset): the two ledgers
of the worker's at-least-once delivery, kept apart from the agents that use them.

- :class:`InputAcks`: an input record (impression or click) changed the join state; its
  changes may sit in an open segment of that state (:mod:`stream.segments`), so it is
  acked only by :meth:`InputAcks.commit`, after the state was flushed to the producer
  *and the broker confirmed those changelog writes*. Handing them to the producer is not
  enough: Faust's producer buffer gives up flushing after 0.1 s without progress
  (``ProducerBuffer.flush_atmost``) and the consumer then commits offsets anyway, so a
  worker killed right after lost the join state of committed records (seen once in CI).
- :class:`TrainedAcks`: a ``labeled`` record's examples wait in the trainer's buffer; it
  is acked only once every one of them was learned from, so a crash re-delivers buffered
  examples instead of losing them.

Both hold objects with an ``ack()`` method (Faust events) and never ack one twice.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any, Protocol

__all__ = ["Ackable", "InputAcks", "TrainedAcks"]

log = logging.getLogger(__name__)


class Ackable(Protocol):
    def ack(self) -> Any: ...


class InputAcks:
    """Input records waiting for their state changes to be flushed and delivered.

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

    def __init__(
        self, partition_of: Callable[[Any], int], on_failed: Callable[[int], object] | None = None
    ) -> None:
        self._partition_of = partition_of
        self._on_failed = on_failed  # called with the number of records left unacked
        self._events: list[tuple[int, Ackable]] = []  # (position, record), oldest first
        self._added = 0  # records added so far: the next position
        #: records flushed whose writes the broker has not confirmed yet
        self.waiting = 0
        #: records never acked because a write of their flush failed (they are read again
        #: by the partition's next owner: at-least-once)
        self.failed = 0

    def __len__(self) -> int:
        return len(self._events)

    def add(self, event: Ackable) -> None:
        self._events.append((self._added, event))
        self._added += 1

    def mark(self) -> int:
        """A position: :meth:`commit` with ``upto`` this acks only the records added before
        it (a flush that took the labels queued so far must not ack the records handled
        while it awaited the broker: their labels are still queued)."""
        return self._added

    def commit(
        self, flush: Callable[[], Iterable[asyncio.Future[Any]] | None], upto: int | None = None
    ) -> None:
        """``flush()`` the state, then ack every record added so far, or with ``upto`` (a
        :meth:`mark`) only those added before it (not if ``flush`` raises); the others
        wait for a later commit.

        ``flush`` may return the futures of the writes it made (Faust's changelog sends):
        the records are then acked when every one of them is delivered, from their done
        callbacks; a failed or cancelled write leaves them unacked (and counted in
        :attr:`failed`), so their offsets are never committed."""
        writes = list(flush() or ())
        k = len(self._events) if upto is None else sum(1 for pos, _ in self._events if pos < upto)
        events = [e for _, e in self._events[:k]]
        del self._events[:k]
        if any(f.done() and not _delivered(f) for f in writes):  # already failed
            self._fail(events)
            return
        in_flight = [f for f in writes if not f.done()]
        if not in_flight:
            for event in events:
                event.ack()
            return
        self.waiting += len(events)
        left = [len(in_flight), False]  # writes not done, a write failed

        def done(fut: asyncio.Future[Any]) -> None:
            left[0] -= 1
            left[1] = left[1] or not _delivered(fut)
            if left[0]:
                return
            self.waiting -= len(events)
            if left[1]:
                self._fail(events)
            else:
                for event in events:
                    event.ack()

        for f in in_flight:
            f.add_done_callback(done)

    def _fail(self, events: list[Ackable]) -> None:
        self.failed += len(events)
        if self._on_failed is not None:
            self._on_failed(len(events))
        log.error("%d input records left unacked: a write of the join state failed",
                  len(events))  # fmt: skip

    def drop_partitions(self, gone: Iterable[int]) -> None:
        """Forget (without acking) the records of revoked partitions: uncommitted, they go
        to the next owner with their inputs."""
        gone = set(gone)
        self._events = [(k, e) for k, e in self._events if self._partition_of(e) not in gone]


def _delivered(fut: asyncio.Future[Any]) -> bool:
    """A done future that holds a result (neither cancelled nor failed)."""
    return not fut.cancelled() and fut.exception() is None


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
