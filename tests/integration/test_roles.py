"""A joiner-only worker and a trainer-only worker run the pipeline between them.

The joiner worker (group ``streamrec``) turns impressions and clicks into ``labeled``; the
trainer worker (group ``streamrec-trainer``) trains, scores and monitors. Every impression
must be labelled and scored once, by the side whose job it is.
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import pytest

from bench.e2e import FINAL_GAP_S
from bench.workers import worker_processes
from logs.batches import ScoredBatch, decode_labeled
from logs.events import TOPIC_LABELED, TOPIC_SCORED, LabeledExample
from logs.io import read_log_frame
from logs.synthetic import SyntheticConfig, write_synthetic
from stream.app import create_worker_topics
from stream.broker import EmbeddedBroker, read_records
from stream.replay import replay
from stream.settings import Settings

pytestmark = pytest.mark.integration

N_IMPRESSIONS = 4_000


def test_joiner_and_trainer_workers_share_the_pipeline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("STREAMREC_RECOVERY_CONSISTENCY_CHECK", "false")  # Tansu: see settings
    log = tmp_path / "log.csv"
    write_synthetic(SyntheticConfig(n_impressions=N_IMPRESSIONS, seed=7, drift_at=None), log)
    ids = set(read_log_frame(log)["impression_id"].astype(str))
    with EmbeddedBroker(log_path=tmp_path / "tansu.log") as broker:
        create_worker_topics(Settings(broker=broker.url))
        with worker_processes(broker.url, tmp_path, roles=("joiner", "trainer")) as (j, t):
            replay(log, broker.url, progress=False, final_watermark_gap_s=FINAL_GAP_S)
            deadline = time.monotonic() + 120
            while t.metrics().get("streamrec_monitored_total", 0) < N_IMPRESSIONS:
                j.check()
                t.check()
                assert time.monotonic() < deadline, f"trainer side: {t.metrics()}"
                time.sleep(0.5)
            mj, mt = j.metrics(), t.metrics()
            assert (
                "Ready" in t.log_path.read_text() and "streamrec-trainer" in t.log_path.read_text()
            )
        labeled = Counter(
            e["impression_id"]
            for r in read_records(broker.url, TOPIC_LABELED)
            for e in map(LabeledExample.to_dict, decode_labeled(r.value))
        )
        scored = Counter(
            i for r in read_records(broker.url, TOPIC_SCORED)
            for i in ScoredBatch.decode(r.value).impression_ids
        )  # fmt: skip
    assert set(labeled) == ids and set(scored) == ids
    assert sum(labeled.values()) == sum(scored.values()) == N_IMPRESSIONS
    # each side did its own job only
    assert mj.get("streamrec_impressions_total") == N_IMPRESSIONS
    assert mj.get("sum:streamrec_labeled_total") == N_IMPRESSIONS
    assert mj.get("streamrec_scored_total", 0) == 0
    assert mt.get("streamrec_impressions_total", 0) == 0
    assert mt.get("streamrec_scored_total") == N_IMPRESSIONS
