"""Hostile records on the internal ``labeled`` topic, through the embedded broker, to a
trainer worker: anyone with access to a topic can write to it.

Records whose ``streamrec-marks`` header is malformed (not JSON, a string time, a time past
2100, a partition that is not a number, nested arrays, NaN) carry valid examples: the
trainer learns them, counts one trainer stage error per record and ignores the marks.
Records whose body is not a ``labeled`` batch are dead-lettered with their reason. The
worker never exits, and the valid examples are all scored.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from kafka import KafkaProducer

from bench.workers import worker_processes
from logs.batches import MARKS_HEADER, encode_labeled, encode_marks
from logs.events import TOPIC_LABELED, Impression, LabeledExample
from stream.app import create_worker_topics
from stream.broker import EmbeddedBroker
from stream.settings import Settings

pytestmark = pytest.mark.integration

TS = 1_700_000_000.0
BAD_HEADERS = (
    b"not json",
    b'{"0": "x"}',
    b'{"0": 1e300}',
    b'{"x": 1.0}',
    b"[" * 100_000,
    b'{"0": NaN}',
    b"\xff\xfe",
)
BAD_BODIES = (b"\xffnonsense", b"", b"\x00" * 70, b'{"impression_id": "a"}')


def _examples(start: int, n: int) -> list[LabeledExample]:
    return [
        LabeledExample(
            Impression(
                f"imp-{k}", TS + k, f"u{k % 5}", f"i{k % 7}", position=1, features={"dev": "ios"}
            ),
            int(k % 4 == 0),
            TS + k + 1.0,
            1.0,
            "positive" if k % 4 == 0 else "negative",
        )  # fmt: skip
        for k in range(start, start + n)
    ]


def test_bad_marks_headers_and_bodies_on_labeled_never_stop_the_trainer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("STREAMREC_RECOVERY_CONSISTENCY_CHECK", "false")  # Tansu: see settings
    per = 20
    with EmbeddedBroker(log_path=tmp_path / "tansu.log") as broker:
        create_worker_topics(Settings(broker=broker.url))
        with worker_processes(broker.url, tmp_path, roles=("trainer",)) as (t,):
            producer = KafkaProducer(bootstrap_servers=broker.url)
            k = 0
            for header in BAD_HEADERS:
                producer.send(TOPIC_LABELED, key=b"0", value=encode_labeled(_examples(k, per)),
                              headers=[(MARKS_HEADER, header)])  # fmt: skip
                k += per
            for body in BAD_BODIES:
                producer.send(TOPIC_LABELED, key=b"1", value=body)
            good = encode_marks({0: TS})
            producer.send(TOPIC_LABELED, key=b"0", value=encode_labeled(_examples(k, per)),
                          headers=[(MARKS_HEADER, good)])  # fmt: skip
            k += per
            producer.flush()
            producer.close()
            deadline = time.monotonic() + 90
            while (m := t.metrics()).get("streamrec_scored_total", 0) < k or m.get(
                'streamrec_stage_errors_total{stage="trainer"}', 0
            ) < len(BAD_HEADERS):
                t.check()  # the worker is alive
                assert time.monotonic() < deadline, f"trainer: {m}"
                time.sleep(0.5)
            time.sleep(2.0)  # anything more would have come by now
            m = t.metrics()
            t.check()
    assert m["streamrec_scored_total"] == k  # every valid example, once
    assert m['streamrec_stage_errors_total{stage="trainer"}'] == len(BAD_HEADERS)
    assert m["sum:streamrec_dead_letters_total"] == len(BAD_BODIES)
