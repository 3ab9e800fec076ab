"""The join room's durable state: the :class:`JoinState` protocol (its key layout) and
:class:`MemoryJoinState`, and the encodings of its entries: a pending impression
(:func:`pending_value`) and the feature journal's deltas (:func:`delta_chunks`, replayed by
:func:`replay_features`). :class:`stream.services.JoinService` writes and restores it.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any, Protocol

import msgspec

from features.config import ClickEvent, ImpressionEvent
from features.stage import FeatureStage, paused_gc
from logs.events import Impression


class JoinState(Protocol):
    """The joiner's durable state, per input partition: a Faust table with a changelog in the
    worker (:class:`stream.app.TableJoinState`), :class:`MemoryJoinState` in process.

    Keys inside a partition: ``i/<impression_id>`` a pending impression (value: JSON
    ``{"i": impression, "c": in-window click ts or null}``) or, once its label is sent, a
    labelled one kept for the dedup horizon (``{"d": label, "t": label ts, "i": impression
    (negatives only, for a late click's correction)}``), ``c/<impression_id>`` an orphan
    click waiting for its impression (value: the click ts), ``w`` the event time reached on
    each input (value: JSON ``{"impressions": ts, "clicks": ts}``).
    """

    def put(self, partition: int, key: str, value: bytes) -> None: ...

    def delete(self, partition: int, key: str) -> None: ...

    def items(self, partition: int) -> Iterable[tuple[str, bytes]]: ...

    def flush(self, partitions: Iterable[int] | None = None) -> int:
        """Make buffered changes durable (:class:`stream.segments.SegmentedState`); the
        inputs that caused them may be committed after it. Returns records written."""
        ...

    def drop(self, partitions: Iterable[int]) -> None:
        """Forget what this worker holds of revoked partitions (not their durable state)."""
        ...


class MemoryJoinState:
    """:class:`JoinState` in a dict (tests, in-process runs); not durable."""

    def __init__(self) -> None:
        self.data: dict[int, dict[str, bytes]] = {}

    def put(self, partition: int, key: str, value: bytes) -> None:
        self.data.setdefault(partition, {})[key] = value

    def delete(self, partition: int, key: str) -> None:
        self.data.get(partition, {}).pop(key, None)

    def items(self, partition: int) -> Iterable[tuple[str, bytes]]:
        return list(self.data.get(partition, {}).items())

    def flush(self, partitions: Iterable[int] | None = None) -> int:
        return 0  # every change is in place at once

    def drop(self, partitions: Iterable[int]) -> None:
        pass  # the dict plays the durable store: it outlives the worker's view of it

    def __len__(self) -> int:
        return sum(len(d) for d in self.data.values())


_json = msgspec.json.Encoder()


def state_json(imp: Impression) -> bytes:
    """``imp`` as the JSON object the join state keeps (the fields of
    :meth:`~logs.events.Impression.to_dict`; UTF-8, not ``\\u``-escaped). msgspec's encoder:
    the state writes one per impression, and the standard library's ``json.dumps`` was ~13%
    of the join path (``bench.joiner`` profile). Parsed back by the standard library's
    ``json.loads``; every float round-trips (the impression is validated finite).

    >>> state_json(Impression("a", 1.7e9, "u", "\u00e9", features={"x": 0.1}))
    b'{"impression_id":"a","ts":1700000000.0,"user_id":"u","item_id":"\xc3\xa9","features":{"x":0.1}}'
    """
    return _json.encode(imp.to_dict())


def pending_value(imp: Impression, click_ts: float | None) -> bytes:
    """The value of a pending impression's ``i/<impression_id>`` entry."""
    return b'{"c":%s,"i":%s}' % (b"null" if click_ts is None else repr(click_ts).encode(),
                                 state_json(imp))  # fmt: skip


def snapshot_json(stage: FeatureStage) -> bytes:
    """The stage's whole state (:meth:`~features.stage.FeatureStage.state_dict`) as JSON,
    with the cyclic garbage collector paused and msgspec's encoder: with the collector on
    and ``json.dumps``, a 21 MB snapshot (76k keys) took ~3.7 s of the worker's event loop,
    this way ~0.45 s. Parsed back by :func:`load_json`; the same JSON either way."""
    with paused_gc():
        return _json.encode(stage.state_dict())


def load_json(raw: bytes) -> Any:
    """Parse a (possibly large) JSON state entry with the collector paused (``ValueError``
    if it is not JSON; the standard library's ``NaN`` / ``Infinity`` spellings, which
    msgspec refuses, are still read)."""
    with paused_gc():
        try:
            return msgspec.json.decode(raw)
        except msgspec.DecodeError:
            return json.loads(raw)


def delta_chunks(calls: list[list[Any]], size: int) -> list[bytes]:
    """``calls`` as JSON lists of at most about ``size`` bytes each (a call over it alone)."""
    out: list[bytes] = []
    part: list[bytes] = []
    n = 0
    for call in calls:
        b = _json.encode(call)
        if part and n + len(b) + 1 > size:
            out.append(b"[" + b",".join(part) + b"]")
            part, n = [], 0
        part.append(b)
        n += len(b) + 1
    if part:
        out.append(b"[" + b",".join(part) + b"]")
    return out


def replay_features(stage: FeatureStage, calls: list[list[Any]]) -> None:
    """Apply journalled stage calls in order (see
    :meth:`stream.services.JoinService.save_features`)."""
    events: list[ImpressionEvent | ClickEvent] = []
    for c in calls:
        if c[0] == "i":
            events.append(ImpressionEvent(c[1], float(c[2]), c[3], c[4], c[5], c[6]))
        elif c[0] == "c":
            events.append(ClickEvent(c[1], float(c[2])))
        else:
            raise ValueError(f"unknown feature journal call {c[0]!r}")
    stage.process(events)  # one batch (the same state as call by call), GC paused
