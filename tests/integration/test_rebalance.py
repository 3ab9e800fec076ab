"""A second worker joining mid-stream takes over partitions with their join state.

Worker A consumes the first half of a log alone: with a 30-minute window over 10
impressions per second of event time, every one of those impressions is still pending
when worker B joins the group. B takes over some input partitions and must rebuild their
pending impressions from the segments A wrote to the changelog (:mod:`stream.segments`);
then the rest of the log is replayed. Every impression must come out on ``labeled``.
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import pytest

from bench.e2e import FINAL_GAP_S
from bench.workers import worker_processes
from logs.batches import decode_labeled
from logs.events import TOPIC_LABELED, LabeledExample
from logs.io import read_log_frame, write_log
from logs.synthetic import SyntheticConfig, write_synthetic
from stream.app import create_worker_topics
from stream.broker import EmbeddedBroker, read_records
from stream.replay import replay
from stream.settings import Settings

pytestmark = pytest.mark.integration

N_IMPRESSIONS = 6_000


@pytest.mark.parametrize("store", ["rocksdb", "memory"])
def test_a_joining_worker_rebuilds_the_partitions_it_takes_over(
    tmp_path: Path, store: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("STREAMREC_TABLE_STORE", store)
    monkeypatch.setenv("STREAMREC_RECOVERY_CONSISTENCY_CHECK", "false")  # Tansu: see settings
    log = tmp_path / "log.csv"
    cfg = SyntheticConfig(n_impressions=N_IMPRESSIONS, seed=5, drift_at=None)
    write_synthetic(cfg, log)
    df = read_log_frame(log)
    first, second = tmp_path / "first.csv", tmp_path / "second.csv"
    write_log(df.iloc[: N_IMPRESSIONS // 2], first)
    write_log(df.iloc[N_IMPRESSIONS // 2 :], second)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with EmbeddedBroker(log_path=tmp_path / "tansu.log") as broker:
        create_worker_topics(Settings(broker=broker.url))
        with worker_processes(broker.url, tmp_path / "a") as (a,):
            replay(first, broker.url, progress=False, final_watermark_gap_s=0.0)
            deadline = time.monotonic() + 60
            while a.metrics().get("streamrec_impressions_total", 0) < N_IMPRESSIONS // 2:
                assert time.monotonic() < deadline, "worker A did not take in the first half"
                time.sleep(0.3)
            assert a.metrics().get("sum:streamrec_labeled_total", 0) == 0  # all pending
            with worker_processes(broker.url, tmp_path / "b") as (b,):
                time.sleep(Settings().rebalance_timeout_s + 3.0)  # the group settles
                replay(second, broker.url, progress=False, final_watermark_gap_s=FINAL_GAP_S)
                deadline = time.monotonic() + 120
                while True:
                    per = [(w.metrics(), w) for w in (a, b)]
                    labeled = sum(m.get("sum:streamrec_labeled_total", 0) for m, _ in per)
                    if labeled >= N_IMPRESSIONS:
                        break
                    for _, w in per:
                        w.check()
                    assert time.monotonic() < deadline, f"labelled {labeled}"
                    time.sleep(0.5)
                mb = b.metrics()
        labels = Counter(
            e["impression_id"]
            for r in read_records(broker.url, TOPIC_LABELED)
            for e in map(LabeledExample.to_dict, decode_labeled(r.value))
            if e.get("kind") != "correction"
        )
    assert set(labels) == set(df["impression_id"].astype(str))  # none lost
    assert sum(labels.values()) <= N_IMPRESSIONS * 1.01  # at-least-once: few repeats
    # B labelled impressions it never consumed: the ones restored from A's segments
    b_in = mb.get("streamrec_impressions_total", 0)
    assert 0 < b_in < N_IMPRESSIONS
    assert mb.get("sum:streamrec_labeled_total", 0) > b_in
