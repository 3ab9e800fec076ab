"""The real worker process against the embedded broker (Tansu), end to end."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from kafka import KafkaProducer

from logs.batches import decode_labeled
from logs.events import (
    TOPIC_CLICKS,
    TOPIC_CONTROL,
    TOPIC_DEAD_LETTER,
    TOPIC_IMPRESSIONS,
    TOPIC_LABELED,
    LabeledExample,
)
from logs.io import read_log_frame
from logs.synthetic import SyntheticConfig, write_synthetic
from stream.app import create_worker_topics
from stream.broker import EmbeddedBroker, free_port, wait_for_port
from stream.demo import read_scored, read_topic, scrape
from stream.replay import replay
from stream.settings import Settings

pytestmark = pytest.mark.integration

N_IMPRESSIONS = 3000
WINDOW_S = 1800.0


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, object]]:
    """Broker + one worker process + a replayed synthetic log with bad records and
    duplicate clicks mixed in; yields what the tests need once everything is labelled."""
    tmp = tmp_path_factory.mktemp("pipeline")
    log_path = tmp / "log.csv"
    write_synthetic(SyntheticConfig(n_impressions=N_IMPRESSIONS, seed=7, drift_at=None), log_path)
    df = read_log_frame(log_path)
    clicked = df[(df["click"] == 1) & (df["click_ts"] - df["ts"] <= WINDOW_S)]
    broker = EmbeddedBroker(log_path=tmp / "tansu.log").start()
    port = free_port()
    web_port = free_port()
    settings = Settings(broker=broker.url, metrics_port=port, data_dir=str(tmp / "data"))
    create_worker_topics(settings)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(tmp / "worker.log", "wb") as out:
        worker = subprocess.Popen(
            [sys.executable, "-m", "stream.cli", "worker", "--broker", broker.url,
             "--metrics-port", str(port), "--data-dir", str(tmp / "data"),
             "--web-port", str(web_port)],
            stdout=out, stderr=subprocess.STDOUT, env=env,
        )  # fmt: skip
    try:
        wait_for_port("127.0.0.1", port, timeout_s=60)
        # bad records first: the worker must survive them and dead-letter each one
        bad = [
            (TOPIC_IMPRESSIONS, b"not json"),
            (TOPIC_IMPRESSIONS, b'{"ts": 1700000000, "user_id": "u", "item_id": "i"}'),
            (TOPIC_IMPRESSIONS, b'{"impression_id": "x", "ts": NaN, "user_id": "u"}'),
            (TOPIC_IMPRESSIONS, b'{"impression_id": "y", "ts": -5, "user_id": "u"}'),
            (TOPIC_CLICKS, b"[1, 2, 3]"),
            (TOPIC_CLICKS, b'{"impression_id": "z", "ts": 99999999999}'),
        ]  # fmt: skip
        producer = KafkaProducer(bootstrap_servers=[broker.url])
        for topic, value in bad:
            producer.send(topic, key=b"bad", value=value)
        producer.flush()
        stats = replay(log_path, broker.url, progress=False, final_watermark_gap_s=WINDOW_S + 61)
        # duplicate clicks on clicked impressions, after they were labelled
        dups = clicked.head(5)
        for iid, cts, uid in zip(dups["impression_id"], dups["click_ts"], dups["user_id"],
                                 strict=True):  # fmt: skip
            producer.send(
                TOPIC_CLICKS, key=str(uid).encode(),  # clicks are keyed by user_id
                value=json.dumps({"impression_id": iid, "ts": float(cts) + 1,
                                  "user_id": str(uid)}).encode(),
            )  # fmt: skip
        producer.flush()
        producer.close()
        url = f"http://127.0.0.1:{port}/metrics"
        deadline = time.monotonic() + 120
        while True:
            assert worker.poll() is None, (tmp / "worker.log").read_text()[-3000:]
            m = scrape(url)
            if (
                m.get("sum:streamrec_labeled_total", 0) >= N_IMPRESSIONS
                and m.get("streamrec_scored_total", 0) >= N_IMPRESSIONS
                and m.get("streamrec_monitored_total", 0) >= N_IMPRESSIONS
                and m.get("streamrec_duplicate_clicks_total", 0) >= len(dups)
            ):
                break
            assert time.monotonic() < deadline, f"pipeline did not finish: {m}"
            time.sleep(0.5)
        time.sleep(1.5)  # let the 1 s gauge timer publish the final window
        yield {
            "broker": broker.url,
            "metrics": scrape(url),
            "metrics_url": url,
            "web": f"http://127.0.0.1:{web_port}",
            "df": df,
            "clicked": clicked,
            "bad": bad,
            "dups": len(dups),
            "stats": stats,
            "worker": worker,
        }
    finally:
        worker.terminate()
        try:
            worker.wait(timeout=20)
        except subprocess.TimeoutExpired:
            worker.kill()
        broker.stop()


def labeled_examples(bootstrap: str) -> list[dict[str, object]]:
    return [
        e
        for raw in read_topic(bootstrap, TOPIC_LABELED)
        for e in map(LabeledExample.to_dict, decode_labeled(raw))
    ]


def test_every_impression_is_labelled_exactly_once(pipeline: dict) -> None:
    examples = labeled_examples(pipeline["broker"])
    ids = [e["impression_id"] for e in examples]
    assert len(ids) == N_IMPRESSIONS
    assert set(ids) == set(pipeline["df"]["impression_id"])


def test_positives_equal_distinct_clicked_impressions_inside_the_window(pipeline: dict) -> None:
    examples = labeled_examples(pipeline["broker"])
    positives = {e["impression_id"] for e in examples if e["label"] == 1}
    assert positives == set(pipeline["clicked"]["impression_id"])
    assert all(e["kind"] in ("positive", "negative") for e in examples)


def test_duplicate_clicks_are_counted_once(pipeline: dict) -> None:
    m = pipeline["metrics"]
    assert m["streamrec_duplicate_clicks_total"] == pipeline["dups"]
    assert m["streamrec_clicks_total"] == pipeline["stats"].clicks + pipeline["dups"]
    assert m['streamrec_labeled_total{label="positive"}'] == len(pipeline["clicked"])


def test_bad_records_are_dead_lettered_with_a_reason_and_the_worker_survives(
    pipeline: dict,
) -> None:
    m = pipeline["metrics"]
    assert pipeline["worker"].poll() is None
    assert m["sum:streamrec_dead_letters_total"] == len(pipeline["bad"])
    assert m['streamrec_dead_letters_total{reason="bad_json"}'] == 1
    assert m['streamrec_dead_letters_total{reason="non_finite"}'] == 1  # a NaN literal
    assert m['streamrec_dead_letters_total{reason="missing_field"}'] == 1
    assert m['streamrec_dead_letters_total{reason="bad_timestamp"}'] == 2
    assert m['streamrec_dead_letters_total{reason="not_an_object"}'] == 1
    letters = [json.loads(r) for r in read_topic(pipeline["broker"], TOPIC_DEAD_LETTER)]
    assert len(letters) == len(pipeline["bad"])
    assert {(d["topic"], d["reason"]) for d in letters} >= {
        (TOPIC_IMPRESSIONS, "bad_json"),
        (TOPIC_CLICKS, "not_an_object"),
    }
    assert all(d["raw_b64"] and d["detail"] for d in letters)


def test_metrics_serve_plausible_calibration_gauges(pipeline: dict) -> None:
    m = pipeline["metrics"]
    ctr = len(pipeline["clicked"]) / N_IMPRESSIONS
    life = '{segment="all",window="lifetime"}'
    assert m[f"streamrec_actual_ctr{life}"] == pytest.approx(ctr, abs=1e-9)
    predicted = m[f"streamrec_predicted_ctr{life}"]
    assert 0.005 < predicted < 0.2
    ratio = m[f"streamrec_calibration_ratio{life}"]
    assert ratio == pytest.approx(predicted / ctr, rel=1e-6)
    assert 0 <= m['streamrec_expected_calibration_error{segment="all",window="20k"}'] < 0.2
    assert math.isfinite(m['streamrec_drift_z{segment="all"}'])
    assert m["streamrec_scored_total"] == N_IMPRESSIONS
    assert m["streamrec_train_batches_total"] >= N_IMPRESSIONS / 1024
    # per-segment gauges exist for the slate positions
    assert 'streamrec_calibration_ratio{segment="1",window="20k"}' in m
    # the raw ranker scores are monitored beside the served (calibrated) ones
    assert 0.005 < m[f"streamrec_raw_predicted_ctr{life}"] < 0.2
    # latency histograms: one observation per example / micro-batch
    assert m["streamrec_label_delay_seconds_count"] == N_IMPRESSIONS
    assert m["streamrec_update_freshness_seconds_count"] == N_IMPRESSIONS
    assert 0 < m["streamrec_update_freshness_seconds_sum"] / N_IMPRESSIONS < 30  # seconds
    assert m["streamrec_train_step_seconds_count"] == m["streamrec_train_batches_total"]
    # the worker times Python's garbage collections (stream.collector): young ones ran
    assert m['streamrec_gc_pause_seconds_count{generation="0"}'] > 0


def test_scored_topic_has_progressive_scores_for_every_impression(pipeline: dict) -> None:
    batches = read_scored(pipeline["broker"])
    ids = [i for b in batches for i in b.impression_ids]
    assert sorted(ids) == sorted(pipeline["df"]["impression_id"])
    for b in batches:
        assert all(0.0 < p < 1.0 for p in b.p_raw)
        assert all(tp is not None for tp in b.true_p)  # synthetic log carries true_p


def test_indexer_refreshes_the_faiss_index_over_seen_items(pipeline: dict) -> None:
    deadline = time.monotonic() + 15
    while True:
        m = scrape(pipeline["metrics_url"])
        # a scrape reads the metrics one at a time, in registration order: the version
        # gauge can be read just before a refresh sets it and counts it
        if m.get("streamrec_index_refreshes_total", 0) >= 1:
            if m.get("streamrec_index_version", 0) >= 1:
                break
        assert time.monotonic() < deadline, "no index refresh within 15 s"
        time.sleep(0.5)
    n_items = pipeline["df"]["item_id"].nunique()
    assert 0 < m["streamrec_index_items"] <= n_items
    assert m["streamrec_hard_negative_pool_users"] > 0


def test_demo_command_runs_end_to_end(tmp_path: Path) -> None:
    run = tmp_path / "demo"
    conf = tmp_path / "demo.toml"
    conf.write_text('app_id = "democonf"\n')  # the worker must run with the demo's file too
    proc = subprocess.run(
        [sys.executable, "-m", "stream.cli", "demo", "--impressions", "4000", "--pretrain",
         "2000", "--run-dir", str(run), "--timeout", "180", "--config", str(conf)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((run / "report.json").read_text())
    assert report["labeled"] == report["impressions"] == 4000
    assert report["pretrain"]["examples"] == 2000  # warm start from offline history
    assert list((run / "checkpoints").glob("ranker-v*.pt"))  # final checkpoint on shutdown
    assert report["scored_distinct_impressions"] == 4000
    assert report["monitored"] == 4000  # every impression judged once, the last ones too
    assert 0.0 < report["quality"]["auc"] < 1.0
    assert "calibration ratio before drift (served)" in proc.stdout
    html = (run / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 3
    worker_log = (run / "worker.log").read_text()
    assert "for group democonf" in worker_log and "for group streamrec" not in worker_log


def test_every_worker_applies_a_calibrator_published_on_control(pipeline: dict) -> None:
    producer = KafkaProducer(bootstrap_servers=[pipeline["broker"]])
    msg = {"kind": "calibrator", "version": 99, "params": {"a": 1.0, "b": 0.1}}
    producer.send(TOPIC_CONTROL, key=b"calibrator", value=json.dumps(msg).encode())
    producer.flush()
    producer.close()
    deadline = time.monotonic() + 15
    while scrape(pipeline["metrics_url"]).get("streamrec_calibrator_version") != 99:
        assert time.monotonic() < deadline, "the worker did not apply the control message"
        time.sleep(0.3)


def http(method: str, url: str, body: object = None) -> tuple[int, dict[str, object]]:
    import urllib.error
    import urllib.request

    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method)  # noqa: S310  # loopback
    try:
        with urllib.request.urlopen(req, timeout=10) as r:  # noqa: S310
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_recommend_and_score_answer_from_the_live_index_model_and_calibrator(
    pipeline: dict,
) -> None:
    web = pipeline["web"]
    user = str(pipeline["df"]["user_id"].iloc[-1])
    deadline = time.monotonic() + 30  # the indexer refreshes every 5 s
    while True:
        status, out = http("GET", f"{web}/recommend?user_id={user}&k=5")
        if status == 200 or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert status == 200, out
    items = out["items"]
    assert isinstance(items, list) and len(items) == 5
    scores = [it["score"] for it in items]
    assert scores == sorted(scores, reverse=True) and all(0 <= p <= 1 for p in scores)
    known = set(pipeline["df"]["item_id"].astype(str))
    assert {it["item_id"] for it in items} <= known
    assert out["index_version"] >= 1 and out["model_version"] >= 1

    body = {"user_id": user, "item_ids": [it["item_id"] for it in items]}
    status, scored = http("POST", f"{web}/score", body)
    assert status == 200, scored
    assert [it["item_id"] for it in scored["items"]] == [it["item_id"] for it in items]

    for bad in (f"user_id={user}&k=0", f"user_id={user}&k=1000", f"user_id={user}&k=x",
                "user_id=&k=3"):  # fmt: skip
        status, err = http("GET", f"{web}/recommend?{bad}")
        assert status == 400 and "error" in err, (bad, status, err)
    status, err = http("POST", f"{web}/score", {"user_id": user, "item_ids": "notalist"})
    assert status == 400 and "error" in err
    m = scrape(pipeline["metrics_url"])
    assert m['streamrec_serving_errors_total{endpoint="recommend",status="400"}'] >= 3
    assert m['streamrec_serving_seconds_count{endpoint="recommend"}'] >= 1
