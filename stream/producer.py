"""A producer of impressions and clicks for applications and ``streamrec replay``.

:class:`EventProducer` groups events by the partition Kafka's default partitioner gives
their key (murmur2, exactly what a single-event producer keyed the same way gets) and
sends each group as one envelope (:mod:`stream.envelope`) when it holds ``max_events``
events or ``max_bytes`` bytes, or when its oldest event waited ``linger_s``, or on
:meth:`EventProducer.flush`. The joiner then pays Faust's per-record cost once per
envelope instead of once per event.

Usage (an application)::

    from kafka import KafkaProducer
    p = EventProducer(KafkaProducer(bootstrap_servers="localhost:9092"))
    p.send_impression({"impression_id": "a", "ts": 1.7e9, "user_id": "u", "item_id": "i"})
    p.send_click({"impression_id": "a", "ts": 1.7e9 + 5, "user_id": "u"})
    p.flush()
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from functools import lru_cache
from typing import Any

import msgspec
from kafka.partitioner.default import murmur2

from logs.events import TOPIC_CLICKS, TOPIC_IMPRESSIONS
from stream.envelope import encode_envelope_raw

__all__ = ["EventProducer", "partition_of"]

#: Envelope size limit of the producer (well below the broker's 1 MiB message default).
DEFAULT_MAX_BYTES = 512 * 1024


@lru_cache(maxsize=1 << 16)
def partition_of(key: bytes, n_partitions: int) -> int:
    """Kafka's default partition of ``key`` among ``n_partitions`` (murmur2, Java-compatible)."""
    return (murmur2(key) & 0x7FFFFFFF) % n_partitions


class EventProducer:
    """Batches events per topic partition into envelopes on a kafka-python producer.

    Args:
        producer: a ``kafka.KafkaProducer`` (raw bytes values; the caller owns it).
        max_events: events per envelope at most.
        max_bytes: bytes per envelope at most (one event larger than this goes alone).
        linger_s: an envelope waits at most this long (wall seconds, checked on each send
            and by :meth:`poll`) before it is sent.
        key_field: the event field whose value keys the partition (the same field that
            single-event producers use as the record key).
    """

    def __init__(
        self,
        producer: Any,
        *,
        max_events: int = 1000,
        max_bytes: int = DEFAULT_MAX_BYTES,
        linger_s: float = 0.005,
        key_field: str = "user_id",
    ) -> None:
        if max_events < 1 or max_bytes < 64:
            raise ValueError("max_events must be >= 1 and max_bytes >= 64")
        self.producer = producer
        self.max_events = max_events
        self.max_bytes = max_bytes
        self.linger_s = linger_s
        self.key_field = key_field
        self._n: dict[str, int] = {}
        self._buf: dict[tuple[str, int], list[bytes]] = {}
        self._size: dict[tuple[str, int], int] = {}
        self._since: dict[tuple[str, int], float] = {}
        self._enc = msgspec.msgpack.Encoder()
        self.envelopes = 0
        self.events = 0

    def n_partitions(self, topic: str) -> int:
        n = self._n.get(topic)
        if n is None:
            parts = self.producer.partitions_for(topic)
            if not parts:
                raise RuntimeError(f"topic {topic!r} does not exist; create it first")
            n = self._n[topic] = len(parts)
        return n

    def send_impression(self, event: Mapping[str, Any]) -> None:
        self.send(TOPIC_IMPRESSIONS, event)

    def send_click(self, event: Mapping[str, Any]) -> None:
        self.send(TOPIC_CLICKS, event)

    def send(self, topic: str, event: Mapping[str, Any]) -> None:
        """Queue one event (a JSON-shaped dict) of ``topic``."""
        k = event.get(self.key_field)
        # a click without the key field (user_id) falls back to its impression_id
        key = str(event["impression_id"] if k is None else k).encode()
        tp = (topic, partition_of(key, self.n_partitions(topic)))
        b = self._enc.encode(event)
        buf = self._buf.get(tp)
        if buf is None:
            buf = self._buf[tp] = []
            self._size[tp] = 0
            self._since[tp] = time.monotonic()
        elif self._size[tp] + len(b) > self.max_bytes:
            self._send(tp)
            buf = self._buf[tp] = []
            self._size[tp] = 0
            self._since[tp] = time.monotonic()
        buf.append(b)
        self._size[tp] += len(b)
        self.events += 1
        if len(buf) >= self.max_events:
            self._send(tp)
        elif self.events % 256 == 0:
            self.poll()

    def poll(self) -> None:
        """Send every envelope whose oldest event waited ``linger_s``."""
        now = time.monotonic()
        for tp in [tp for tp, t in self._since.items() if now - t >= self.linger_s]:
            self._send(tp)

    def flush(self, timeout: float | None = None) -> None:
        """Send every queued envelope and wait for the producer to deliver them."""
        for tp in list(self._buf):
            self._send(tp)
        self.producer.flush(timeout=timeout)

    def send_pending(self) -> None:
        """Send every queued envelope without waiting for delivery (keeps order with later
        records of the same partitions, e.g. watermarks)."""
        for tp in list(self._buf):
            self._send(tp)

    def _send(self, tp: tuple[str, int]) -> None:
        buf = self._buf.pop(tp, None)
        self._size.pop(tp, None)
        self._since.pop(tp, None)
        if not buf:
            return
        topic, partition = tp
        self.producer.send(topic, value=encode_envelope_raw(topic, buf), partition=partition)
        self.envelopes += 1
