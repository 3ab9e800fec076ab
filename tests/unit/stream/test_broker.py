"""Finding the Tansu binary, the embedded broker's lifecycle and topic creation."""

from __future__ import annotations

import os
import socket
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from stream.broker import (
    BrokerNotFound,
    EmbeddedBroker,
    TopicPartitionsMismatch,
    create_topics,
    find_tansu_binary,
    free_port,
    strip_scheme,
)

# kafka-python loads its protocol schemas with importlib.resources' legacy API
pytestmark = pytest.mark.filterwarnings("ignore:.*is deprecated. Use files:DeprecationWarning")


def accepts(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def test_tansu_override_that_is_not_executable_raises_broker_not_found(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = tmp_path / "tansu"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o644)
    monkeypatch.setenv("STREAMREC_TANSU_BIN", str(fake))
    with pytest.raises(BrokerNotFound, match="STREAMREC_TANSU_BIN.*not an executable file"):
        find_tansu_binary()


def test_tansu_override_that_does_not_exist_raises_broker_not_found(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("STREAMREC_TANSU_BIN", str(tmp_path / "missing"))
    with pytest.raises(BrokerNotFound, match="missing"):
        find_tansu_binary()


def test_tansu_override_that_is_executable_is_returned(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = tmp_path / "tansu"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("STREAMREC_TANSU_BIN", str(fake))
    assert find_tansu_binary() == str(fake)


def test_without_override_the_wheel_binary_is_found(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("STREAMREC_TANSU_BIN", raising=False)
    path = find_tansu_binary()
    assert os.path.isfile(path) and os.access(path, os.X_OK)


def test_strip_scheme_removes_only_the_scheme() -> None:
    assert strip_scheme("kafka://a:1,b:2") == "a:1,b:2"
    assert strip_scheme("a:1") == "a:1"


@pytest.fixture(scope="module")
def broker() -> Iterator[EmbeddedBroker]:
    with EmbeddedBroker() as b:
        yield b


def test_embedded_broker_accepts_connections_until_stopped() -> None:
    b = EmbeddedBroker(port=free_port())
    assert not b.running and b.pid is None
    b.start(timeout_s=20)
    try:
        assert b.running and b.pid is not None
        assert b.url == f"127.0.0.1:{b.port}"
        assert accepts(b.host, b.port)
    finally:
        b.stop()
    assert not b.running
    assert not accepts(b.host, b.port)
    b.stop()  # stopping twice is harmless


def test_create_topics_creates_them_with_their_partition_counts(broker: EmbeddedBroker) -> None:
    from kafka import KafkaConsumer

    created = create_topics(f"kafka://{broker.url}", {"t-imps": 3, "t-clicks": 1})
    assert sorted(created) == ["t-clicks", "t-imps"]
    consumer = KafkaConsumer(bootstrap_servers=[broker.url], request_timeout_ms=10_000)
    try:
        assert consumer.partitions_for_topic("t-imps") == {0, 1, 2}
        assert consumer.partitions_for_topic("t-clicks") == {0}
    finally:
        consumer.close()


def test_create_topics_is_idempotent(broker: EmbeddedBroker) -> None:
    from kafka.admin import KafkaAdminClient

    assert create_topics(broker.url, [("t-once", 2)]) == ["t-once"]
    assert create_topics(broker.url, [("t-once", 5)]) == []  # exists: left as it is
    assert create_topics(broker.url, [("t-once", 2), ("t-new", 1)]) == ["t-new"]
    admin = KafkaAdminClient(bootstrap_servers=[broker.url])
    try:
        (meta,) = admin.describe_topics(["t-once"])
    finally:
        admin.close()
    assert len(meta["partitions"]) == 2


def test_create_topics_checks_the_partition_counts_of_exact_topics(
    broker: EmbeddedBroker,
) -> None:
    assert create_topics(broker.url, [("t-exact", 2)]) == ["t-exact"]
    # asked for exactly 2: fine; asked for 4: the existing topic's 2 is named
    assert create_topics(broker.url, [("t-exact", 2)], exact=["t-exact"]) == []
    with pytest.raises(TopicPartitionsMismatch, match="'t-exact' has 2 partitions, not 4") as e:
        create_topics(broker.url, [("t-exact", 4), ("t-exact-new", 3)], exact=["t-exact"])
    assert (e.value.topic, e.value.have, e.value.want) == ("t-exact", 2, 4)
    # a topic created by the call itself is not checked, and one not in exact never is
    assert create_topics(broker.url, [("t-exact", 4)]) == []


def test_a_worker_whose_partitions_setting_differs_from_its_inputs_says_how_to_fix_it(
    broker: EmbeddedBroker,
) -> None:
    """Input topics made with 2 partitions (by hand, or by a worker with other settings):
    a worker set to 4 would wait forever for the marks of partitions 2 and 3; it stops at
    start with the fix instead (the CLI prints a SettingsError as an error, not a
    traceback)."""
    from stream.app import create_worker_topics
    from stream.settings import Settings, SettingsError

    two = Settings(broker=broker.url, partitions=2, app_id="t-mismatch")
    create_worker_topics(two, check=True)
    create_worker_topics(two, check=True)  # the same count again: fine
    four = two.replace(partitions=4)
    with pytest.raises(SettingsError, match=r"partitions = 4, but topic 'impressions' has 2"
                       r" partitions, not 4: set partitions = 2"):  # fmt: skip
        create_worker_topics(four, check=True)
    assert create_worker_topics(four) == []  # replay and the tools do not check
    # inputs right, but the join state's changelog was made for another count
    from stream.app import changelog_topic

    other = two.replace(app_id="t-mismatch-2")
    create_topics(broker.url, [(changelog_topic(other), 3)])
    with pytest.raises(SettingsError, match="needs a new app_id .* made for 3"):
        create_worker_topics(other, check=True)
