"""Batched event envelopes: many events of one topic partition in one Kafka record.

Faust pays its per-record machinery (futures, sensors, an event-loop yield) once per Kafka
record, not per event; a record that carries a few hundred events pays it once for all of
them. A record on ``impressions`` or ``clicks`` is EITHER one JSON event (any producer,
see :mod:`logs.events`) OR an envelope:

======  =======  ==============================================================
bytes   field    value
======  =======  ==============================================================
0..3    magic    ``FF 53 52 45`` (``0xFF`` then ``"SRE"``; never valid UTF-8 JSON)
4       version  ``01``
5..     body     MessagePack map ``{"k": kind, "e": [event, ...]}``
======  =======  ==============================================================

``kind`` is ``"impressions"`` or ``"clicks"`` (it must match the topic); each ``event`` is
a MessagePack map with exactly the fields of the JSON event (``impression_id``, ``ts``,
``user_id``, ... see ``docs/LOG_FORMAT.md``). All events of an envelope must belong to the
record's partition: the producer computes it with Kafka's default partitioner (murmur2 of
the event's key), like a single-event producer would, so co-partitioning holds
(:class:`stream.producer.EventProducer` does this). Watermarks stay single JSON records.

Validation is per event: a bad event inside an envelope is rejected alone (its own
:class:`~logs.events.InvalidEvent` reason) and the others proceed; an envelope that
cannot be decoded at all is rejected whole (``bad_envelope``, or ``unsupported_version``).

>>> from logs.events import Click
>>> raw = encode_envelope("clicks", [{"impression_id": "a", "ts": 1700000000.0}])
>>> raw[:5]
b'\\xffSRE\\x01'
>>> decoded = decode_envelope(raw, "clicks")
>>> decoded[0][0]
Click(impression_id='a', ts=1700000000.0, conversion=False)
>>> decode_envelope(encode_envelope("clicks", [{"impression_id": "a"}]), "clicks")[0][0]
InvalidEvent("missing_field: field 'ts' is required")
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import msgspec

from logs.events import (
    MAX_EVENT_BYTES,
    TOPIC_CLICKS,
    TOPIC_IMPRESSIONS,
    Click,
    Impression,
    InvalidEvent,
    input_from_obj,
)

__all__ = [
    "ENVELOPE_MAGIC",
    "ENVELOPE_VERSION",
    "MAX_ENVELOPE_EVENTS",
    "decode_envelope",
    "encode_envelope",
    "encode_envelope_raw",
    "is_envelope",
]

ENVELOPE_MAGIC = b"\xffSRE"
ENVELOPE_VERSION = 1
_HEADER = ENVELOPE_MAGIC + bytes([ENVELOPE_VERSION])
#: Events per envelope accepted by the decoder (the producer sends far fewer).
MAX_ENVELOPE_EVENTS = 100_000
_KINDS = (TOPIC_IMPRESSIONS, TOPIC_CLICKS)


class _Body(msgspec.Struct):
    k: str
    e: list[msgspec.Raw]


_encoder = msgspec.msgpack.Encoder()
_body_decoder = msgspec.msgpack.Decoder(_Body)
_event_decoder = msgspec.msgpack.Decoder()


def is_envelope(raw: bytes | None) -> bool:
    """Whether a record's value is an envelope (by its magic bytes)."""
    return raw is not None and raw[:4] == ENVELOPE_MAGIC


def encode_envelope(kind: str, events: Sequence[Mapping[str, Any]]) -> bytes:
    """One envelope of ``events`` (JSON-shaped dicts) of topic ``kind``."""
    if kind not in _KINDS:
        raise ValueError(f"kind must be one of {_KINDS}, got {kind!r}")
    return _HEADER + _encoder.encode({"k": kind, "e": list(events)})


def encode_envelope_raw(kind: str, events: Sequence[bytes]) -> bytes:
    """One envelope of events already encoded as MessagePack maps (no re-encoding)."""
    if kind not in _KINDS:
        raise ValueError(f"kind must be one of {_KINDS}, got {kind!r}")
    return _HEADER + _encoder.encode({"k": kind, "e": [msgspec.Raw(b) for b in events]})


def decode_envelope(
    raw: bytes, topic: str
) -> list[tuple[Impression | Click, bytes] | tuple[InvalidEvent, bytes]]:
    """Decode and validate an envelope read from ``topic``.

    Returns one ``(event, event_bytes)`` per event, in order, where ``event`` is the
    validated :class:`Impression` / :class:`Click` or the :class:`InvalidEvent` that rejects
    it alone; ``event_bytes`` are its MessagePack bytes (for a dead letter).

    Raises:
        InvalidEvent: ``unsupported_version`` or ``bad_envelope`` for the whole record.
    """
    if raw[:4] != ENVELOPE_MAGIC or len(raw) < 5:
        raise InvalidEvent("bad_envelope", "no envelope header")
    if raw[4] != ENVELOPE_VERSION:
        raise InvalidEvent("unsupported_version", f"envelope version {raw[4]}; this worker reads 1")
    try:
        body = _body_decoder.decode(memoryview(raw)[5:])
    except (msgspec.DecodeError, RecursionError) as exc:
        raise InvalidEvent("bad_envelope", str(exc)[:200]) from None
    if body.k != topic:
        raise InvalidEvent("bad_envelope", f"an envelope of {body.k[:40]!r} on {topic!r}")
    if len(body.e) > MAX_ENVELOPE_EVENTS:
        raise InvalidEvent("too_large", f"{len(body.e)} events > {MAX_ENVELOPE_EVENTS}")
    out: list[tuple[Impression | Click, bytes] | tuple[InvalidEvent, bytes]] = []
    for item in body.e:
        b = bytes(item)
        try:
            if len(b) > MAX_EVENT_BYTES:
                raise InvalidEvent("too_large", f"{len(b)} bytes > {MAX_EVENT_BYTES}")
            try:
                obj = _event_decoder.decode(b)
            except (msgspec.DecodeError, RecursionError) as exc:
                raise InvalidEvent("bad_envelope", str(exc)[:200]) from None
            if not isinstance(obj, dict):
                raise InvalidEvent("not_an_object", f"event is a {type(obj).__name__}")
            out.append((input_from_obj(obj, topic), b))
        except InvalidEvent as exc:
            out.append((exc, b))
    return out
