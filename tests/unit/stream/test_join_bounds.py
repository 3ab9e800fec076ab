"""The joiner's state bounded by bytes, not only counts: pending impressions, labelled ones
kept for duplicates and corrections, orphan clicks; the estimate kept exact under any
sequence of events, and exported as gauges."""

from __future__ import annotations

import random

from logs.events import TOPIC_CLICKS, TOPIC_IMPRESSIONS, Click, Impression
from monitoring.metrics import StreamrecMetrics
from stream.join import JoinConfig, OnlineJoiner
from stream.join_memory import ORPHAN_OVERHEAD, impression_bytes, pack_impression, packed_bytes
from stream.services import JoinService
from stream.settings import Settings

T0 = 1_700_000_000.0


def big(n: int, size: int = 2_000, ts: float = T0) -> Impression:
    return Impression(f"i{n}", ts + n, f"u{n % 7}", f"x{n % 13:02d}", features={"blob": "y" * size})


def recount(j: OnlineJoiner) -> tuple[int, int, int]:
    """The state's bytes computed from scratch (what the running totals must equal)."""
    pending = sum(impression_bytes(imp) for imp in j.pending.values())
    done = sum(OnlineJoiner._done_bytes(iid, neg) for iid, (_, _, neg) in j.done.items())
    orphans = sum(ORPHAN_OVERHEAD + len(iid) for iid in j.orphan_clicks)
    return pending, done, orphans


def test_pending_impressions_are_bounded_by_bytes_the_oldest_emitted_early() -> None:
    cap = 20 * impression_bytes(big(100))  # ids i100..i299: all the same size
    j = OnlineJoiner(JoinConfig(window_s=1e6, max_pending_bytes=cap, idle_timeout_s=None))
    out = []
    for n in range(100, 300):
        out += j.on_impression(big(n))
        assert j.pending_bytes <= cap
    assert len(j.pending) == 20
    assert j.counters.forced_negatives == 180
    assert sorted(int(e.impression.impression_id[1:]) for e in out) == list(range(100, 280))


def test_orphan_clicks_are_bounded_by_count_and_bytes_and_given_up_as_orphans() -> None:
    j = OnlineJoiner(JoinConfig(orphan_grace_s=1e9, max_orphans=100, idle_timeout_s=None))
    for n in range(1_000):
        j.on_click(Click(f"c{n}", T0 + n))
    assert len(j.orphan_clicks) == 100 and j.counters.orphan_clicks == 900
    assert [iid for iid, _ in j.expired_orphans] == [f"c{n}" for n in range(900)]
    long_ids = OnlineJoiner(JoinConfig(orphan_grace_s=1e9, max_orphan_bytes=50_000))
    for n in range(1_000):
        long_ids.on_click(Click(f"c{n}-" + "z" * 1_000, T0 + n))
        assert long_ids.orphan_bytes <= 50_000
    assert 0 < len(long_ids.orphan_clicks) < 50


def test_labelled_impressions_kept_for_corrections_are_bounded_by_bytes() -> None:
    cap = 30 * (packed_bytes(pack_impression(big(0), {})) + 100)  # kept packed
    j = OnlineJoiner(JoinConfig(window_s=1.0, lateness_s=0.0, dedup_horizon_s=1e9,
                                max_done_bytes=cap, idle_timeout_s=None))  # fmt: skip
    for n in range(300):
        j.on_impression(big(n))
        j.on_click(Click("nothing", T0 + n))  # moves the clicks' event time along
        assert j.done_bytes <= cap
    assert 0 < len(j.done) <= 30
    assert len(j.forgotten) == 300 - len(j.done) - len(j.pending)


def test_the_byte_totals_equal_a_recount_after_any_sequence_of_events() -> None:
    rng = random.Random(7)
    cfg = JoinConfig(window_s=30.0, lateness_s=2.0, orphan_grace_s=20.0, dedup_horizon_s=60.0,
                     max_pending=40, max_orphans=15, max_done_bytes=40_000,
                     idle_timeout_s=None)  # fmt: skip
    j = OnlineJoiner(cfg)
    t = T0
    for step in range(5_000):
        t += rng.random()
        n = rng.randrange(400)
        op = rng.random()
        if op < 0.5:
            j.on_impression(big(n, size=rng.randrange(200), ts=t - n))
        elif op < 0.9:
            j.on_click(Click(f"i{n}", t + rng.uniform(-5, 40)))
        else:
            j.on_watermark(t, rng.choice(["impressions", "clicks"]))
        if step % 97 == 0:
            assert (j.pending_bytes, j.done_bytes, j.orphan_bytes) == recount(j)
    assert (j.pending_bytes, j.done_bytes, j.orphan_bytes) == recount(j)
    assert len(j.orphan_clicks) <= 15 and len(j.pending) <= 40 and j.done_bytes <= 40_000
    # a restarted joiner rebuilt from the same entries counts the same bytes
    again = OnlineJoiner(cfg)
    again.restore([(imp, j.clicked.get(iid)) for iid, imp in j.pending.items()],
                  list(j.orphan_clicks.items()), dict(j.max_ts),
                  [(iid, lab, lts, neg) for iid, (lab, lts, neg) in j.done.items()])  # fmt: skip
    assert (again.pending_bytes, again.orphan_bytes) == (j.pending_bytes, j.orphan_bytes)
    assert again.done_bytes == j.done_bytes


def test_join_state_bytes_and_waiting_orphans_are_exported() -> None:
    metrics = StreamrecMetrics()
    svc = JoinService(Settings(join=JoinConfig(orphan_grace_s=1e9), features=False), metrics)
    assert svc.handle(big(1, size=200).to_json(), TOPIC_IMPRESSIONS, 0, 0)[1] is None
    svc.handle(Click("zz", T0).to_json(), TOPIC_CLICKS, 1, 0)
    svc.update_gauges()

    def g(name: str, **labels: str) -> float | None:
        return metrics.registry.get_sample_value(f"streamrec_{name}", labels)

    assert g("join_state_bytes", kind="pending") == impression_bytes(big(1, size=200))
    assert g("join_state_bytes", kind="orphans") == ORPHAN_OVERHEAD + 2
    assert g("join_state_bytes", kind="done") == 0
    assert g("orphan_clicks_waiting") == 1


def test_the_join_state_rocksdb_memory_is_bounded_by_settings(tmp_path: object) -> None:
    from stream.app import JOIN_TABLE, create_app

    settings = Settings(role="joiner", data_dir=str(tmp_path), rocksdb_write_buffer_mb=8,
                        rocksdb_block_cache_mb=16)  # fmt: skip
    store = create_app(settings).tables[JOIN_TABLE].data
    opts = store.rocksdb_options  # Faust's defaults: 64 MB x 3 memtables, a 2 GiB cache
    assert (opts.write_buffer_size, opts.max_write_buffer_number) == (8 << 20, 2)
    assert (opts.block_cache_size, opts.block_cache_compressed_size) == (16 << 20, 4 << 20)


def test_the_join_state_rocksdb_memory_is_measured(tmp_path: object) -> None:
    from stream.app import JOIN_TABLE, ROCKSDB_MEMORY, TableJoinState, create_app
    from stream.segments import SegmentedState

    settings = Settings(role="joiner", data_dir=str(tmp_path), features=False)
    table = create_app(settings).tables[JOIN_TABLE]
    state = TableJoinState(table)
    assert state.native_memory() == {}  # no partition database open yet
    db = table.data._db_for_partition(0)
    for k in range(2000):  # ~2 MB into the memtable (16 MB: no flush)
        db.put(f"0/s/{k}".encode(), bytes(1000))
    mem = state.native_memory()
    assert set(mem) == set(ROCKSDB_MEMORY)
    assert 2_000_000 < mem["memtables"] < 8_000_000
    metrics = StreamrecMetrics()
    svc = JoinService(settings, metrics, state=SegmentedState(state))
    svc.update_gauges()
    got = metrics.registry.get_sample_value("streamrec_rocksdb_memory_bytes", {"kind": "memtables"})
    assert got == mem["memtables"]


def test_the_join_states_changelog_writes_are_handed_to_the_acks() -> None:
    """Every changelog write of the table state (puts, segment tombstones) comes back from
    ``take_in_flight`` once, so the joiner acks its inputs only after their delivery."""
    from stream.app import TableJoinState
    from stream.segments import SegmentedState

    class Table:  # the two things TableJoinState uses of a Faust table
        def __init__(self) -> None:
            self.data: dict[bytes, bytes] = {}
            self.sent: list[tuple[int, bytes, bytes | None]] = []

        def send_changelog(self, partition: int, key: bytes, value: bytes | None) -> object:
            self.sent.append((partition, key, value))
            return len(self.sent)  # stands for the FutureMessage

    table = Table()
    svc = JoinService(Settings(role="joiner", features=False), StreamrecMetrics(),
                      state=SegmentedState(TableJoinState(table), max_ops=2))  # fmt: skip
    assert svc.take_in_flight() == []
    svc.state.put(1, "i/a", b"x")
    svc.state.put(1, "i/b", b"y")  # the second op fills the segment: written now
    svc.state.delete(1, "i/a")
    svc.state.delete(1, "i/b")
    svc.state.flush()
    # two segments, then the first one's tombstone (its ops were superseded)
    assert [v is None for _, _, v in table.sent][:3] == [False, False, True]
    assert svc.take_in_flight() == list(range(1, len(table.sent) + 1))
    assert svc.take_in_flight() == []
    n_sent = len(table.sent)
    empty = TableJoinState(table)
    empty.delete(0, "never-written")  # no write, no future
    assert len(table.sent) == n_sent and empty.take_in_flight() == []
