"""Byte limits of produced records: every batch a stage produces is split under one limit.

``Settings.max_message_bytes`` is the largest Kafka record of the deployment: it is the
producer's ``max_request_size``, the floor of the consumers' fetch sizes, and the topics'
``max.message.bytes``. A stage never builds a record larger than :func:`payload_limit` of
it (the rest is headroom for the key, headers and the record batch framing), so a batch of
valid but large examples is sent as several records instead of failing with
``MessageSizeTooLarge`` and restarting the stage on the same input forever.

>>> from logs.batches import decode_labeled
>>> from logs.events import Impression, LabeledExample
>>> big = [LabeledExample(Impression(f"i{n}", 1.7e9, "u", "x" * 200), 0, 1.7e9)
...        for n in range(10)]
>>> records, too_large = labeled_records(big, max_bytes=1000)  # 250 bytes each
>>> len(records), [len(decode_labeled(r)) for r in records], too_large
(4, [3, 3, 3, 1], [])
>>> max(map(len, records)) <= 1000
True
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import fields

from logs.batches import LABELED_OVERHEAD, ScoredBatch, encode_labeled_example, encode_labeled_raw
from logs.events import LabeledExample

__all__ = [
    "DEFAULT_MAX_MESSAGE_BYTES",
    "chunks_by_bytes",
    "labeled_records",
    "payload_limit",
    "scored_records",
]

#: Kafka's default record limit (the producer's max_request_size is 1 MiB, a topic's
#: max.message.bytes 1 MiB + 12): below both.
DEFAULT_MAX_MESSAGE_BYTES = 1_000_000
#: bytes of a record left for its key, headers and the record batch framing
HEADROOM = 4096


def payload_limit(max_message_bytes: int) -> int:
    """The largest value a stage puts in one record under ``max_message_bytes``."""
    return max(1024, max_message_bytes - HEADROOM)


def chunks_by_bytes(
    sizes: Sequence[int], max_bytes: int, *, max_items: int | None = None, overhead: int = 0
) -> list[tuple[int, int]]:
    """Split items of the given byte ``sizes`` into consecutive ``[start, stop)`` ranges
    whose ``overhead + sum(size + 1)`` stays within ``max_bytes`` (and at most ``max_items``
    items). An item too large alone gets a range of its own (the caller decides what to do
    with it).

    >>> chunks_by_bytes([4, 4, 4, 9, 1], 10)
    [(0, 2), (2, 3), (3, 4), (4, 5)]
    """
    out: list[tuple[int, int]] = []
    start, used = 0, overhead
    for i, size in enumerate(sizes):
        full = max_items is not None and i - start >= max_items
        if i > start and (used + size + 1 > max_bytes or full):
            out.append((start, i))
            start, used = i, overhead
        used += size + 1
    if start < len(sizes):
        out.append((start, len(sizes)))
    return out


def labeled_records(
    examples: Sequence[LabeledExample], max_bytes: int, max_items: int | None = None
) -> tuple[list[bytes], list[LabeledExample]]:
    """``labeled`` record values (the format of :func:`logs.batches.encode_labeled`) of at
    most ``max_bytes`` each, in order, and the examples too large for any record."""
    parts = [encode_labeled_example(e) for e in examples]
    records: list[bytes] = []
    too_large: list[LabeledExample] = []
    for a, b in chunks_by_bytes(
        [len(p) for p in parts], max_bytes, max_items=max_items, overhead=LABELED_OVERHEAD
    ):
        if b - a == 1 and len(parts[a]) + LABELED_OVERHEAD > max_bytes:
            too_large.append(examples[a])
            continue
        records.append(encode_labeled_raw(parts[a:b]))
    return records, too_large


def scored_records(batch: ScoredBatch, max_bytes: int) -> list[bytes]:
    """``scored`` record values of at most ``max_bytes`` each: the batch, or its halves
    (recursively) when it is larger; the batch's marks go with the last part only (they
    follow every example of the batch). A single example is always one record (its ids
    are bounded by the input validation)."""
    raw = batch.encode()
    n = len(batch.impression_ids)
    if len(raw) <= max_bytes or n <= 1:
        return [raw]
    half = n // 2
    names = [f.name for f in fields(ScoredBatch)]
    lists = {k for k in names if isinstance(getattr(batch, k), list)}

    def part(a: int, b: int) -> ScoredBatch:
        return ScoredBatch(**{k: getattr(batch, k)[a:b] if k in lists else getattr(batch, k)
                              for k in names if k != "marks"},
                           marks=batch.marks if b == n else {})  # fmt: skip

    return scored_records(part(0, half), max_bytes) + scored_records(part(half, n), max_bytes)
