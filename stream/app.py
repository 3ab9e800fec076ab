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

import logging
from collections.abc import Iterable
from typing import Any

import faust
import numpy as np

from logs.events import (
    TOPIC_CLICKS,
    TOPIC_CONTROL,
    TOPIC_DEAD_LETTER,
    TOPIC_IMPRESSIONS,
    TOPIC_LABELED,
    TOPIC_SCORED,
)
from monitoring.metrics import StreamrecMetrics
from serving.recommender import Recommender
from stream.agents import (
    ControlAgent,
    FeatureFollowerAgent,
    Gauges,
    JoinerAgents,
    MonitorAgent,
    Outputs,
    ReplicaAgents,
    TrainerAgents,
    install_web,
)
from stream.agents.runtime import Runtime
from stream.broker import TopicPartitionsMismatch, create_topics
from stream.producer import partition_of
from stream.segments import SegmentedState
from stream.services import (
    FeatureFollower,
    IndexerService,
    JoinService,
    JoinState,
    MonitorService,
    TrainerService,
)
from stream.settings import Settings, SettingsError
from stream.transport import StreamrecApp

__all__ = [
    "JOIN_TABLE",
    "ROCKSDB_MEMORY",
    "Runtime",
    "TableJoinState",
    "changelog_topic",
    "create_app",
    "create_worker_topics",
    "faust_options",
    "group_id",
    "join_table_state",
    "topic_plan",
]

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


def create_worker_topics(
    settings: Settings, bootstrap: str | None = None, *, check: bool = False
) -> list[str]:
    """Create the topics of :func:`topic_plan` that are missing (the changelog compacted).

    ``check`` (a worker starting): the input topics and the join-state changelog that
    exist already must have ``settings.partitions`` partitions, else a
    :class:`stream.settings.SettingsError` says which and how to fix it. A worker whose
    setting differs from its inputs would size its state for the wrong count, and its
    monitor would wait forever for marks of partitions that do not exist (fewer) or
    close windows without the marks of those it does not know (more)."""
    changelog = changelog_topic(settings)
    try:
        return create_topics(
            bootstrap or settings.bootstrap, topic_plan(settings),
            compacted=[changelog], max_message_bytes=settings.max_message_bytes,
            client_options=settings.kafka_client_options(),
            exact=(TOPIC_IMPRESSIONS, TOPIC_CLICKS, changelog) if check else (),
        )  # fmt: skip
    except TopicPartitionsMismatch as exc:
        fix = (
            f"a changed partition count needs a new app_id (the join state's changelog was"
            f" made for {exc.have})"
            if exc.topic == changelog
            else f"set partitions = {exc.have} (STREAMREC_PARTITIONS={exc.have}) on every"
            " worker, or recreate the input topics"
        )
        raise SettingsError(f"partitions = {settings.partitions}, but {exc}: {fix}") from None


#: RocksDB's memory properties summed by :meth:`TableJoinState.native_memory`
ROCKSDB_MEMORY = {
    "memtables": "rocksdb.size-all-mem-tables",
    "block_cache": "rocksdb.block-cache-usage",
    "table_readers": "rocksdb.estimate-table-readers-mem",
}


class TableJoinState:
    """:class:`stream.services.JoinState` over a Faust table with raw bytes keys/values.

    Keys are ``<partition>/<key>``. Each write goes to the table's store and, explicitly to
    the input partition's changelog partition, to the changelog (so releases made from a
    timer, outside any event, are logged too). The futures of those changelog writes are
    kept until :meth:`take_in_flight`: the joiner acks an input record only once the writes
    of its flush are delivered (:class:`stream.acks.InputAcks`), since Faust may commit
    offsets before its producer buffer is empty.
    """

    def __init__(self, table: Any) -> None:
        self.table = table
        self._in_flight: list[Any] = []  # FutureMessage of the changelog writes

    def take_in_flight(self) -> list[Any]:
        """The changelog writes made since the last call (asyncio futures, done once the
        broker has them)."""
        out, self._in_flight = self._in_flight, []
        return out

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
        self._in_flight.append(self.table.send_changelog(partition, k, value))

    def native_memory(self) -> dict[str, int]:
        """Bytes RocksDB holds in memory over the store's open partition databases, by
        kind (:data:`ROCKSDB_MEMORY`); empty for a store that is not RocksDB."""
        dbs = getattr(self.table.data, "_dbs", None)
        if not dbs:
            return {}
        out = dict.fromkeys(ROCKSDB_MEMORY, 0)
        for db in list(dbs.values()):
            for kind, prop in ROCKSDB_MEMORY.items():
                out[kind] += int(db.property_int_value(prop) or 0)
        return out

    def delete(self, partition: int, key: str) -> None:
        k = f"{partition}/{key}".encode()
        try:
            del self.table.data[k]
        except KeyError:
            return  # never written (e.g. a positive emitted on arrival): no tombstone
        self._in_flight.append(self.table.send_changelog(partition, k, None))

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


def faust_options(settings: Settings, *, web: bool) -> dict[str, Any]:
    """The :class:`faust.App` configuration of a worker (``web``: run the web server)."""
    return dict(
        broker=settings.faust_broker,
        broker_credentials=settings.faust_credentials(),  # None: PLAINTEXT
        store=f"{settings.table_store}://",
        datadir=settings.data_dir,
        # /recommend and /score (serving.recommender) on the Faust web server; off when no port
        web_enabled=web,
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


def join_table_state(app: faust.App, settings: Settings) -> JoinState:
    """The joiner's pending state: segments (:mod:`stream.segments`) in a Faust table, so
    one changelog record goes out per flush, not one per change."""
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
    return SegmentedState(TableJoinState(join_table))


def create_app(settings: Settings, metrics: StreamrecMetrics | None = None) -> faust.App:
    """Build the Faust app: joiner, trainer and monitor agents, the control listener, and
    the indexer and flush timers (:mod:`stream.agents`); ``settings.role`` picks the
    joiner's side (``"joiner"``), the trainer's side (``"trainer"``), both (``"all"``) or
    a serving replica (``"serve"``).

    The :class:`Runtime` is available as ``app.streamrec``.
    """
    metrics = metrics or StreamrecMetrics()
    joins = settings.role in ("all", "joiner")
    trains = settings.role in ("all", "trainer")
    serves = settings.role == "serve"
    web = (trains or serves) and settings.web_port > 0
    app = StreamrecApp(group_id(settings), **faust_options(settings, web=web))
    app.fetch_max_wait_s = settings.fetch_max_wait_s  # each hop's wait (stream.transport)

    # the services (plain objects, no Kafka: stream.services)
    indexer = IndexerService(settings, metrics)
    pool_rng = np.random.default_rng(settings.trainer.seed)
    rt = Runtime(
        settings=settings,
        metrics=metrics,
        join=JoinService(settings, metrics, join_table_state(app, settings) if joins else None),
        # curriculum hard negatives for the two-tower, from the indexer's pools
        trainer=TrainerService(
            settings,
            metrics,
            hard_negatives=lambda user, n: indexer.pool.sample(user, n, pool_rng),
        ),  # fmt: skip
        monitor=MonitorService(settings, metrics),
        indexer=indexer,
    )
    # the fusion's online pick scores clicks against what serving would retrieve now
    rt.trainer.serving_index = lambda: indexer.holder.current
    app.streamrec = rt  # type: ignore[attr-defined]  # faust.App allows extra attributes
    out = Outputs(app, metrics, settings.max_message_bytes)

    # the agents, timers and tasks (stream.agents), in flow order
    joiner = JoinerAgents(app, rt, out)
    if joins:
        joiner.install()  # impressions + clicks -> labeled
    joiner.connect_revocation()
    trainer = TrainerAgents(app, rt, out)
    app.train_lock = trainer.lock  # type: ignore[attr-defined]  # the worker saves under it
    app.train_thread = trainer.thread  # type: ignore[attr-defined]
    app.trainer_agents = trainer  # type: ignore[attr-defined]  # the worker's final writes
    if trains:
        trainer.install()  # labeled -> scored; index refreshes; model-store versions
        MonitorAgent(app, rt, out).install()  # scored -> control
    # a worker that serves without joining follows the inputs for its feature stages
    follower = (
        FeatureFollower.from_settings(settings)
        if settings.features and settings.feature_follow and settings.role in ("trainer", "serve")
        else None
    )
    app.feature_follower = follower  # type: ignore[attr-defined]
    if follower is not None:
        FeatureFollowerAgent(app, settings, metrics, follower, out).install()
    replica = ReplicaAgents(app, rt, out) if serves else None
    if replica is not None:
        replica.install()  # model-store versions, swapped as new ones appear
    app.replica = None if replica is None else replica.replica  # type: ignore[attr-defined]
    ControlAgent(app, rt, out, replica).install()  # control -> every worker
    Gauges(app, rt, out).install()

    # serving: retrieve -> rank -> calibrate (serving.recommender)
    dropped = rt.metrics.history_fields_dropped.labels(where="serving").inc
    if replica is not None:
        recommender = replica.recommender(
            None if follower is None else follower.stage_for, on_history_dropped=dropped
        )
    else:
        recommender = Recommender(
            rt.indexer.holder,
            ranker=lambda: rt.trainer.ranker,
            calibrator=rt.trainer.serving_calibrator,
            # the index holds two-tower item vectors when the two-tower model is on
            # (a joiner serves nothing: its models are never built)
            user_vectors=(
                rt.trainer.two_tower.user_vectors
                if trains and rt.trainer.two_tower is not None
                else None
            ),
            config=settings.serving,
            # the trainer's co-visitation and decayed clicks (None: fusion off)
            fusion=(lambda: rt.trainer.fusion) if trains else None,
            on_history_dropped=dropped,
            # the live feature stage of the user's partition when this worker owns it;
            # a trainer-role worker owns none: its follower's copy
            history=(
                follower.stage_for
                if follower is not None
                else lambda user: rt.join.features.get(
                    partition_of(user.encode(), settings.partitions)
                )
            ),
        )
    app.recommender = recommender  # type: ignore[attr-defined]
    install_web(app, rt, recommender, replica, web=web)
    return app
