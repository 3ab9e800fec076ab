"""SegmentedState: the joiner's state batched into segment records (stream.segments).

The store under it is a :class:`MemoryJoinState` standing for the Faust table: whatever it
holds after a flush is what a restarted worker finds.
"""

from __future__ import annotations

import numpy as np
import pytest

from logs.events import LabeledExample
from monitoring.metrics import StreamrecMetrics
from stream.segments import SegmentedState, decode_segment, encode_segment
from stream.services import JoinService, MemoryJoinState
from tests.unit.stream.test_join_state import SETTINGS, drain, log_records


def test_segment_encoding_round_trips_puts_and_deletes() -> None:
    ops: dict[str, bytes | None] = {"i/a": b'{"c":null}', "c/ü": b"1.5", "gone": None, "e": b""}
    assert decode_segment(encode_segment(ops)) == list(ops.items())
    with pytest.raises(ValueError, match="truncated"):
        decode_segment(encode_segment(ops)[:-3])


def test_changes_reach_the_store_only_when_flushed_in_one_record() -> None:
    store = MemoryJoinState()
    state = SegmentedState(store)
    for i in range(50):
        state.put(0, f"k{i}", b"v%d" % i)
    state.delete(0, "k3")  # put and deleted inside the open segment: never written
    assert store.items(0) == [] and dict(state.items(0))["k4"] == b"v4"
    assert state.flush() == 1
    ((key, value),) = store.items(0)
    assert key.startswith("s/") and len(decode_segment(value)) == 49
    expected = {f"k{i}": b"v%d" % i for i in range(50) if i != 3}
    assert dict(SegmentedState(store).items(0)) == expected


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_changes_restore_exactly_and_dead_segments_are_collected(seed: int) -> None:
    """Random puts, overwrites and deletes over a sliding set of keys, flushed at random:
    after every flush a fresh state over the store sees exactly the flushed view, and the
    store keeps a bounded number of segments although hundreds were written."""
    rng = np.random.default_rng(seed)
    store = MemoryJoinState()
    state = SegmentedState(store, max_ops=64)
    flushed: dict[str, bytes] = {}
    pending: dict[str, bytes | None] = {}
    live: list[str] = []
    for step in range(6000):
        r = rng.random()
        if r < 0.45 or not live:
            key = f"k{step}"
            live.append(key)
        elif r < 0.6:
            key = live[int(rng.integers(len(live)))]
        else:  # deletes mostly hit the oldest keys, as the joiner's labels do
            key = live.pop(int(rng.integers(min(len(live), 8))))
            state.delete(1, key)
            pending[key] = None
            continue
        value = b"%d" % step
        state.put(1, key, value)
        pending[key] = value
        if len(pending) >= 64 or rng.random() < 0.02:
            state.flush()
        if not state.dirty():  # flushed (by flush() or by the size limit in put())
            for k, v in pending.items():
                if v is None:
                    flushed.pop(k, None)
                else:
                    flushed[k] = v
            pending.clear()
            assert dict(SegmentedState(store).items(1)) == flushed
            assert len(state) == len(flushed)
    assert state.segments_written > 100
    assert state.live_segments(1) == len(store.items(1))
    assert len(store.items(1)) < 0.25 * state.segments_written
    for key in list(live):  # everything goes: so do the segments
        state.delete(1, key)
    state.flush()
    assert store.items(1) == [] and len(state) == 0


def test_a_restored_state_keeps_collecting_and_numbering_after_the_old_segments() -> None:
    store = MemoryJoinState()
    a = SegmentedState(store)
    a.put(0, "x", b"1")
    a.put(0, "y", b"1")
    a.flush()
    a.put(0, "x", b"2")
    a.flush()
    b = SegmentedState(store)  # a restart: both segments are live (y, then x)
    assert dict(b.items(0)) == {"x": b"2", "y": b"1"}
    b.delete(0, "y")
    b.flush()  # the first segment is dead now; the delete hides nothing any more
    assert dict(SegmentedState(store).items(0)) == {"x": b"2"}
    assert [k for k, _ in store.items(0)] == ["s/000000000001"]


def test_entries_of_the_layout_before_segments_are_moved_into_a_segment() -> None:
    store = MemoryJoinState()
    store.put(2, "i/a", b"A")
    store.put(2, "w", b"W")
    state = SegmentedState(store)
    assert dict(state.items(2)) == {"i/a": b"A", "w": b"W"}
    assert [k[:2] for k, _ in store.items(2)] == ["s/"]
    state.delete(2, "i/a")
    state.flush()
    assert dict(SegmentedState(store).items(2)) == {"w": b"W"}


def test_dropping_a_partition_forgets_its_unflushed_changes_only() -> None:
    store = MemoryJoinState()
    state = SegmentedState(store)
    state.put(0, "kept", b"1")
    state.flush()
    state.put(0, "lost", b"2")
    state.drop([0])
    assert dict(state.items(0)) == {"kept": b"1"}


@pytest.mark.parametrize("crash_at", [130, 400, 777])
def test_joiner_restart_over_segments_labels_every_impression(crash_at: int) -> None:
    """The at-least-once contract of the worker: input offsets are committed only after a
    flush of the state; a crash loses the open segments and re-delivers the rest."""
    records, truth = log_records(300, seed=crash_at)
    store = MemoryJoinState()
    sink: list[LabeledExample] = []
    first = JoinService(SETTINGS, StreamrecMetrics(), SegmentedState(store, max_ops=50))
    committed = 0
    for offset, (topic, raw) in enumerate(records[:crash_at]):
        first.handle(raw, topic, 0, offset)
        if offset % 40 == 0:
            drain(first, sink)
            first.state.flush()
            committed = offset + 1
    second = JoinService(SETTINGS, StreamrecMetrics(), SegmentedState(store, max_ops=50))
    for offset, (topic, raw) in enumerate(records[committed:], start=committed):
        second.handle(raw, topic, 0, offset)
        if offset % 40 == 0:
            drain(second, sink)
            second.state.flush()
    second.tick()
    drain(second, sink)
    second.state.flush()

    final: dict[str, int] = {}
    for e in sink:
        final[e.impression.impression_id] = max(final.get(e.impression.impression_id, 0), e.label)
    assert final == truth
    redelivered = len(sink) - len(final) - sum(e.kind == "correction" for e in sink)
    assert redelivered <= crash_at - committed
    # past every dedup horizon only the input event times are left: in the segment of
    # their last save, with at most the one holding the deletes that hide its other keys
    assert list(dict(SegmentedState(store).items(0))) == ["w"]
    assert len(store.items(0)) <= 2 < second.state.segments_deleted
