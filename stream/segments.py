"""A key-value state written as batched segments: one changelog record per flush.

The joiner changes its durable state two or three times per impression (pending, labelled,
forgotten). Written one key per change to a Faust table, each change is one changelog
record, and producing those records took over a third of a worker's CPU (``bench.e2e``).
:class:`SegmentedState` keeps the same logical key-value view but buffers the changes of a
partition in an *open segment* and writes it, on :meth:`SegmentedState.flush`, as one
physical record ``s/<seq>`` (a list of puts and deletes) to an underlying store: the Faust
table. Restoring replays the partition's segments in ``seq`` order.

Garbage collection: only the *last* operation on a key matters to a restore. A put is
needed while it is its key's last operation; a delete is needed while an older segment
that still holds a put of its key exists (else the restore would bring the key back). A
segment none of whose operations is needed is deleted (one tombstone for the whole
segment), which can in turn make deletes in newer segments unneeded. Keys are labelled
roughly in arrival order, so old segments empty out and go; the live segments hold the
live keys plus a bounded number of superseded operations.

Durability contract: a change is durable once :meth:`SegmentedState.flush` handed its
segment to the store and the store made it durable (for the Faust table: once the broker
confirmed the changelog write, see :class:`stream.acks.InputAcks`); the caller acks the
input records that caused the changes only then. A crash before that loses the changes
*and* leaves their inputs uncommitted, so they are processed again: at-least-once.

Segment encoding (bytes): repeated ``key length (uint16 BE) | value length (uint32 BE,
0xFFFFFFFF for a delete) | key (UTF-8) | value``.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol

log = logging.getLogger(__name__)

SEGMENT_PREFIX = "s/"
_HEAD = struct.Struct(">HI")
_DELETE = 0xFFFFFFFF


class KeyValueStore(Protocol):
    """Partitioned bytes store (``stream.app.TableJoinState``, ``MemoryJoinState``)."""

    def put(self, partition: int, key: str, value: bytes) -> None: ...

    def delete(self, partition: int, key: str) -> None: ...

    def items(self, partition: int) -> Iterable[tuple[str, bytes]]: ...


def encode_segment(ops: dict[str, bytes | None]) -> bytes:
    """``{key: value, or None for a delete}`` -> one segment record."""
    parts: list[bytes] = []
    for key, value in ops.items():
        k = key.encode()
        if value is None:
            parts += (_HEAD.pack(len(k), _DELETE), k)
        else:
            parts += (_HEAD.pack(len(k), len(value)), k, value)
    return b"".join(parts)


def decode_segment(data: bytes) -> list[tuple[str, bytes | None]]:
    """The operations of a segment record, in order; ``ValueError`` if it is truncated."""
    ops: list[tuple[str, bytes | None]] = []
    i, n, head = 0, len(data), _HEAD.size
    while i < n:
        if i + head > n:
            raise ValueError(f"segment truncated in a header at byte {i}")
        klen, vlen = _HEAD.unpack_from(data, i)
        i += head
        key = data[i : i + klen].decode()
        i += klen
        if vlen == _DELETE:
            ops.append((key, None))
            continue
        if i + vlen > n:
            raise ValueError(f"segment truncated in the value of {key!r}")
        ops.append((key, data[i : i + vlen]))
        i += vlen
    return ops


def segment_key(seq: int) -> str:
    return f"{SEGMENT_PREFIX}{seq:012d}"


@dataclass
class _Partition:
    """One partition's bookkeeping (see the module docstring)."""

    next_seq: int = 0
    open: dict[str, bytes | None] = field(default_factory=dict)  # the open segment's ops
    open_bytes: int = 0
    last: dict[str, tuple[int, bool]] = field(default_factory=dict)  # key -> (seq, is put)
    copies: dict[str, int] = field(default_factory=dict)  # key -> live segments holding it
    keys: dict[int, list[str]] = field(default_factory=dict)  # live seq -> its keys
    needed: dict[int, int] = field(default_factory=dict)  # live seq -> needed operations
    live_puts: int = 0  # keys whose last flushed operation is a put


class SegmentedState:
    """The joiner's :class:`stream.services.JoinState` over ``store``, batched into
    segments. ``max_ops`` / ``max_bytes``: an open segment this large is flushed by the
    next :meth:`put` (the store's records stay far below Kafka's 1 MB message limit)."""

    def __init__(self, store: KeyValueStore, max_ops: int = 4000, max_bytes: int = 256 * 1024):
        self.store = store
        self.max_ops = max_ops
        self.max_bytes = max_bytes
        self.parts: dict[int, _Partition] = {}
        self.segments_written = 0
        self.segments_deleted = 0

    # --- the JoinState interface ----------------------------------------------------------

    def put(self, partition: int, key: str, value: bytes) -> None:
        p = self._part(partition)
        p.open_bytes += len(key) + len(value) + _HEAD.size  # an overwrite over-counts: safe
        p.open[key] = value
        if len(p.open) >= self.max_ops or p.open_bytes >= self.max_bytes:
            self._flush(partition, p)

    def delete(self, partition: int, key: str) -> None:
        p = self._part(partition)
        if key in p.open and p.copies.get(key, 0) == 0:
            # put in the open segment only: the put and its delete cancel out
            p.open.pop(key)
            return
        if key in p.copies:
            p.open[key] = None
            p.open_bytes += len(key) + _HEAD.size
        # else: never written (or long gone): nothing to delete

    def items(self, partition: int) -> list[tuple[str, bytes]]:
        """The logical ``(key, value)`` pairs of ``partition``, flushed or not (reads the
        store: meant for the restore of a partition)."""
        p = self._part(partition)
        view: dict[str, bytes] = {}
        for _, ops in self._segments(partition):
            for key, value in ops:
                if value is None:
                    view.pop(key, None)
                else:
                    view[key] = value
        for key, maybe in p.open.items():
            if maybe is None:
                view.pop(key, None)
            else:
                view[key] = maybe
        return list(view.items())

    def __len__(self) -> int:
        """Logical keys whose last flushed operation is a put (open segments excluded)."""
        return sum(p.live_puts for p in self.parts.values())

    # --- flushing and partitions ---------------------------------------------------------

    def dirty(self) -> bool:
        return any(p.open for p in self.parts.values())

    def flush(self, partitions: Iterable[int] | None = None) -> int:
        """Write the open segment of every partition (or of ``partitions``) that has one;
        returns how many segments were written."""
        chosen = self.parts if partitions is None else {
            q: self.parts[q] for q in partitions if q in self.parts
        }  # fmt: skip
        return sum(self._flush(q, p) for q, p in chosen.items())

    def drop(self, partitions: Iterable[int]) -> None:
        """Forget revoked partitions, open segments included (the next owner restores what
        was flushed; the inputs of what was not are not committed, so it sees them again)."""
        for q in partitions:
            self.parts.pop(q, None)

    def live_segments(self, partition: int) -> int:
        return len(self._part(partition).keys)

    # --- internals -------------------------------------------------------------------------

    def _part(self, partition: int) -> _Partition:
        p = self.parts.get(partition)
        if p is None:
            p = self.parts[partition] = self._load(partition)
        return p

    def _segments(self, partition: int) -> list[tuple[int, list[tuple[str, bytes | None]]]]:
        """The store's segments of ``partition`` in ``seq`` order, decoded."""
        out: list[tuple[int, list[tuple[str, bytes | None]]]] = []
        for key, value in self.store.items(partition):
            if not key.startswith(SEGMENT_PREFIX):
                continue
            try:
                out.append((int(key[len(SEGMENT_PREFIX) :]), decode_segment(value)))
            except ValueError as exc:
                log.error("join state of partition %d: unreadable segment %r: %s",
                          partition, key, exc)  # fmt: skip
        out.sort(key=lambda s: s[0])
        return out

    def _load(self, partition: int) -> _Partition:
        """Rebuild the bookkeeping from the store. Entries written one key per record (the
        layout before segments) are moved into the first segment."""
        p = _Partition()
        self.parts[partition] = p
        segments = self._segments(partition)
        for seq, ops in segments:
            p.next_seq = seq + 1
            self._account(p, seq, [(k, v is not None) for k, v in ops])
        for seq in [s for s, n in p.needed.items() if n == 0]:
            self._collect(partition, p, seq)
        legacy = [(k, v) for k, v in self.store.items(partition)
                  if not k.startswith(SEGMENT_PREFIX)]  # fmt: skip
        if legacy:
            for key, value in legacy:
                self.put(partition, key, value)
            self._flush(partition, p)
            for key, _ in legacy:
                self.store.delete(partition, key)
            log.info("join state of partition %d: %d entries moved into segments", partition,
                     len(legacy))  # fmt: skip
        return p

    def _flush(self, partition: int, p: _Partition) -> int:
        if not p.open:
            return 0
        seq, ops = p.next_seq, p.open
        p.next_seq += 1
        p.open, p.open_bytes = {}, 0
        self.store.put(partition, segment_key(seq), encode_segment(ops))
        self.segments_written += 1
        superseded = self._account(p, seq, [(k, v is not None) for k, v in ops.items()])
        for old in superseded:
            if p.needed.get(old) == 0:
                self._collect(partition, p, old)
        if p.needed.get(seq) == 0:  # e.g. only deletes that nothing older needs
            self._collect(partition, p, seq)
        return 1

    def _account(self, p: _Partition, seq: int, ops: list[tuple[str, bool]]) -> set[int]:
        """Record segment ``seq`` (keys and whether each op is a put) as live; returns the
        older segments whose needed count dropped."""
        touched: set[int] = set()
        p.keys[seq] = [k for k, _ in ops]
        p.needed[seq] = 0
        for key, is_put in ops:
            prev = p.last.get(key)
            copies = p.copies.get(key, 0)
            if prev is not None and (prev[1] or copies > 1):  # it was needed: not any more
                p.needed[prev[0]] -= 1
                touched.add(prev[0])
            if prev is not None and prev[1]:
                p.live_puts -= 1
            copies += 1
            p.copies[key] = copies
            p.last[key] = (seq, is_put)
            if is_put:
                p.live_puts += 1
            if is_put or copies > 1:
                p.needed[seq] += 1
        return touched

    def _collect(self, partition: int, p: _Partition, seq: int) -> None:
        """Delete segment ``seq`` (none of its operations is needed) and what that frees."""
        stack = [seq]
        while stack:
            s = stack.pop()
            if s not in p.keys:
                continue
            self.store.delete(partition, segment_key(s))
            self.segments_deleted += 1
            del p.needed[s]
            for key in p.keys.pop(s):
                copies = p.copies[key] - 1
                last_seq, last_put = p.last[key]
                if copies == 0:
                    del p.copies[key], p.last[key]
                    continue
                p.copies[key] = copies
                if copies == 1 and not last_put and last_seq != s:
                    # only the delete itself is left: nothing older to hide any more
                    p.needed[last_seq] -= 1
                    if p.needed[last_seq] == 0:
                        stack.append(last_seq)
