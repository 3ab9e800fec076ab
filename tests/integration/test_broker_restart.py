"""The embedded broker's storage engines, restart, and reading a topic to its real end."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import KafkaAdminClient
from kafka.structs import OffsetAndMetadata

from stream.broker import EmbeddedBroker, cluster_id, create_topics, is_tansu, read_records

if TYPE_CHECKING:
    from tests.integration.conftest import S3Server  # the `s3` fixture's type

pytestmark = pytest.mark.integration


def produce(bootstrap: str, topic: str, values: list[bytes]) -> None:
    # a long linger: the values travel in a few multi-record batches
    producer = KafkaProducer(bootstrap_servers=[bootstrap], linger_ms=200)
    for v in values:
        producer.send(topic, value=v, partition=0)
    producer.flush()
    producer.close()


def topics(bootstrap: str) -> set[str]:
    admin = KafkaAdminClient(bootstrap_servers=[bootstrap])
    try:
        return set(admin.list_topics())
    finally:
        admin.close()


def test_read_records_reads_the_last_batch_to_its_end() -> None:
    """Tansu 0.6.0 answers ListOffsets(latest) with the last batch's base offset + 1; a
    reader that trusts ``end_offsets()`` loses the rest of that batch."""
    values = [b"v%d" % i for i in range(1800)]
    with EmbeddedBroker() as broker:
        create_topics(broker.url, {"t": 1})
        produce(broker.url, "t", values)
        assert [r.value for r in read_records(broker.url, "t")] == values


def test_the_worker_recognises_tansu_by_its_cluster_id() -> None:
    """The worker turns Faust's recovery consistency check off on Tansu only (the ListOffsets
    answer above trips it on a restart); a cluster id is what tells the brokers apart."""
    with EmbeddedBroker() as broker:
        assert cluster_id(broker.url) == "tansu_cluster"
        assert is_tansu(broker.url)


def test_read_records_of_an_empty_topic_is_empty() -> None:
    """A topic nobody wrote to (the demo's ``control`` topic when no alarm fired) reads
    as no records, not an error."""
    with EmbeddedBroker() as broker:
        create_topics(broker.url, {"t": 3})
        assert read_records(broker.url, "t") == []


def test_restart_on_memory_storage_comes_back_empty() -> None:
    with EmbeddedBroker() as broker:
        create_topics(broker.url, {"t": 1})
        produce(broker.url, "t", [b"x"])
        port = broker.port
        broker.restart()
        assert broker.port == port and broker.running
        assert "t" not in topics(broker.url)


def test_restart_on_s3_storage_keeps_records_and_committed_offsets(s3: S3Server) -> None:
    values = [b"v%d" % i for i in range(100)]
    tp = TopicPartition("t", 0)
    broker = EmbeddedBroker(storage=f"s3://{s3.bucket}/", env=EmbeddedBroker.s3_env(s3.endpoint))
    with broker:
        create_topics(broker.url, {"t": 1})
        produce(broker.url, "t", values)
        consumer = KafkaConsumer(bootstrap_servers=[broker.url], group_id="g")
        consumer.assign([tp])
        consumer.commit({tp: OffsetAndMetadata(40, "", -1)})
        consumer.close()

        broker.restart(down_s=1.0)

        assert [r.value for r in read_records(broker.url, "t")] == values
        consumer = KafkaConsumer(bootstrap_servers=[broker.url], group_id="g")
        assert consumer.committed(tp) == 40
        consumer.close()
        producer = KafkaProducer(bootstrap_servers=[broker.url])
        assert producer.send("t", value=b"after", partition=0).get(timeout=30).offset == 100
        producer.close()
