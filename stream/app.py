"""The Faust app: thin agents over the services in :mod:`stream.services`.

``create_app(settings)`` builds a fresh app (no module-level app, nothing at import time).
Agents receive raw bytes, so that a malformed record reaches ``dead-letter`` with a
reason instead of dying in a deserialiser.

Delivery: at-least-once (Faust's default processing guarantee). The embedded broker
(Tansu) fails transactions, so exactly-once is not used here. The joiner's pending state is
a Faust table (``join-state``, changelog ``<app_id>-join-state-changelog``) holding batched
segments (:mod:`stream.segments`); an input record is acked (its offset may be committed)
only after the segment with its changes went to the producer, so a restarted worker loses
no impression; what can repeat
after a crash (labels sent but not yet committed) is dropped by the trainer's and the
monitor's idempotency horizon (:class:`stream.services.SeenKeys`).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import faust
import numpy as np
from faust.types import TP

from index.faiss_index import IndexHolder, IndexSnapshot
from learners.calibration import Calibrator
from logs.events import (
    TOPIC_CLICKS,
    TOPIC_CONTROL,
    TOPIC_DEAD_LETTER,
    TOPIC_IMPRESSIONS,
    TOPIC_LABELED,
    TOPIC_SCORED,
    DeadLetter,
    InvalidEvent,
    ScoredBatch,
    decode_labeled_batch,
)
from modelstore.snapshot import LoadedModels, ModelReplica
from modelstore.store import DirectoryStore
from monitoring.metrics import StreamrecMetrics
from serving.recommender import Recommender, RequestBatcher, ServingError
from stream.acks import InputAcks, TrainedAcks
from stream.broker import create_topics
from stream.control import check_model_record, parse_control
from stream.gate import ServingGate
from stream.httpd import harden, read_json_body
from stream.limits import labeled_records, payload_limit, scored_records
from stream.producer import partition_of
from stream.segments import SegmentedState
from stream.services import (
    FncThenCalibrator,
    IndexerService,
    JoinService,
    JoinState,
    MonitorService,
    SeenKeys,
    TrainerService,
    control_bytes,
)
from stream.settings import Settings

log = logging.getLogger(__name__)


JOIN_TABLE = "join-state"


def changelog_topic(settings: Settings) -> str:
    """The join-state table's changelog (compacted; co-partitioned with the inputs)."""
    return f"{settings.app_id}-{JOIN_TABLE}-changelog"


def group_id(settings: Settings) -> str:
    """The Faust app id, which is the consumer group: ``app_id``, or ``<app_id>-trainer``
    for a ``role="trainer"`` worker (its own group: it reads ``labeled`` and ``scored``
    only, so no input backlog sits in its fetches); ``<app_id>-serve`` for a ``serve``
    worker (it consumes no topic in a group: ``control`` is read outside any group)."""
    if settings.role in ("trainer", "serve"):
        return f"{settings.app_id}-{settings.role}"
    return settings.app_id


def topic_plan(settings: Settings) -> dict[str, int]:
    """Topic name -> partition count. ``impressions``/``clicks`` scale out with
    ``settings.partitions``, and the join-state changelog with them; ``labeled`` and
    ``scored`` carry micro-batches for the single trainer and monitor; ``control`` is read
    by every worker."""
    return {
        TOPIC_IMPRESSIONS: settings.partitions,
        TOPIC_CLICKS: settings.partitions,
        TOPIC_LABELED: 1,
        TOPIC_SCORED: 1,
        TOPIC_CONTROL: 1,
        TOPIC_DEAD_LETTER: 1,
        changelog_topic(settings): settings.partitions,
    }


def create_worker_topics(settings: Settings, bootstrap: str | None = None) -> list[str]:
    """Create the topics of :func:`topic_plan` that are missing (the changelog compacted)."""
    return create_topics(
        bootstrap or settings.bootstrap, topic_plan(settings),
        compacted=[changelog_topic(settings)], max_message_bytes=settings.max_message_bytes,
        client_options=settings.kafka_client_options(),
    )  # fmt: skip


class TableJoinState:
    """:class:`stream.services.JoinState` over a Faust table with raw bytes keys/values.

    Keys are ``<partition>/<key>``. Each write goes to the table's store and, explicitly to
    the input partition's changelog partition, to the changelog (so releases made from a
    timer, outside any event, are logged too). Faust flushes the producer before it commits
    input offsets, so a change is durable before the record that caused it is committed.
    """

    def __init__(self, table: Any) -> None:
        self.table = table

    def put(self, partition: int, key: str, value: bytes) -> None:
        k = f"{partition}/{key}".encode()
        store = self.table.data
        db_for = getattr(store, "_db_for_partition", None)
        if db_for is None:
            store[k] = value
        else:
            # Faust's RocksDB store picks the partition's database from the current event,
            # and labels are marked sent from a timer too: name the partition explicitly
            store._key_index[k] = partition
            db_for(partition).put(k, value)
        self.table.send_changelog(partition, k, value)

    def delete(self, partition: int, key: str) -> None:
        k = f"{partition}/{key}".encode()
        try:
            del self.table.data[k]
        except KeyError:
            return  # never written (e.g. a positive emitted on arrival): no tombstone
        self.table.send_changelog(partition, k, None)

    def items(self, partition: int) -> Iterable[tuple[str, bytes]]:
        prefix = f"{partition}/".encode()
        n = len(prefix)
        return [
            (k[n:].decode(), v) for k, v in list(self.table.data.items()) if k.startswith(prefix)
        ]

    def flush(self, partitions: Iterable[int] | None = None) -> int:
        return 0  # every write is handed to the producer at once

    def drop(self, partitions: Iterable[int]) -> None:
        pass  # the table's store and changelog are the durable state

    def __len__(self) -> int:
        return len(self.table.data)


#: Examples per ``labeled`` record (~250 bytes each: far below the 1 MB message limit) and
#: the longest a released label waits in the joiner's output buffer (wall seconds).
#: Seconds between two counts of the join-state table for its gauge (a RocksDB store
#: counts by iterating its keys: every second it took ~4% of a busy worker).
STATE_COUNT_EVERY_S = 15.0

LABELED_FLUSH_SIZE = 1000
LABELED_FLUSH_S = 0.2
#: input records between two flushes of the join state by the joiner itself (the labels'
#: flusher flushes it every LABELED_FLUSH_S too)
STATE_FLUSH_RECORDS = 2000


@dataclass
class Runtime:
    """The live objects of one worker, reachable from the agents and from tests."""

    settings: Settings
    metrics: StreamrecMetrics
    join: JoinService
    trainer: TrainerService
    monitor: MonitorService
    indexer: IndexerService
    started_at: float = field(default_factory=time.time)


def create_app(settings: Settings, metrics: StreamrecMetrics | None = None) -> faust.App:
    """Build the Faust app: joiner, trainer and monitor agents, the control listener, and
    the indexer and flush timers; ``settings.role`` picks the joiner's side
    (``"joiner"``), the trainer's side (``"trainer"``) or both (``"all"``).

    The :class:`Runtime` is available as ``app.streamrec``.
    """
    metrics = metrics or StreamrecMetrics()
    joins = settings.role in ("all", "joiner")
    trains = settings.role in ("all", "trainer")
    serves = settings.role == "serve"
    app = faust.App(
        group_id(settings),
        broker=settings.faust_broker,
        broker_credentials=settings.faust_credentials(),  # None: PLAINTEXT
        store=f"{settings.table_store}://",
        datadir=settings.data_dir,
        # /recommend and /score (serving.recommender) on the Faust web server; off when no port
        web_enabled=(trains or serves) and settings.web_port > 0,
        web_bind=settings.web_host,
        web_port=settings.web_port or 6066,
        topic_disable_leader=True,
        topic_allow_declare=False,
        topic_partitions=settings.partitions,
        consumer_auto_offset_reset="earliest",
        broker_rebalance_timeout=settings.rebalance_timeout_s,
        # Tansu holds a group join for half the session timeout: keep it short
        broker_session_timeout=settings.session_timeout_s,
        broker_heartbeat_interval=settings.session_timeout_s / 6,
        broker_max_poll_records=5000,
        stream_buffer_maxsize=20000,
        producer_linger=0.005,
        # None (not resolved by run_worker, e.g. in-process tests on Tansu): off
        recovery_consistency_check=bool(settings.recovery_consistency_check),
        processing_guarantee=settings.processing_guarantee,
        # one record limit for the producer, the fetches and the topics (stream.limits)
        producer_max_request_size=settings.max_message_bytes,
        consumer_max_fetch_size=max(settings.max_message_bytes, 1024**2),
        # doors closed: Faust's own pages (/table/ lists the join state, /router/ the
        # partition owners) are unauthenticated; only /recommend and /score are served
        web_tables_enabled=False,
        web_router_enabled=False,
        web_stats_enabled=False,
        web_graph_enabled=False,
        web_metrics_enabled=False,
    )
    join_state: JoinState | None = None
    if joins:
        join_table = app.Table(
            JOIN_TABLE,
            default=None,
            key_type=bytes,
            value_type=bytes,
            partitions=settings.partitions,  # bytes keys and values: the "raw" codec
            help="The joiner's pending impressions, orphan clicks and input event times.",
            # bounded memory per partition database (Faust's defaults: 192 MB of memtables
            # and a 2 GiB block cache each)
            options=settings.rocksdb_options() if settings.table_store == "rocksdb" else None,
        )
        # the table holds segments: one changelog record per flush, not one per change
        join_state = SegmentedState(TableJoinState(join_table))
    index_service = IndexerService(settings, metrics)
    pool_rng = np.random.default_rng(settings.trainer.seed)
    rt = Runtime(
        settings=settings,
        metrics=metrics,
        join=JoinService(settings, metrics, join_state),
        # curriculum hard negatives for the two-tower, from the indexer's pools
        trainer=TrainerService(
            settings,
            metrics,
            hard_negatives=lambda user, n: index_service.pool.sample(user, n, pool_rng),
        ),  # fmt: skip
        monitor=MonitorService(settings, metrics),
        indexer=index_service,
    )
    app.streamrec = rt  # type: ignore[attr-defined]  # faust.App allows extra attributes

    def raw_topic(*names: str) -> faust.TopicT:
        return app.topic(*names, key_serializer="raw", value_serializer="raw")

    inputs = raw_topic(TOPIC_IMPRESSIONS, TOPIC_CLICKS)
    labeled = raw_topic(TOPIC_LABELED)
    scored = raw_topic(TOPIC_SCORED)
    control = raw_topic(TOPIC_CONTROL)
    dead = raw_topic(TOPIC_DEAD_LETTER)
    max_payload = payload_limit(settings.max_message_bytes)

    def stage_error(stage: str, where: str) -> None:
        """An exception a stage survived: counted and logged (with its traceback) once."""
        rt.metrics.stage_errors.labels(stage=stage).inc()
        log.exception("%s failed on %s; the record is dead-lettered or skipped", stage, where)

    def where(event: Any) -> str:
        m = event.message
        return f"{m.topic}[{m.partition}]@{m.offset}"

    async def flush_labeled(force: bool) -> None:
        """Send queued labels; then (and only then) their impressions leave the state."""
        # taken in one go: the other flusher (timer or agent) runs while this one awaits
        ready = rt.join.take_ready(None if force else LABELED_FLUSH_SIZE)
        for partition, buf in ready.items():
            key = str(partition).encode()
            # split by bytes (and count) under the record limit: valid but large impressions
            # in one batch must not make the producer refuse it
            records, too_large = labeled_records(buf, max_payload, LABELED_FLUSH_SIZE)
            sending = [await labeled.send(key=key, value=value) for value in records]
            for e in too_large:  # cannot happen with a limit >= 64 KiB events; kept safe
                exc = InvalidEvent("too_large", "labelled example over max_message_bytes")
                rt.metrics.dead_letters.labels(reason=exc.reason).inc()
                letter = DeadLetter.of(TOPIC_LABELED, partition, -1, exc, e.impression.to_json())
                await dead.send(value=letter.to_json())
            # the broker has the labels before the state says so: a RocksDB store is
            # local and durable at once, so marking them earlier could lose them
            await asyncio.gather(*sending)
            rt.join.sent(partition, buf)
        while rt.join.orphans:
            await dead.send(value=rt.join.orphans.pop().to_json())
        commit_state()

    input_acks = InputAcks(lambda event: event.message.partition)

    def flush_join_state() -> None:
        rt.join.save_features()
        rt.join.state.flush()

    def commit_state() -> None:
        input_acks.commit(flush_join_state)

    async def joiner(stream: faust.StreamT[bytes]) -> None:
        async for event in stream.noack().events():  # type: ignore[attr-defined]
            msg = event.message
            try:
                out, dls = rt.join.handle_record(event.value, msg.topic, msg.partition, msg.offset)
            except Exception as exc:  # a bug must not stall the partition: park the record
                input_acks.add(event)
                stage_error("joiner", where(event))
                await dead_letter(event, InvalidEvent("processing_error", repr(exc)))
                continue
            input_acks.add(event)
            try:
                for dl in dls:
                    log.warning("dead letter from %s[%d]@%d: %s", msg.topic, msg.partition,
                                msg.offset, dl.reason)  # fmt: skip
                    await dead.send(value=dl.to_json())
                if out and len(rt.join.outbox.get(msg.partition, ())) >= LABELED_FLUSH_SIZE:
                    await flush_labeled(force=False)
                elif len(input_acks) >= STATE_FLUSH_RECORDS:
                    commit_state()
            except Exception:  # producing failed: the labels stay pending in the state
                stage_error("joiner", where(event))

    def input_lags() -> dict[tuple[str, int], int]:
        """Unconsumed records per input partition (from the last fetch's high watermark)."""
        lags: dict[tuple[str, int], int] = {}
        for (topic, partition), offset in rt.join.offsets.items():
            try:
                high = app.consumer.highwater(TP(topic, partition))
            except Exception:  # no fetch yet, or a rebalance in progress
                continue
            if high is not None:
                lags[(topic, partition)] = int(high) - 1 - offset
        return lags

    async def labeled_flusher() -> None:
        try:
            rt.join.note_backlog(input_lags())
            rt.join.tick()
            await flush_labeled(force=True)
        except Exception:  # a timer that raises stops the worker: count it, retry next tick
            stage_error("labeled_flusher", "a timed flush")

    if joins:
        app.agent(inputs, name="joiner")(joiner)
        app.timer(interval=LABELED_FLUSH_S)(labeled_flusher)

    @app.on_partitions_revoked.connect
    async def on_revoked(sender: Any, /, *args: Any, signal: Any, **kwargs: Any) -> None:
        """A revoked input partition's joiner is dropped: the next owner rebuilds it from
        the table, and re-emits the labels this worker had not sent yet."""
        revoked: set[TP] = args[0] if args else kwargs.get("revoked", set())
        gone = {tp.partition for tp in revoked if tp.topic in (TOPIC_IMPRESSIONS, TOPIC_CLICKS)}
        # Faust waited for every input record to be acked, so what they changed is flushed;
        # anything unacked left is uncommitted and goes to the next owner with its inputs
        input_acks.drop_partitions(gone)
        rt.join.drop(gone)

    trained_acks = TrainedAcks()  # labeled records acked once all their examples learned

    # One micro-batch at a time: the agent and the flush timer both call train_due, and
    # the models must not be saved or stepped while a step runs on the training thread.
    train_lock = asyncio.Lock()
    app.train_lock = train_lock  # type: ignore[attr-defined]
    train_thread = (
        ThreadPoolExecutor(1, thread_name_prefix="streamrec-train")
        if settings.trainer.offload
        else None
    )
    app.train_thread = train_thread  # type: ignore[attr-defined]

    async def train_due() -> None:
        async with train_lock:
            while rt.trainer.due():
                taken = rt.trainer.take()
                if taken is None:
                    break
                if train_thread is None:
                    result = rt.trainer.compute(taken)
                else:
                    loop = asyncio.get_running_loop()
                    result = await loop.run_in_executor(train_thread, rt.trainer.compute, taken)
                batch = rt.trainer.finish(taken, result)
                for value in scored_records(batch, max_payload):  # split under the limit
                    await scored.send(key=b"trainer", value=value)
                trained_acks.learned(len(batch.impression_ids))
            if rt.indexer.due(rt.trainer.ranker, rt.trainer.two_tower):
                await refresh_index()
            rt.trainer.maybe_checkpoint()
            index = rt.indexer.holder.current
            if rt.trainer.publish_due(index):
                # on the training thread (models still: the lock is held), off the loop
                if train_thread is None:
                    manifest = rt.trainer.publish(index)
                else:
                    loop = asyncio.get_running_loop()
                    manifest = await loop.run_in_executor(train_thread, rt.trainer.publish, index)
                if manifest is not None:
                    msg = rt.trainer.store_announcement(manifest)
                    await control.send(key=b"model", value=control_bytes(msg))

    def drop_buffer() -> int:
        dropped = rt.trainer.drop_buffer()
        trained_acks.learned(None)
        return dropped

    async def trainer(stream: faust.StreamT[bytes]) -> None:
        async for event in stream.noack().events():  # type: ignore[attr-defined]
            try:
                examples = decode_labeled_batch(event.value)
                added = rt.trainer.add(examples, emitted_at=event.message.timestamp)
            except Exception as exc:
                if not isinstance(exc, InvalidEvent):
                    stage_error("trainer", where(event))
                    exc = InvalidEvent("processing_error", repr(exc))
                await dead_letter(event, exc)
                event.ack()
                continue
            trained_acks.add(event, added)
            try:
                trained_acks.learned(0)  # a record whose examples were all duplicates
                await train_due()
            except Exception as exc:
                stage_error("trainer", where(event))  # the micro-batch is dead-lettered
                drop_buffer()
                await dead_letter(event, InvalidEvent("processing_error", repr(exc)))

    async def trainer_flusher() -> None:
        try:
            await train_due()
        except Exception:
            stage_error("trainer", "a timed flush (buffer dropped)")
            dropped = drop_buffer()
            rt.metrics.dead_letters.labels(reason="processing_error").inc(dropped)

    seen_batches = SeenKeys(100_000)

    async def monitor(stream: faust.StreamT[bytes]) -> None:
        async for event in stream.events():
            try:
                await monitor_one(event)
            except Exception as exc:  # e.g. unhashable ids, a failed send: never exit
                stage_error("monitor", where(event))
                await dead_letter(event, InvalidEvent("processing_error", repr(exc)))

    async def monitor_one(event: Any) -> None:
        try:
            batch = ScoredBatch.from_json(event.value)
        except InvalidEvent as exc:
            await dead_letter(event, exc)
            return
        ids = batch.impression_ids
        if ids and not seen_batches.first_time((ids[0], ids[-1], len(ids), batch.label[0],
                                                batch.model_version)):  # fmt: skip
            rt.metrics.duplicate_examples.labels(stage="monitor").inc(len(ids))
            return
        messages = rt.monitor.observe(batch)
        for msg in messages:
            await control.send(key=str(msg["kind"]).encode(), value=control_bytes(msg))

    state_counted_at = [-math.inf]

    @app.timer(interval=1.0)
    async def gauges() -> None:
        try:
            update_gauges()
        except Exception:
            stage_error("gauges", "a gauge update")

    fields_counted = {"serving": 0, "stream": 0}

    def count_rejected_fields() -> None:
        """Encoder fields given no slot since the last call: unknown at inference (serving)
        or not admitted from the stream, over the ranker's and the two towers' encoders."""
        tt = rt.trainer.two_tower
        encoders = [rt.trainer.ranker.encoder]
        if tt is not None:
            encoders += [tt.user_encoder, tt.item_encoder]
        totals = {"serving": sum(e.n_unknown_fields for e in encoders),
                  "stream": sum(e.n_rejected_fields for e in encoders)}  # fmt: skip
        for where_, n in totals.items():
            if n > fields_counted[where_]:
                rt.metrics.fields_rejected.labels(where=where_).inc(n - fields_counted[where_])
            fields_counted[where_] = n  # a swapped-in model starts its own counts

    def update_gauges() -> None:
        count_rejected_fields()
        age = rt.indexer.pool.age(time.time())
        if np.isfinite(age):
            rt.metrics.hard_negative_pool_age_seconds.set(age)
        rt.monitor.publish()
        rt.join.update_gauges()
        now = time.monotonic()
        if now - state_counted_at[0] >= STATE_COUNT_EVERY_S:  # a RocksDB count scans keys
            state_counted_at[0] = now
            rt.metrics.join_state_entries.set(len(rt.join.state))  # type: ignore[arg-type]

    @app.task
    async def control_listener() -> None:
        """Every worker applies every ``control`` message, so this reads the topic outside
        the consumer group (no group id), from the beginning: a restarted worker gets the
        newest calibrator back."""
        from aiokafka import AIOKafkaConsumer, TopicPartition

        consumer = AIOKafkaConsumer(
            bootstrap_servers=settings.bootstrap.split(","),
            group_id=None,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_partition_fetch_bytes=max(settings.max_message_bytes, 1024**2),
            **settings.kafka_client_options(),
        )
        await consumer.start()
        try:
            parts = consumer.partitions_for_topic(TOPIC_CONTROL) or {0}
            consumer.assign([TopicPartition(TOPIC_CONTROL, p) for p in sorted(parts)])
            await consumer.seek_to_beginning()
            while True:
                try:
                    batches = await consumer.getmany(timeout_ms=500)
                except Exception:  # e.g. a broker hiccup: the task must not end the worker
                    stage_error("control", "a fetch of control")
                    await asyncio.sleep(1.0)
                    continue
                for records in batches.values():
                    for record in records:
                        try:
                            apply_control(record.value)
                        except Exception:  # validated, yet a consumer failed: skip it
                            stage_error("control", f"{TOPIC_CONTROL}[{record.partition}]"
                                        f"@{record.offset}")  # fmt: skip
        finally:
            await consumer.stop()

    def apply_control(value: bytes | None) -> None:
        """Apply one ``control`` record that :func:`stream.control.parse_control` accepts;
        a rejected one is counted and skipped (every worker re-reads ``control`` from the
        start, so a record that raised would stop every worker on every restart)."""
        try:
            msg = parse_control(value, max(settings.max_message_bytes, 1024**2))
        except InvalidEvent as exc:
            rt.metrics.control_rejected.labels(reason=exc.reason).inc()
            log.warning("control record rejected and skipped: %s", exc)
            return
        if isinstance(msg, dict):
            if msg.get("kind") == "model":
                # only a version of the model store with its manifest's digest, on every
                # worker: a legacy record naming a file elsewhere is refused and counted
                refused = check_model_record(msg, settings.model_store)
                if refused is not None:
                    rt.metrics.control_rejected.labels(reason=refused).inc()
                    log.warning("control 'model' record refused (%s): version %r, path %r",
                                refused, msg.get("version"), msg.get("path"))  # fmt: skip
                    if replica is not None:  # and in the replica's store_failures, as before
                        before = replica.n_failures
                        replica.announce(msg)
                        _count_store_failures(before)
                    return
            rt.trainer.apply_control(msg)
            rt.monitor.apply_control(msg)
            if replica is not None and msg.get("kind") == "model":
                before = replica.n_failures
                if replica.announce(msg) is not None:
                    refresh_soon.set()
                _count_store_failures(before)

    async def refresh_index() -> None:
        msg = rt.indexer.refresh(rt.trainer.ranker, rt.trainer.catalogue, rt.trainer.two_tower)
        if msg is not None:
            await control.send(key=b"index", value=control_bytes(msg))

    async def indexer() -> None:
        try:
            await refresh_index()
        except Exception:
            stage_error("indexer", "a timed index refresh")

    if trains:
        app.agent(labeled, name="trainer")(trainer)
        app.timer(interval=max(0.05, settings.trainer.flush_s / 2))(trainer_flusher)
        app.agent(scored, name="monitor")(monitor)
        app.timer(interval=settings.indexer.refresh_s)(indexer)

    # -- a "serve" worker: the newest model-store version, swapped as new ones appear
    replica: ModelReplica | None = None
    refresh_soon = asyncio.Event()
    if serves:
        replica = ModelReplica(
            DirectoryStore(settings.model_store, keep=settings.store.keep),
            device=settings.ranker.device,
        )
    app.replica = replica  # type: ignore[attr-defined]
    reported_failures: dict[str, int] = {}

    def _count_store_failures(before: int) -> None:
        assert replica is not None
        if replica.n_failures == before:
            return
        failures = dict(replica.failures)  # a copy: a load thread may add to it
        for reason, n in failures.items():
            new = n - reported_failures.get(reason, 0)
            if new > 0:
                rt.metrics.store_failures.labels(reason=reason).inc(new)
                reported_failures[reason] = n

    async def store_refresher() -> None:
        """Load newer versions: at start (catch-up from the store, not from ``control``
        history), on each announcement, and every ``store.poll_s`` seconds."""
        assert replica is not None
        loop = asyncio.get_running_loop()
        while True:
            before = replica.n_failures
            try:
                loaded = await loop.run_in_executor(None, replica.refresh)
            except Exception:  # e.g. the store's directory unreadable: keep serving
                log.exception("model store refresh failed; serving version %d", replica.version)
                loaded = None
            _count_store_failures(before)
            if loaded is not None:
                m = rt.metrics
                m.store_loads.inc()
                m.store_version.set(loaded.version)
                m.store_propagation_seconds.observe(replica.propagation_s[-1])
                m.model_version.set(loaded.ranker.n_updates)
                if loaded.index is not None:
                    m.index_version.set(loaded.index.version)
                    m.index_items.set(len(loaded.index))
            try:
                await asyncio.wait_for(refresh_soon.wait(), timeout=settings.store.poll_s)
            except TimeoutError:
                pass
            refresh_soon.clear()

    async def control_drain(stream: faust.StreamT[bytes]) -> None:
        """A serve worker's only subscription (Faust needs one): ``control`` in the group
        ``<app_id>-serve``, ignored here; the listener task reads it outside any group."""
        async for _ in stream:
            pass

    if serves:
        app.task(store_refresher)
        app.agent(control, name="serve-control")(control_drain)

    if replica is not None:
        serving_replica = replica

        class _ReplicaIndex(IndexHolder):
            """The replica's index as an :class:`IndexHolder` for the recommender."""

            @property
            def current(self) -> IndexSnapshot | None:
                cur = serving_replica.current
                return None if cur is None else cur.index

        def _replica_models() -> LoadedModels:
            cur = serving_replica.current
            if cur is None:
                raise ServingError(503, "no model yet: the model store has no usable version")
            return cur

        def _replica_calibrator() -> tuple[Calibrator, int]:
            # the newest of the snapshot's calibrator and one announced on control since
            cur = _replica_models()
            cal, version = cur.calibrator, cur.calibrator_version
            announced = rt.trainer.served_calibrator  # one read: calibrator and version agree
            if announced.version > version:
                cal, version = announced.calibrator, announced.version
            return (FncThenCalibrator(cal) if settings.trainer.fnc else cal), version  # type: ignore[return-value]

        def _replica_user_vectors(ids: list[str]) -> np.ndarray:
            cur = _replica_models()
            if cur.two_tower is None:
                return cur.ranker.user_vectors(ids)
            return cur.two_tower.user_vectors(ids)

        recommender = Recommender(
            _ReplicaIndex(),
            ranker=lambda: _replica_models().ranker,
            calibrator=_replica_calibrator,
            user_vectors=_replica_user_vectors,
            config=settings.serving,
        )
    else:
        recommender = Recommender(
            rt.indexer.holder,
            ranker=lambda: rt.trainer.ranker,
            calibrator=rt.trainer.serving_calibrator,
            # the index holds two-tower item vectors when the two-tower model is on
            user_vectors=(
                None if rt.trainer.two_tower is None else rt.trainer.two_tower.user_vectors
            ),
            config=settings.serving,
            # the live feature stage of the user's partition when this worker owns it
            history=lambda user: rt.join.features.get(
                partition_of(user.encode(), settings.partitions)
            ),
        )
    app.recommender = recommender  # type: ignore[attr-defined]
    if (trains or serves) and settings.web_port > 0:
        # header/body timeouts, a connection cap, no 500 with details (stream.httpd)
        harden(
            app.web,
            settings.serving,
            on_refused=rt.metrics.serving_errors.labels(endpoint="connection", status="503").inc,
            on_error=rt.metrics.serving_errors.labels(endpoint="any", status="500").inc,
        )
    gate = ServingGate(settings.serving.threads, settings.serving.max_inflight)
    app.serving_gate = gate  # type: ignore[attr-defined]
    # concurrent /recommend requests answered together (bench.serving_batching)
    batcher = (
        RequestBatcher(recommender, settings.serving.batch, settings.serving.batch_wait_ms / 1e3)
        if settings.serving.batch > 1 and (trains or serves) and settings.web_port > 0
        else None
    )
    app.request_batcher = batcher  # type: ignore[attr-defined]

    async def answer(
        view: faust.web.View, endpoint: str, fn: Callable[..., dict[str, Any]], *args: Any
    ) -> faust.web.Response:
        """``fn(*args)`` through the serving gate as JSON (``/recommend`` through the
        batcher when there is one); a :class:`ServingError` becomes its status with
        ``error``; both counted in the serving metrics."""
        try:
            if batcher is not None and endpoint == "recommend":
                out = await gate.run_future(batcher.submit, *args)
            else:
                out = await gate.run(fn, *args)
        except ServingError as exc:
            rt.metrics.serving_errors.labels(endpoint=endpoint, status=str(exc.status)).inc()
            return view.error(exc.status, exc.message)
        rt.metrics.serving_seconds.labels(endpoint=endpoint).observe(
            out["timing_ms"]["total"] / 1e3
        )
        return view.json(out)

    @app.page("/recommend")
    class RecommendView(faust.web.View):
        """``GET /recommend?user_id=U&k=K[&ctx_<name>=value ...]``: top-k by calibrated
        pCTR (see :meth:`serving.recommender.Recommender.recommend`); 4xx/503 with ``error``."""

        async def get(self, request: faust.web.Request) -> faust.web.Response:
            q = request.query
            try:
                k = int(q.get("k", "10"))
            except ValueError:
                return self.error(400, f"k must be an integer, got {q.get('k')!r}")
            ctx = {name: value for name, value in q.items() if name not in ("user_id", "k")}
            return await answer(self, "recommend", recommender.recommend,
                                q.get("user_id", ""), k, ctx or None)  # fmt: skip

    @app.page("/score")
    class ScoreView(faust.web.View):
        """``POST /score`` with ``{"user_id": U, "item_ids": [...], "context": {...}}``:
        calibrated pCTR of the given candidates, in order."""

        async def post(self, request: faust.web.Request) -> faust.web.Response:
            try:  # bounded in time and size; any parse error is a 400, never a 500
                body = await read_json_body(request, settings.serving)
            except ServingError as exc:
                rt.metrics.serving_errors.labels(endpoint="score", status=str(exc.status)).inc()
                return self.error(exc.status, exc.message)
            if not isinstance(body, dict):
                return self.error(400, "the body must be a JSON object")
            items: Any = body.get("item_ids")  # validated by Recommender.score
            return await answer(self, "score", recommender.score,
                                body.get("user_id", ""), items, body.get("context"))  # fmt: skip

    @app.page("/version")
    class VersionView(faust.web.View):
        """``GET /version``: the model versions this worker answers from."""

        async def get(self, request: faust.web.Request) -> faust.web.Response:
            return self.json(served_versions())

    @app.page("/health")
    class HealthView(faust.web.View):
        """``GET /health``: 200 once this worker has a model to answer from, else 503."""

        async def get(self, request: faust.web.Request) -> faust.web.Response:
            v = served_versions()
            ok = v["store_version"] > 0 if replica is not None else v["index_version"] > 0
            return self.json({"ok": ok, **v}, status=200 if ok else 503)

    def served_versions() -> dict[str, Any]:
        if replica is not None:
            cur = replica.current
            return {
                "role": settings.role,
                "store_version": replica.version,
                "model_version": None if cur is None else cur.ranker.n_updates,
                "index_version": (0 if cur is None or cur.index is None else cur.index.version),
                "calibrator_version": None if cur is None else cur.calibrator_version,
                "digest": None if cur is None else cur.manifest.digest,
                "loaded_at": None if cur is None else cur.loaded_at,
                "load_failures": dict(replica.failures),
                "last_error": replica.last_error,
            }
        published = rt.trainer.published
        return {
            "role": settings.role,
            "store_version": 0 if published is None else published.version,
            "model_version": rt.trainer.model_version,
            "index_version": rt.indexer.version,
            "calibrator_version": rt.trainer.calibrator_version,
            "digest": None if published is None else published.digest,
        }

    async def dead_letter(event: Any, exc: InvalidEvent) -> None:
        """Send ``event``'s dead letter (a bounded prefix, size and hash of its value);
        never raises: a failure is counted and logged, and the record is skipped."""
        m = event.message
        rt.metrics.dead_letters.labels(reason=exc.reason).inc()
        try:
            dl = DeadLetter.of(m.topic, m.partition, m.offset, exc, event.value)
            await dead.send(value=dl.to_json())
        except Exception:
            stage_error("dead_letter", where(event))

    return app
